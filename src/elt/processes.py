"""A run's child processes end with the run, however it ends, `kill -9` included.

A run starts children: dbt, the connectors PyAirbyte runs, and the temporary Prefect server
Prefect starts when PREFECT_API_URL is unset. A process killed with SIGKILL cleans nothing up,
and its children are re-parented to PID 1 and keep running (dbt holding DuckDB's lock). So
each run starts a watchdog: a small process that records the run's descendants while the run
lives (once re-parented they are nobody's descendants any more) and, if the run's process
dies before saying it finished, stops each one still alive (SIGTERM, then SIGKILL) and
removes the run's temporary folders. dbt also gets a parent-death signal, so it stops even
in the fraction of a second before the watchdog first sees it.

SIGTERM and SIGINT are turned into exceptions by Prefect (and Python); on their way out of
the flow, `guard_run` stops the children before Prefect marks the run Crashed, and
`exit_stopped` ends the process without waiting for sync threads to commit.

Linux only: it reads /proc. Elsewhere runs go unguarded.

    python -m elt.processes <pid>    # the watchdog; started by RunGuard, reads commands on stdin
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    import ctypes

logger = logging.getLogger(__name__)

PROC = Path("/proc")
STOP_GRACE_SECONDS = 4.0
SCAN_SECONDS = 0.1
WATCHDOG_EXIT_SECONDS = 10.0  # how long a run's end waits for its watchdog to exit before killing it
# The temporary Prefect server's command line (prefect/server/api/server.py, SubprocessASGIServer).
_PREFECT_SERVER_MARK = "prefect.server.api.server:create_app"
_WATCHDOG_MARK = "elt.processes"
_PR_SET_PDEATHSIG = 1

F = TypeVar("F", bound=Callable)
R = TypeVar("R")


@dataclass(frozen=True)
class Process:
    """A process identified by PID and start time, so a reused PID is never mistaken for it."""

    pid: int
    started: int  # clock ticks after boot (field 22 of /proc/<pid>/stat)
    parent: int

    @property
    def alive(self) -> bool:
        current = _read_process(self.pid)
        return current is not None and current.started == self.started and not _is_zombie(self.pid)

    @property
    def command_line(self) -> str:
        try:
            return (PROC / str(self.pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""


def supported() -> bool:
    return sys.platform.startswith("linux") and (PROC / "self" / "stat").exists()


def _read_process(pid: int) -> Process | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    return Process(pid=pid, parent=int(fields[1]), started=int(fields[19]))


def _is_zombie(pid: int) -> bool:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def descendants(pid: int) -> list[Process]:
    """Every live process below `pid` in the process tree."""
    found, pending = [], [pid]
    while pending:
        for child in _children(pending.pop()):
            process = _read_process(child)
            if process is not None:
                found.append(process)
                pending.append(child)
    return found


def _children(pid: int) -> list[int]:
    """PIDs of the children of every thread of `pid` (/proc/<pid>/task/<tid>/children: only the
    process's own tree is read, not all of /proc, so the watchdog can look often and cheaply)."""
    pids: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return pids


def stop(processes: Iterable[Process], grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM each process, then SIGKILL those still alive after the grace period."""
    remaining = [process for process in processes if process.alive]
    for process in remaining:
        _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [process for process in remaining if process.alive]
    for process in remaining:
        logger.warning("PID %s did not stop on SIGTERM within %.0fs; killing it", process.pid, grace_seconds)
        _signal(process, signal.SIGKILL)


def _signal(process: Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signum)


def stop_children(keep_prefect_server: bool = True) -> None:
    """Stop every process this one started (and their children), except the watchdog and,
    unless asked, the temporary Prefect server that still has to record the run's end."""
    if not supported():
        return
    doomed = []
    for process in descendants(os.getpid()):
        command = process.command_line
        if _WATCHDOG_MARK in command or (keep_prefect_server and _PREFECT_SERVER_MARK in command):
            continue
        doomed.append(process)
    if doomed:
        logger.info("Stopping %d child process(es): %s", len(doomed), ", ".join(str(p.pid) for p in doomed))
    stop(doomed)


def die_with_parent() -> None:
    """`preexec_fn` for a child that must not outlive the thread starting it: it gets SIGTERM
    when that thread ends (prctl PR_SET_PDEATHSIG fires on the parent *thread's* exit, so use it
    only for children waited on by the thread that starts them)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _load_libc() -> ctypes.CDLL | None:
    if not supported():
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


# Loaded before any fork: the child between fork and exec must not import or load libraries.
_libc = _load_libc()


class RunGuard:
    """While active, a watchdog process stands ready to stop this process's children should it die.

    Nested guards in one process share the outermost one's watchdog. `remove_if_run_dies(path)`
    adds a folder for the watchdog to delete in that case.
    """

    _active: RunGuard | None = None

    def __init__(self) -> None:
        self.watchdog: subprocess.Popen | None = None
        self.flow_run_id: str | None = None  # set by the run lock once the flow run exists
        self._outer: RunGuard | None = None

    def __enter__(self) -> RunGuard:
        if RunGuard._active is not None:
            self._outer = RunGuard._active
            return self._outer
        RunGuard._active = self
        if supported():
            self.watchdog = subprocess.Popen(
                [sys.executable, "-m", _WATCHDOG_MARK, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        if self._outer is not None:
            return
        RunGuard._active = None
        if self.watchdog is None:
            return
        self._send("finished")
        try:
            assert self.watchdog.stdin is not None  # started with stdin=PIPE
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=WATCHDOG_EXIT_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            self.watchdog.kill()

    def sync(self) -> None:
        """Return once the watchdog has recorded every child started so far."""
        self._send("sync")
        if self.watchdog is not None and self.watchdog.stdout is not None:
            self.watchdog.stdout.readline()

    @property
    def watchdog_pid(self) -> int | None:
        return self.watchdog.pid if self.watchdog else None

    def _send(self, line: str) -> None:
        if self.watchdog is None or self.watchdog.stdin is None:
            return
        try:
            self.watchdog.stdin.write(line + "\n")
            self.watchdog.stdin.flush()
        except OSError:  # the watchdog is gone; the run goes on unguarded
            logger.warning("The run's watchdog (PID %s) has exited", self.watchdog.pid)


def active_guard() -> RunGuard | None:
    return RunGuard._active


def remove_if_run_dies(path: Path) -> None:
    """Have the watchdog delete `path` if this process dies without removing it itself."""
    if RunGuard._active is not None:
        RunGuard._active._send(f"remove {path}")


def guard_run(function: F) -> F:
    """Decorator for a flow function: a watchdog for the run, and, when the run is stopped by a
    signal (Prefect's TerminationSignal, KeyboardInterrupt), every child stopped on the way out."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with RunGuard():
            try:
                return function(*args, **kwargs)
            except Exception:
                raise
            except BaseException:
                stop_children(keep_prefect_server=True)
                raise

    return cast(F, guarded)


def run_with_watchdog(function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Call the flow under a RunGuard; a run stopped by SIGTERM or SIGINT ends the process with
    one line saying so (see exit_stopped)."""
    from prefect.exceptions import TerminationSignal

    def terminate(signum: int, frame: FrameType | None) -> None:  # as Prefect's own handler does, once a flow run exists
        raise TerminationSignal(signum)

    signal.signal(signal.SIGTERM, terminate)
    with RunGuard() as guard:
        try:
            return function(*args, **kwargs)
        except (KeyboardInterrupt, TerminationSignal) as stopped:
            exit_stopped(stopped, guard.flow_run_id)
    raise AssertionError("unreachable: exit_stopped ends the process")


def signal_name(stopped: BaseException) -> str:
    if isinstance(stopped, KeyboardInterrupt):
        return "SIGINT"
    return signal.Signals(getattr(stopped, "signal", signal.SIGTERM)).name


def exit_stopped(stopped: BaseException, flow_run_id: str | None) -> None:
    """End a run stopped by a signal: one line on stderr, no child left, exit 128 + signal.

    `os._exit`, not `sys.exit`: interpreter shutdown joins every worker thread, and a sync
    thread would go on loading rows into the warehouse and commit them.
    """
    name = signal_name(stopped)
    try:  # what Prefect logged about the crash reaches the server before the process ends
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception as exc:  # noqa: BLE001 - the run is ending either way; its state is already recorded
        logger.warning("Could not send the last logs to Prefect: %s", exc)
    stop_children(keep_prefect_server=False)
    if flow_run_id:
        line = f"all-etl stopped by {name}: flow run {flow_run_id} is marked Crashed and its dbt and connector processes were stopped"
    else:
        line = f"all-etl stopped by {name} before its flow run started"
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signal.Signals[name].value)


def _watch(pid: int) -> None:
    """The watchdog's loop: record `pid`'s descendants until it exits; then, unless it said
    `finished` first, stop the recorded ones still alive and remove the folders it named."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the run's terminal is for the run
    me = os.getpid()
    myself = _read_process(me)
    assert myself is not None  # this process is alive
    since = myself.started  # processes older than the watchdog are not the run's
    watched = _read_process(pid)
    recorded: dict[int, Process] = {}
    folders: list[Path] = []
    finished = False
    pending = b""

    def record() -> None:
        for process in descendants(pid):
            if process.pid != me and process.started >= since:
                recorded[process.pid] = process

    while watched is not None and watched.alive:
        record()
        ready, _, _ = select.select([0], [], [], SCAN_SECONDS)
        if not ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the run's end of the pipe closed: it exited
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            verb, _, argument = line.decode().partition(" ")
            if verb == "finished":
                finished = True
            elif verb == "remove":
                folders.append(Path(argument))
            elif verb == "sync":
                record()
                os.write(1, b"synced\n")
    if finished:
        return
    # Re-parented children are found through the recorded ones: add what they started since.
    alive = [process for process in recorded.values() if process.alive]
    for process in list(alive):
        alive += [child for child in descendants(process.pid) if child.pid not in recorded]
    stop(alive)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
