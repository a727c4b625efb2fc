"""Runs die cleanly: `elt run` started as a real process, stopped with kill -9, SIGTERM or by a
second run on the same warehouse, with real dbt on DuckDB, real connectors and a real Prefect
server. After each: every process the run started is gone within 10 s, no profiles folder is
left, the warehouse lock is free, and the next run works."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import duckdb
import psutil
import pytest

from elt import processes
from tests.conftest import BIN, GitRemote, PrefectServer
from tests.fakes.clock import FakeClock

CHILDREN_END_SECONDS = 10
# How long a test waits for a guarded Python to print a line or to exit: far more than it needs
# on a loaded machine, and well under mutmut's timeout, so a mutant that makes it hang fails the
# test rather than running until mutmut kills it.
RESPONSE_SECONDS = 30

# A dbt Python model (dbt-duckdb runs it inside dbt's process) that, when the test asks, says it
# has started and then holds the warehouse until the run is stopped.
SLOW_MODEL = """
import os
import time


def model(dbt, session):
    marker = os.environ.get("SLOW_MODEL_MARKER")
    if marker:
        open(marker, "w").close()
        time.sleep(900)
    return session.sql("select 1 as id")
"""

GUARDED_PARENT = """
import subprocess, sys, threading, time
from pathlib import Path
from elt import processes
with processes.RunGuard() as guard:
    folder = Path(sys.argv[1])
    processes.remove_if_run_dies(folder.with_name("removed-already"))  # the run removed it itself
    folder.mkdir()
    processes.remove_if_run_dies(folder)
    # Like a connector: no parent-death signal, and a child of its own.
    child = subprocess.Popen(["sh", "-c", "sleep 900 & wait"])
    # Like dbt, started by a worker thread that goes on running.
    started = threading.Event()
    threading.Thread(target=lambda: (subprocess.Popen(["sleep", "901"]), started.set(), time.sleep(900)), daemon=True).start()
    started.wait()
    guard.sync()
    print(child.pid, flush=True)
    time.sleep(900)
"""


def _wait_until(condition, seconds: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    """Poll until `condition()` is truthy; fail the test after `seconds`, or as soon as `process` exits."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the run exited ({process.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f}s waiting until {what}\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log and log.exists() else ""


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_all_end(recorded: dict[int, psutil.Process]) -> None:
    """Every process recorded as the run's descendant ends within CHILDREN_END_SECONDS."""

    def survivors() -> list[str]:
        left = []
        for process in recorded.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{process.pid} {' '.join(process.cmdline())[:150]}")
            except psutil.NoSuchProcess:
                continue
        return left

    deadline = time.monotonic() + CHILDREN_END_SECONDS
    while survivors():
        if time.monotonic() > deadline:
            pytest.fail(f"still running {CHILDREN_END_SECONDS}s after the run ended: {survivors()}")
        time.sleep(0.1)


WATCHED_SECONDS = 1.0  # ten of the watchdog's scans


def _assert_all_stay_running(recorded: dict[int, psutil.Process], seconds: float) -> None:
    """Every recorded process is still running throughout `seconds` (a check that cannot fail
    working code: a slower machine only makes it see fewer scans)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ended = [pid for pid, process in recorded.items() if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE]
        assert not ended, f"ended while their run was alive: {ended}"
        time.sleep(0.1)


def _lock_is_free(lock: Path) -> bool:
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


_started_runs: list[Run] = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A failed test must not leave an `elt run` (and its connectors) running on a shared machine."""
    yield
    while _started_runs:
        run = _started_runs.pop()
        leftovers = [*_descendants(run.process.pid), *run.recorded.values()]
        run.process.kill()
        run.process.wait()
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()  # psutil checks the PID still names the process it recorded


class Run:
    """One `elt run` process, its output in files, and every descendant it was seen with."""

    def __init__(self, home: Path, env: dict[str, str], *args: str, name: str = "run") -> None:
        self.log = home.parent / f"{name}.log"
        self.err = home.parent / f"{name}.err"
        self.process = subprocess.Popen(
            [str(BIN / "elt"), "run", *args],
            cwd=home,
            env=env,
            stdout=self.log.open("w"),
            stderr=self.err.open("w"),
        )
        self.recorded: dict[int, psutil.Process] = {}
        _started_runs.append(self)

    def record(self) -> list[psutil.Process]:
        children = _descendants(self.process.pid)
        for child in children:
            self.recorded.setdefault(child.pid, child)
        return children

    def wait_for_child(self, needle: str, seconds: float = 400) -> None:
        def running() -> bool:
            return any(needle in " ".join(_cmdline(child)) for child in self.record())

        _wait_until(running, seconds, f"a child running {needle} appears", self.process, self.err)

    def wait(self, seconds: float = 60) -> int:
        _wait_until(lambda: self.process.poll() is not None, seconds, "the run exits", log=self.err)
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


@pytest.fixture
def run_env(appliance_env: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of an `elt run` started by the user, with its own temp folder so leftovers are seen."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    return {**os.environ, "ELT_HOME": str(appliance_env), "TMPDIR": str(temp)}


def _leftover_profiles(env: dict[str, str]) -> list[str]:
    return [path.name for path in Path(env["TMPDIR"]).glob("elt-profiles-*")]


def _holder(home: Path) -> dict:
    lock = home / "data" / "warehouse.duckdb.run.lock"
    return _wait_until(
        lambda: lock.exists() and lock.read_text() and json.loads(lock.read_text()), 30, "the run records itself in the lock"
    )


class GuardedPython:
    """A Python process running `script` (the processes it starts import the same `elt` as the
    tests); the test records its descendants. On the way out it and every recorded descendant
    still running are killed, whatever happened: a failed test leaves nothing on the machine."""

    def __init__(self, script: str, *args: str, log: Path) -> None:
        # stderr to a file: its children hold what the process holds, and a pipe they hold open
        # would keep a read waiting for them. SIGINT as in a user's terminal, even when the tests
        # run with it ignored (mutmut), which the process would inherit.
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.recorded: dict[int, psutil.Process] = {}
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    def _read_lines(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put("")  # the end of its output

    def record(self) -> dict[int, psutil.Process]:
        for child in _descendants(self.process.pid):
            self.recorded.setdefault(child.pid, child)
        return self.recorded

    def record_at_least(self, count: int) -> dict[int, psutil.Process]:
        """Its descendants, once `count` have been seen: `sh -c "sleep 900 & wait"` has started
        when the process prints, its `sleep` may not have yet (on a loaded machine)."""
        _wait_until(lambda: len(self.record()) >= count, RESPONSE_SECONDS, f"{count} descendants run", self.process, self.log)
        return self.recorded

    def read_line(self) -> str:
        try:
            line = self._lines.get(timeout=RESPONSE_SECONDS)
        except queue.Empty:
            pytest.fail(f"the process printed no line in {RESPONSE_SECONDS}s:\n{self.stderr[-3000:]}")
        if not line:
            self.process.wait()
            pytest.fail(f"the process exited ({self.process.returncode}) before printing:\n{self.stderr[-3000:]}")
        return line

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def watchdog(self) -> psutil.Process:
        watchdogs = [process for process in self.record().values() if "elt.processes" in " ".join(_cmdline(process))]
        assert len(watchdogs) == 1, f"one watchdog expected among {self.recorded}"
        return watchdogs[0]

    def __enter__(self) -> GuardedPython:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.record()
        self.process.kill()
        self.process.wait()
        for process in self.recorded.values():
            with contextlib.suppress(psutil.Error):
                process.kill()  # psutil checks the PID still names the process it recorded


def test_watchdog_stops_the_children_of_a_killed_process(tmp_path: Path) -> None:
    """kill -9 of a guarded process: its children (one started by a thread) and grandchild
    (re-parented to PID 1) are stopped, and the folder it registered is removed (one registered
    before and gone since is no matter)."""
    folder = tmp_path / "run-folder"
    with GuardedPython(GUARDED_PARENT, str(folder), log=tmp_path / "parent.err") as parent:
        child_pid = int(parent.read_line())
        recorded = dict(parent.record_at_least(4))
        assert child_pid in recorded, "watchdog, child, grandchild and the thread's child should be running"
        assert any(_cmdline(process) == ["sleep", "901"] for process in recorded.values()), recorded
        watchdog = parent.watchdog()
        assert os.getsid(watchdog.pid) == watchdog.pid  # a session of its own: the run's terminal's signals miss it
        _assert_all_stay_running(recorded, WATCHED_SECONDS)  # the watchdog stops nothing while its run lives
        parent.process.kill()
        parent.process.wait()
        _assert_all_end(recorded)
        _wait_until(lambda: not folder.exists(), CHILDREN_END_SECONDS, "the registered folder is removed")


# A run as `elt run` makes it (run_with_watchdog) that has started a connector (a child with a
# child of its own, no parent-death signal) and a process that looks like Prefect's temporary server.
STOPPED_RUN = """
import subprocess, sys, time
from elt import processes

def flow(repo, *, flow_run_id):
    assert repo == "the-repo"
    guard = processes.active_guard()
    if flow_run_id:
        guard.flow_run_id = flow_run_id
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "prefect.server.api.server:create_app"])
    connector = subprocess.Popen(["sh", "-c", "sleep 900 & wait"])
    guard.sync()
    print(server.pid, connector.pid, flush=True)
    time.sleep(900)

processes.run_with_watchdog(flow, "the-repo", flow_run_id=sys.argv[1])
"""


@pytest.mark.parametrize(
    ("stop_signal", "flow_run_id", "last_line"),
    [
        (
            signal.SIGTERM,
            "0b5e-flow-run",
            "all-etl stopped by SIGTERM: flow run 0b5e-flow-run is marked Crashed and its dbt and connector processes were stopped",
        ),
        (signal.SIGINT, "", "all-etl stopped by SIGINT before its flow run started"),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_stopped_run_stops_its_children_itself_and_says_so(
    stop_signal: signal.Signals, flow_run_id: str, last_line: str, tmp_path: Path
) -> None:
    """SIGTERM or SIGINT to a guarded run: it stops every child, Prefect's temporary server
    included, and exits 128 + the signal with one line. Its watchdog is killed first, so what
    stops the children is the run itself."""
    with GuardedPython(STOPPED_RUN, flow_run_id, log=tmp_path / "run.err") as run:
        server_pid, connector_pid = map(int, run.read_line().split())
        children = dict(run.record_at_least(4))
        assert {server_pid, connector_pid} <= set(children), children
        watchdog = run.watchdog()
        watchdog.kill()
        _assert_all_end({watchdog.pid: watchdog})
        run.process.send_signal(stop_signal)
        assert run.process.wait(timeout=RESPONSE_SECONDS) == 128 + stop_signal, run.stderr
        assert run.stderr.strip().splitlines()[-1] == last_line
        _assert_all_end(children)


def test_stopped_run_names_the_signal_prefect_reports() -> None:
    """Prefect raises TerminationSignal carrying the signal it caught; the last line names that one."""
    from prefect.exceptions import TerminationSignal

    assert processes.signal_name(TerminationSignal(signal.SIGHUP)) == "SIGHUP"
    assert processes.signal_name(KeyboardInterrupt()) == "SIGINT"
    assert processes.signal_name(SystemExit()) == "SIGTERM"  # a stop that names no signal


# A stopped run whose last logs cannot be sent to Prefect (its API unreachable, say): Prefect's
# drain is replaced by one that says how long it was allowed and fails. The run still stops its
# children and exits with its one line, and says the logs were not sent.
LOGS_NOT_SENT = (
    """
import sys
from prefect.logging.handlers import APILogWorker

def drain_all(timeout=None, at_exit=True):
    print(f"drain timeout={timeout}", file=sys.stderr, flush=True)
    raise RuntimeError("the API is unreachable")

APILogWorker.drain_all = staticmethod(drain_all)
"""
    + STOPPED_RUN
)


def test_stopped_run_whose_last_logs_cannot_be_sent_says_so_and_still_stops(tmp_path: Path) -> None:
    with GuardedPython(LOGS_NOT_SENT, "0b5e-flow-run", log=tmp_path / "run.err") as run:
        pids = set(map(int, run.read_line().split()))
        children = dict(run.record_at_least(4))
        assert pids <= set(children), children
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(timeout=RESPONSE_SECONDS) == 128 + signal.SIGTERM, run.stderr
        lines = run.stderr.strip().splitlines()
        assert lines[-1].startswith("all-etl stopped by SIGTERM: flow run 0b5e-flow-run is marked Crashed"), lines
        assert "Could not send the last logs to Prefect: the API is unreachable" in lines, lines
        # The drain is bounded (a hung API must not keep a stopped run alive), at 5 s.
        [timeout] = [line.removeprefix("drain timeout=") for line in lines if line.startswith("drain timeout=")]
        assert timeout != "None" and float(timeout) <= 5, timeout
        _assert_all_end(children)


# stop_children as a run calls it: its children and theirs are stopped and named in one INFO
# line; the watchdog and Prefect's temporary server are left (the server has a run's end to record).
STOP_CHILDREN = """
import logging, subprocess, sys
from elt import processes

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
with processes.RunGuard() as guard:
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "prefect.server.api.server:create_app"])
    connector = subprocess.Popen(["sh", "-c", "sleep 900 & wait"])
    guard.sync()
    print(server.pid, connector.pid, flush=True)
    sys.stdin.readline()
    processes.stop_children()
    print("stopped", flush=True)
    sys.stdin.readline()
"""


def test_stop_children_stops_and_names_them_but_keeps_the_watchdog_and_the_prefect_server(tmp_path: Path) -> None:
    with GuardedPython(STOP_CHILDREN, log=tmp_path / "run.err") as run:
        server_pid, connector_pid = map(int, run.read_line().split())
        children = dict(run.record_at_least(4))
        watchdog = run.watchdog()
        connector = {pid: process for pid, process in children.items() if pid not in (server_pid, watchdog.pid)}
        assert connector_pid in connector and len(connector) == 2, children  # sh and its sleep
        run.process.stdin.write("stop\n")
        run.process.stdin.flush()
        assert run.read_line() == "stopped\n"
        _assert_all_end(connector)
        [line] = [line for line in run.stderr.splitlines() if line.startswith("INFO Stopping")]
        count, _, pids = line.removeprefix("INFO Stopping ").partition(" child process(es): ")
        assert count == "2" and sorted(map(int, pids.split(", "))) == sorted(connector), line
        assert children[server_pid].status() != psutil.STATUS_ZOMBIE and watchdog.status() != psutil.STATUS_ZOMBIE


# A child that needs a moment to clean up on SIGTERM, then exits 7.
CLEANS_UP_ON_SIGTERM = """
import signal, sys, time

def cleanup(signum, frame):
    time.sleep(0.3)
    sys.exit(7)

signal.signal(signal.SIGTERM, cleanup)
print("ready", flush=True)
time.sleep(900)
"""


def test_stop_gives_sigterm_its_grace_and_returns_once_all_have_ended() -> None:
    """stop() lets a process finish its SIGTERM cleanup (exit 7, not SIGKILL) and returns as
    soon as none is left, not at the end of the grace period (an hour here: the thread's
    deadline fails the test first)."""
    child = subprocess.Popen([sys.executable, "-c", CLEANS_UP_ON_SIGTERM], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        process = processes._read_process(child.pid)
        assert process is not None
        stopper = threading.Thread(target=processes.stop, args=([process],), kwargs={"grace_seconds": 3600}, daemon=True)
        stopper.start()
        stopper.join(timeout=RESPONSE_SECONDS)
        assert not stopper.is_alive(), f"stop() still waiting {RESPONSE_SECONDS} s after its only process was sent SIGTERM"
        assert child.wait(timeout=10) == 7
    finally:
        child.kill()
        child.wait()


class _EndsOn:
    """A process as stop() sees it: alive until it receives `ends_on` (None: never)."""

    def __init__(self, pid: int, ends_on: int | None) -> None:
        self.pid, self.ends_on, self.alive = pid, ends_on, True

    def receive(self, signum: int) -> None:
        if signum == self.ends_on:
            self.alive = False


def _stop_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch, *doomed: _EndsOn, grace_seconds: float) -> tuple[FakeClock, list]:
    clock = FakeClock()
    monkeypatch.setattr(processes, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    sent: list[tuple[int, int]] = []

    def signal_process(process: _EndsOn, signum: int) -> None:
        sent.append((process.pid, signum))
        process.receive(signum)

    monkeypatch.setattr(processes, "_signal", signal_process)
    processes.stop(list(doomed), grace_seconds=grace_seconds)  # type: ignore[arg-type]
    return clock, sent


def test_stop_returns_within_a_tenth_of_a_second_of_the_last_process_ending(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock: what ends on SIGTERM is seen gone at the next look, not at the grace's end."""
    clock, sent = _stop_on_a_fake_clock(monkeypatch, _EndsOn(101, signal.SIGTERM), _EndsOn(102, signal.SIGTERM), grace_seconds=4)
    assert sent == [(101, signal.SIGTERM), (102, signal.SIGTERM)]
    assert 0 < sum(clock.sleeps) <= 0.1, clock.sleeps


def test_stop_waits_the_whole_grace_then_kills_only_what_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, sent = _stop_on_a_fake_clock(monkeypatch, _EndsOn(101, signal.SIGTERM), _EndsOn(102, None), grace_seconds=4)
    assert sent == [(101, signal.SIGTERM), (102, signal.SIGTERM), (102, signal.SIGKILL)]
    assert 4 <= sum(clock.sleeps) <= 4.1, sum(clock.sleeps)


def test_a_grace_of_one_poll_looks_once_then_kills(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock: the SIGKILL comes when the grace is over, not a poll after it (a grace of
    one 50 ms poll, where the fake clock lands on the deadline exactly)."""
    clock, sent = _stop_on_a_fake_clock(monkeypatch, _EndsOn(101, None), grace_seconds=0.05)
    assert sent == [(101, signal.SIGTERM), (101, signal.SIGKILL)]
    assert clock.sleeps == [0.05]


IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(900)
"""


def test_stop_kills_what_ignores_sigterm_after_the_grace_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    child = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        process = processes._read_process(child.pid)
        assert process is not None
        with caplog.at_level(logging.WARNING, logger="elt.processes"):
            processes.stop([process], grace_seconds=1)
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert [record.getMessage() for record in caplog.records] == [
            f"PID {child.pid} did not stop on SIGTERM within 1s; killing it"
        ]
    finally:
        child.kill()
        child.wait()


# A guarded run whose child starts a child of its own once the trigger file exists.
LATE_GRANDCHILD = """
import subprocess, sys, time
from elt import processes
with processes.RunGuard() as guard:
    child = subprocess.Popen(["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.05; done; sleep 902 & wait', sys.argv[1]])
    guard.sync()
    print(child.pid, guard.watchdog_pid, flush=True)
    time.sleep(900)
"""


def test_watchdog_stops_what_the_runs_children_started_after_its_last_scan(tmp_path: Path) -> None:
    """The run dies while its watchdog is not scanning (stopped with SIGSTOP here, as a loaded
    machine can hold it between two scans): what a recorded child started meanwhile, which no scan
    saw, is found through that child and stopped too."""
    trigger = tmp_path / "trigger"
    with GuardedPython(LATE_GRANDCHILD, str(trigger), log=tmp_path / "parent.err") as parent:
        child_pid, watchdog_pid = map(int, parent.read_line().split())
        watchdog = psutil.Process(watchdog_pid)
        child = parent.record()[child_pid]
        watchdog.suspend()
        trigger.touch()
        [late] = _wait_until(
            lambda: [process for process in _descendants(child_pid) if _cmdline(process) == ["sleep", "902"]],
            RESPONSE_SECONDS,
            "the child starts its own",
        )
        parent.record()
        parent.process.kill()
        parent.process.wait()
        watchdog.resume()
        _assert_all_end({child_pid: child, late.pid: late})


@pytest.mark.parametrize("where", ["no /proc", "not Linux"])
def test_without_proc_a_run_goes_unguarded_and_its_guard_does_nothing(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux without /proc mounted (an empty folder stands in for the mount point) or another
    system: no watchdog is started, and the guard's sync, remove_if_run_dies, its end and
    stop_children are no-ops, not errors."""
    if where == "no /proc":
        (tmp_path / "proc").mkdir()
        monkeypatch.setattr(processes, "PROC", tmp_path / "proc")
    else:
        monkeypatch.setattr(sys, "platform", "darwin")
    assert not processes.supported()
    with processes.RunGuard() as guard:
        assert guard.watchdog is None and guard.watchdog_pid is None
        assert processes.active_guard() is guard
        guard.sync()
        processes.remove_if_run_dies(tmp_path / "folder")
        processes.stop_children()
    assert processes.active_guard() is None


def _fake_proc(root: Path, pid: int, tasks: dict[int, str | None]) -> Path:
    """/proc/<pid>/task/<tid>/children as the kernel lays it out, for a process whose threads
    come and go between two reads (which no test can time on the real /proc): a task whose
    value is None has ended since its folder was listed, so reading its `children` fails."""
    for tid, children in tasks.items():
        task = root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True)
        if children is not None:
            (task / "children").write_text(children)
    return root


def test_the_children_of_every_thread_are_read_even_when_a_thread_ends_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread that ended between the listing of the run's tasks and the read of its children
    is skipped, and the threads listed after it are still read (on a fake /proc, said above)."""
    tasks = {tid: (f"{tid + 1000} " if tid % 2 == 0 else None) for tid in range(100, 110)}
    proc = _fake_proc(tmp_path / "proc", 100, tasks)
    listed = [tasks[int(task.name)] for task in (proc / "100" / "task").iterdir()]
    first_ended = listed.index(None)
    assert any(children is not None for children in listed[first_ended:]), "no thread read after an ended one"
    monkeypatch.setattr(processes, "PROC", proc)
    assert sorted(processes._children(100)) == [1100, 1102, 1104, 1106, 1108]


@pytest.mark.parametrize(("state", "ended"), [("S", False), ("R", False), ("D", False), ("Z", True), ("X", True)])
def test_a_process_the_kernel_shows_as_zombie_or_dead_is_not_alive(
    state: str, ended: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """State `X` (dead: a task being torn down) shows in /proc/<pid>/stat only for an instant, so
    this test's own stat line is copied into a fake /proc with its state changed."""
    real = Path(f"/proc/{os.getpid()}/stat").read_text()
    state_at = real.rindex(")") + 2
    fake = tmp_path / "proc" / str(os.getpid())
    fake.mkdir(parents=True)
    (fake / "stat").write_text(real[:state_at] + state + real[state_at + 1 :])
    monkeypatch.setattr(processes, "PROC", tmp_path / "proc")
    assert processes._is_zombie(os.getpid()) is ended
    process = processes._read_process(os.getpid())
    assert process is not None and process.alive is not ended


def test_a_guard_whose_watchdog_has_died_says_so_and_its_block_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="elt.processes"), processes.RunGuard() as guard:
        assert guard.watchdog is not None
        pid = guard.watchdog.pid
        guard.watchdog.kill()
        guard.watchdog.wait()
        processes.remove_if_run_dies(tmp_path / "folder")
        assert caplog.messages == [f"The run's watchdog (PID {pid}) has exited"]
    assert processes.active_guard() is None


def test_a_nested_guard_is_the_outer_one_and_leaves_it_active() -> None:
    """A flow under guard_run inside run_with_watchdog: one watchdog, the outermost guard's, which
    stays active (what remove_if_run_dies tells) until the outer block ends."""
    with processes.RunGuard() as outer:
        with processes.RunGuard() as inner:
            assert inner is outer
        assert processes.active_guard() is outer and outer.watchdog is not None and outer.watchdog.poll() is None
    assert processes.active_guard() is None and outer.watchdog.wait(timeout=RESPONSE_SECONDS) == 0


def test_signalling_a_process_that_has_ended_is_no_error() -> None:
    """stop() checks each process is alive, then signals it: it may end in between."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    processes._signal(processes.Process(pid=ended.pid, started=0, parent=os.getpid()), signal.SIGTERM)


# A guarded process that forks (as multiprocessing does): the fork holds every descriptor the
# parent had, the write end of the watchdog's pipe included, so the watchdog sees no end of input
# when the parent dies and must notice the death itself.
FORKING_PARENT = """
import os, sys, time
from elt import processes
with processes.RunGuard() as guard:
    child = os.fork()
    if child == 0:
        time.sleep(900)
        os._exit(0)
    guard.sync()
    print(child, flush=True)
    time.sleep(900)
"""


def test_watchdog_notices_its_run_died_even_when_a_fork_holds_its_pipe(tmp_path: Path) -> None:
    with GuardedPython(FORKING_PARENT, log=tmp_path / "parent.err") as parent:
        fork_pid = int(parent.read_line())
        recorded = dict(parent.record())
        assert fork_pid in recorded, recorded
        parent.process.kill()
        parent.process.wait()
        _assert_all_end({fork_pid: recorded[fork_pid]})


# A guarded block that ends while its watchdog is hung (stopped here with SIGSTOP). The guard's
# wait for its watchdog is shortened from 10 s so the test (run for each mutant) stays short.
HUNG_WATCHDOG = """
import sys
from elt import processes
processes.WATCHDOG_EXIT_SECONDS = 0.5
with processes.RunGuard() as guard:
    print(guard.watchdog_pid, flush=True)
    sys.stdin.readline()
print("ended", flush=True)
"""


def test_a_hung_watchdog_is_killed_once_the_guard_has_waited_for_it(tmp_path: Path) -> None:
    """The guard waits a bounded time (WATCHDOG_EXIT_SECONDS) for its watchdog to exit, then kills it."""
    with GuardedPython(HUNG_WATCHDOG, log=tmp_path / "run.err") as run:
        watchdog = psutil.Process(int(run.read_line()))
        run.record()
        watchdog.suspend()
        run.process.stdin.write("end\n")
        run.process.stdin.flush()
        assert run.read_line() == "ended\n"
        assert run.process.wait(timeout=RESPONSE_SECONDS) == 0, run.stderr
        _assert_all_end({watchdog.pid: watchdog})


# A process whose child gets the parent-death signal (as the temporary Prefect server's processes
# do): no watchdog here, so only that signal can stop the child when the parent is killed.
DIES_WITH_PARENT = """
import subprocess, sys
from elt import processes
child = subprocess.Popen(["sleep", "900"], preexec_fn=processes.die_with_parent)
print(child.pid, flush=True)
sys.stdin.readline()
"""


def test_a_child_started_with_die_with_parent_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    with GuardedPython(DIES_WITH_PARENT, log=tmp_path / "parent.err") as parent:
        child_pid = int(parent.read_line())
        recorded = dict(parent.record())
        assert child_pid in recorded, recorded
        parent.process.kill()
        parent.process.wait()
        _assert_all_end({child_pid: recorded[child_pid]})


def test_a_process_whose_name_holds_a_parenthesis_is_read_right(tmp_path: Path) -> None:
    """/proc/<pid>/stat puts the command name in parentheses, and a name may hold `) ` itself."""
    program = tmp_path / "a) 1 2 3 4"
    program.symlink_to(Path(subprocess.run(["which", "sleep"], capture_output=True, text=True, check=True).stdout.strip()))
    child = subprocess.Popen([str(program), "900"])
    try:
        _wait_until(lambda: "a) 1" in Path(f"/proc/{child.pid}/stat").read_text(), 10, "the child runs the program")
        read = processes._read_process(child.pid)
        assert read is not None and read.parent == os.getpid(), read
        assert read.started == int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert read.alive and child.pid in [process.pid for process in processes.descendants(os.getpid())]
        child.kill()  # not reaped yet: a zombie, whose state follows the name too
        _wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10, "the child is a zombie")
        assert not read.alive
    finally:
        child.kill()
        child.wait()
    assert not read.alive
    assert processes._is_zombie(child.pid)  # gone altogether: not alive either, were it read between two checks


# A flow under guard_run that a signal interrupts (Prefect turns SIGTERM into an exception in the
# flow): its children are stopped on the way out, but not Prefect's temporary server, which has
# yet to record the run's end; and the run's watchdog, told it finished, stops nothing more.
INTERRUPTED_FLOW = """
import subprocess, sys
from elt import processes

@processes.guard_run
def flow():
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "prefect.server.api.server:create_app"])
    connector = subprocess.Popen(["sh", "-c", "sleep 900 & wait"])
    processes.active_guard().sync()
    print(server.pid, connector.pid, flush=True)
    sys.stdin.readline()
    raise KeyboardInterrupt

try:
    flow()
except KeyboardInterrupt:
    print("interrupted", flush=True)
with processes.RunGuard() as next_run:  # the next run in this process is guarded too
    print(next_run.watchdog_pid is not None, flush=True)
"""


def test_interrupted_flow_stops_its_children_but_not_the_prefect_server(tmp_path: Path) -> None:
    with GuardedPython(INTERRUPTED_FLOW, log=tmp_path / "run.err") as run:
        server_pid, connector_pid = map(int, run.read_line().split())
        children = dict(run.record_at_least(4))
        watchdog = run.watchdog()
        run.process.stdin.write("stop\n")
        run.process.stdin.flush()
        assert run.read_line() == "interrupted\n"
        assert run.read_line() == "True\n"
        assert run.process.wait(timeout=RESPONSE_SECONDS) == 0
        _assert_all_end({watchdog.pid: watchdog})
        connector = {pid: process for pid, process in children.items() if pid not in (server_pid, watchdog.pid)}
        assert connector_pid in connector and len(connector) >= 2, children
        _assert_all_end(connector)
        assert children[server_pid].is_running() and children[server_pid].status() != psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_kill_9_during_dbt(
    prefect_server: PrefectServer, tiny_remote: GitRemote, appliance_env: Path, run_env: dict, tmp_path: Path
) -> None:
    """kill -9 of `elt run` while dbt holds the warehouse: dbt and every other child end within 10 s,
    the lock and profiles folder go with them, a second run meanwhile was refused naming the first,
    the next run succeeds and marks the killed run Crashed."""
    tiny_remote.commit("dbt/models/slow.py", SLOW_MODEL, "a model that waits")
    marker = tmp_path / "slow-model-started"
    env = prefect_server.env() | run_env
    args = ["--skip-extract", "--repo", str(tiny_remote.bare)]
    first = Run(appliance_env, env | {"SLOW_MODEL_MARKER": str(marker)}, *args, name="first")
    _wait_until(marker.exists, 400, "the slow model runs", first.process, first.err)
    first.wait_for_child("dbt")
    holder = _holder(appliance_env)
    assert holder["pid"] == first.process.pid

    second = Run(appliance_env, env, *args, name="second")
    assert second.wait(seconds=300) == 1
    warehouse = appliance_env / "data" / "warehouse.duckdb"
    assert second.stderr.strip().splitlines()[-1] == (
        f"all-etl Failed: another all-etl run (flow run {holder['flow_run_id']}, PID {first.process.pid}) "
        f"is using {warehouse}; wait for it or cancel it"
    )
    assert "sync-" not in second.log.read_text() + second.stderr

    first.record()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    _assert_all_end(first.recorded)
    assert _leftover_profiles(env) == []
    assert _lock_is_free(appliance_env / "data" / "warehouse.duckdb.run.lock")

    third = Run(appliance_env, env, *args, name="third")
    assert third.wait(seconds=400) == 0, third.stderr[-3000:]
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        assert connection.execute("select count(*) from main_marts.customer_totals").fetchone()[0] > 0
    state = prefect_server.get(f"/flow_runs/{holder['flow_run_id']}").json()["state"]
    assert state["type"] == "CRASHED"
    assert state["message"].startswith(f"The process running this flow run (PID {first.process.pid}) died without finishing it")


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_during_dbt(
    prefect_server: PrefectServer,
    tiny_remote: GitRemote,
    appliance_env: Path,
    run_env: dict,
    tmp_path: Path,
    stop_signal: signal.Signals,
) -> None:
    """SIGTERM (docker stop, systemd) or SIGINT to the elt process alone: dbt is stopped, the run
    is marked Crashed, and elt exits 128 + the signal with one line saying so."""
    tiny_remote.commit("dbt/models/slow.py", SLOW_MODEL, "a model that waits")
    marker = tmp_path / "slow-model-started"
    env = prefect_server.env() | run_env | {"SLOW_MODEL_MARKER": str(marker)}
    run = Run(appliance_env, env, "--skip-extract", "--repo", str(tiny_remote.bare))
    _wait_until(marker.exists, 400, "the slow model runs", run.process, run.err)
    run.wait_for_child("dbt")
    holder = _holder(appliance_env)

    run.record()
    run.process.send_signal(stop_signal)
    assert run.wait(seconds=60) == 128 + stop_signal
    _assert_all_end(run.recorded)
    assert run.stderr.strip().splitlines()[-1] == (
        f"all-etl stopped by {stop_signal.name}: flow run {holder['flow_run_id']} is marked Crashed "
        "and its dbt and connector processes were stopped"
    )
    assert prefect_server.get(f"/flow_runs/{holder['flow_run_id']}").json()["state"]["type"] == "CRASHED"
    assert _leftover_profiles(env) == []
    lock = appliance_env / "data" / "warehouse.duckdb.run.lock"
    assert _lock_is_free(lock) and lock.read_text() == ""


@pytest.mark.slow
def test_sigterm_during_sync(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path, run_env: dict, faker_connections: Path
) -> None:
    """SIGTERM while source-faker is syncing: the connector is stopped rather than left to finish
    and commit; elt exits 143 with one line; nothing is built and the warehouse still opens."""
    faker_connections.write_text(faker_connections.read_text().replace("count: 200", "count: 20000000"))
    env = prefect_server.env() | run_env
    run = Run(appliance_env, env, "--repo", str(appliance_remote.bare))
    run.wait_for_child("source-faker", seconds=600)
    holder = _holder(appliance_env)

    run.record()
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(seconds=60) == 128 + signal.SIGTERM
    _assert_all_end(run.recorded)
    assert run.stderr.strip().splitlines()[-1] == (
        f"all-etl stopped by SIGTERM: flow run {holder['flow_run_id']} is marked Crashed "
        "and its dbt and connector processes were stopped"
    )
    assert prefect_server.get(f"/flow_runs/{holder['flow_run_id']}").json()["state"]["type"] == "CRASHED"
    warehouse = appliance_env / "data" / "warehouse.duckdb"
    # The sync was stopped before it finished: no marts, and no complete users table. No file
    # at all means the connector was stopped before it wrote anything.
    tables: set[tuple[str, str]] = set()
    if warehouse.exists():
        with duckdb.connect(str(warehouse), read_only=True) as connection:
            tables = {
                tuple(row)
                for row in connection.execute("select table_schema, table_name from information_schema.tables").fetchall()
            }
            users = (
                connection.execute("select count(*) from raw_faker.users").fetchone()[0]
                if ("raw_faker", "users") in tables
                else 0
            )
    assert not any(schema.endswith("marts") for schema, _ in tables), tables
    assert ("raw_faker", "users") not in tables or users < 20000000
    assert _lock_is_free(appliance_env / "data" / "warehouse.duckdb.run.lock")


@pytest.mark.slow
def test_kill_9_during_sync(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path, run_env: dict, faker_connections: Path
) -> None:
    """kill -9 while source-faker is syncing: the connector has no parent-death signal; the
    watchdog stops it (and its own child) within 10 s, and the lock is free."""
    faker_connections.write_text(faker_connections.read_text().replace("count: 200", "count: 20000000"))
    run = Run(appliance_env, prefect_server.env() | run_env, "--repo", str(appliance_remote.bare))
    run.wait_for_child("source-faker", seconds=600)
    run.record()
    run.process.send_signal(signal.SIGKILL)
    run.process.wait()
    _assert_all_end(run.recorded)
    assert _lock_is_free(appliance_env / "data" / "warehouse.duckdb.run.lock")


@pytest.mark.slow
def test_kill_9_stops_the_temporary_prefect_server(
    tiny_remote: GitRemote, appliance_env: Path, run_env: dict, tmp_path: Path
) -> None:
    """Without PREFECT_API_URL Prefect starts a temporary server as a child of the run; kill -9 of
    the run must not leave it (or dbt) running."""
    tiny_remote.commit("dbt/models/slow.py", SLOW_MODEL, "a model that waits")
    marker = tmp_path / "slow-model-started"
    env = {key: value for key, value in run_env.items() if key != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "SLOW_MODEL_MARKER": str(marker)}
    run = Run(appliance_env, env, "--skip-extract", "--repo", str(tiny_remote.bare))
    _wait_until(marker.exists, 500, "the slow model runs", run.process, run.err)
    run.wait_for_child("dbt")
    assert any("prefect.server.api.server:create_app" in " ".join(_cmdline(child)) for child in run.record())
    run.process.send_signal(signal.SIGKILL)
    run.process.wait()
    _assert_all_end(run.recorded)
    assert _leftover_profiles(env) == []


def test_profiles_folders_of_dead_processes_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profiles folder left by a process that died with its watchdog is removed by the next
    dbt invocation; one of a live process is kept."""
    import tempfile

    from elt import dbt_runner
    from elt.settings import load_settings
    from tests.conftest import TINY_PROJECT

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()
    left_by_dead = tmp_path / f"elt-profiles-{ended.pid}-abcd1234"
    of_live = tmp_path / f"elt-profiles-{os.getpid()}-efgh5678"
    left_by_dead.mkdir()
    of_live.mkdir()
    with dbt_runner.profiles_dir(load_settings(home=tmp_path), dbt_runner.DbtProject.at(TINY_PROJECT)) as rendered:
        assert (rendered / "profiles.yml").is_file()
    assert not left_by_dead.exists() and of_live.exists() and not rendered.exists()
