"""One all-etl run per warehouse: a real flock held by a real second process, and the message a
second run shows; a run whose process died is marked Crashed in a real Prefect server."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from elt import run_lock
from elt.settings import load_settings
from tests.conftest import PrefectServer
from tests.fakes.clock import FakeClock

HOLD_THE_LOCK = """
import sys, time
from elt import run_lock
from elt.settings import load_settings
with run_lock.hold(load_settings(), sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(home: Path, flow_run_id: str) -> subprocess.Popen:
    """Another process holding the run lock of the warehouse under `home`, as a run would."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, flow_run_id],
        env={**os.environ, "ELT_HOME": str(home)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "held\n", "the holder did not take the lock"
    return process


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f}s waiting until {what}")
        time.sleep(0.05)


def test_second_run_on_a_warehouse_fails_naming_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    settings = load_settings()
    first = _holder(tmp_path, "11111111-1111-1111-1111-111111111111")
    try:
        with (
            pytest.raises(run_lock.WarehouseInUse) as refused,
            run_lock.hold(settings, "22222222-2222-2222-2222-222222222222"),
        ):
            pytest.fail("a second run got the lock while the first held it")
        warehouse = tmp_path / "data" / "warehouse.duckdb"
        assert str(refused.value) == (
            f"another all-etl run (flow run 11111111-1111-1111-1111-111111111111, PID {first.pid}) "
            f"is using {warehouse}; wait for it or cancel it"
        )
    finally:
        first.kill()
        first.wait()


def test_snowflake_lock_is_per_database_and_schema(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, warehouse="snowflake", snowflake_account="acme-eu", snowflake_database="ANALYTICS")
    other_schema = load_settings(
        home=tmp_path,
        warehouse="snowflake",
        snowflake_account="acme-eu",
        snowflake_database="ANALYTICS",
        snowflake_schema="STAGING",
    )
    assert run_lock.lock_path(settings) == tmp_path / "data" / "run-locks" / "snowflake-acme-eu-analytics-analytics.lock"
    assert run_lock.lock_path(other_schema) != run_lock.lock_path(settings)
    assert run_lock.warehouse_name(settings) == "Snowflake acme-eu ANALYTICS.ANALYTICS"


def test_lock_is_free_after_its_holder_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock is released by the kernel on kill -9; the next run takes the lock and records itself."""
    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    settings = load_settings()
    holder = _holder(tmp_path, "33333333-3333-3333-3333-333333333333")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    monkeypatch.setattr(run_lock, "mark_crashed", lambda flow_run_id, message: [])  # no Prefect server here
    with run_lock.hold(settings, "44444444-4444-4444-4444-444444444444") as me:
        recorded = json.loads(run_lock.lock_path(settings).read_text())
        assert recorded["flow_run_id"] == "44444444-4444-4444-4444-444444444444" and recorded["pid"] == os.getpid()
        assert me.pid == os.getpid()
    assert run_lock.lock_path(settings).read_text() == "", "a run that ends normally leaves no holder behind"


@pytest.mark.slow
def test_run_whose_process_died_is_marked_crashed(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flow run left Running by a killed process (and its Running child flow run) is set Crashed by
    the next run on the warehouse, with a message saying why; finished runs are left alone."""
    from prefect import flow

    @flow(name="killed-run")
    def killed_run() -> None:
        child_run()

    @flow(name="killed-child")
    def child_run() -> None:
        # Leave both flow runs Running, as a process killed here would: the test plays the dead process.
        from prefect.runtime import flow_run as current

        ids.append(str(current.id))
        ids.append(str(current.parent_flow_run_id))
        raise KeyboardInterrupt

    ids: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        killed_run()
    child_id, parent_id = ids
    for flow_run_id in (child_id, parent_id):
        prefect_server.post(
            f"/flow_runs/{flow_run_id}/set_state", {"state": {"type": "RUNNING"}, "force": True}
        ).raise_for_status()

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    settings = load_settings()
    holder = _holder(tmp_path, parent_id)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock.hold(settings, "55555555-5555-5555-5555-555555555555"):
        pass

    for flow_run_id in (parent_id, child_id):
        state = prefect_server.get(f"/flow_runs/{flow_run_id}").json()["state"]
        assert state["type"] == "CRASHED"
        assert state["message"] == (
            f"The process running this flow run (PID {holder.pid}) died without finishing it; "
            "marked Crashed by the next all-etl run, flow run 55555555-5555-5555-5555-555555555555"
        )


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """run_lock's waits on a clock that moves only when it sleeps."""
    clock = FakeClock()
    monkeypatch.setattr(run_lock, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    return clock


def _lock_file_held_without_a_holder(settings) -> int:
    """The run lock taken (flock on its own descriptor) by a run that has not written itself yet."""
    path = run_lock.lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return descriptor


def test_second_run_waits_for_the_holder_to_write_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder writes its JSON just after taking the lock: the second run waits for it, on a
    fake clock, and names it once written."""
    settings = load_settings(home=tmp_path)
    descriptor = _lock_file_held_without_a_holder(settings)
    clock = _fake_clock(monkeypatch)
    holder = {"flow_run_id": "66666666-6666-6666-6666-666666666666", "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}
    clock.on_sleep(lambda count: count == 3 and os.pwrite(descriptor, json.dumps(holder).encode(), 0))
    try:
        with pytest.raises(run_lock.WarehouseInUse) as refused, run_lock.hold(settings, "77777777-7777-7777-7777-777777777777"):
            pytest.fail("a second run got the lock")
    finally:
        os.close(descriptor)
    assert str(refused.value) == (
        "another all-etl run (flow run 66666666-6666-6666-6666-666666666666, PID 4242) "
        f"is using {tmp_path / 'data' / 'warehouse.duckdb'}; wait for it or cancel it"
    )
    assert clock.sleeps == [0.05] * 3


def test_second_run_names_the_lock_file_when_the_holder_never_writes_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(home=tmp_path)
    descriptor = _lock_file_held_without_a_holder(settings)
    clock = _fake_clock(monkeypatch)
    try:
        with pytest.raises(run_lock.WarehouseInUse) as refused, run_lock.hold(settings, "77777777-7777-7777-7777-777777777777"):
            pytest.fail("a second run got the lock")
    finally:
        os.close(descriptor)
    assert str(refused.value) == (
        f"another all-etl run (see {run_lock.lock_path(settings)}) is using {tmp_path / 'data' / 'warehouse.duckdb'}; "
        "wait for it or cancel it"
    )
    assert sum(clock.sleeps) == pytest.approx(2.0, abs=0.06) and set(clock.sleeps) == {0.05}


def test_a_task_waits_for_a_run_only_as_long_as_it_was_told_then_names_the_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup told to wait 1 s for the run holding the warehouse (fake clock) polls every 0.5 s,
    and is then refused at once: a run that has not written itself yet is named by its lock
    file, without a further wait for its record."""
    settings = load_settings(home=tmp_path)
    descriptor = _lock_file_held_without_a_holder(settings)
    clock = _fake_clock(monkeypatch)
    try:
        with (
            pytest.raises(run_lock.WarehouseInUse) as refused,
            run_lock.hold_for_task(settings, "warehouse backup", wait_seconds=1),
        ):
            pytest.fail("the backup got the lock")
    finally:
        os.close(descriptor)
    assert str(refused.value) == (
        f"another all-etl run (see {run_lock.lock_path(settings)}) still holds {tmp_path / 'data' / 'warehouse.duckdb'} "
        "after 1 s; the warehouse backup did not start: run it again when that ends"
    )
    assert clock.sleeps == [0.5, 0.5]


def test_unreadable_lock_file_is_ignored_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A free lock whose file holds garbage (a disk filled mid-write): the run goes on, saying so."""
    settings = load_settings(home=tmp_path)
    run_lock.lock_path(settings).parent.mkdir(parents=True)
    run_lock.lock_path(settings).write_text('{"flow_run_id": "x"')
    crashed: list[str] = []
    monkeypatch.setattr(run_lock, "mark_crashed", lambda flow_run_id, message: crashed.append(flow_run_id))
    with caplog.at_level(logging.WARNING, logger="elt.run_lock"), run_lock.hold(settings, "88888888-8888-8888-8888-888888888888"):
        pass
    assert crashed == []
    assert [record.getMessage() for record in caplog.records] == ['Ignoring an unreadable run lock: \'{"flow_run_id": "x"\'']
    run_lock.lock_path(settings).write_text('{"who": "unknown fields"}')
    with run_lock.hold(settings, "88888888-8888-8888-8888-888888888888"):
        pass
    assert crashed == []
    caplog.clear()
    run_lock.lock_path(settings).write_bytes(b"\xff\xfe" + b"x" * 300)
    with caplog.at_level(logging.WARNING, logger="elt.run_lock"), run_lock.hold(settings, "88888888-8888-8888-8888-888888888888"):
        pass
    assert crashed == []
    assert caplog.messages == [f"Ignoring an unreadable run lock: {chr(0xFFFD) * 2 + 'x' * 198!r}"]


def test_a_free_lock_is_taken_without_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty lock file (the last run ended normally): taken at once, nothing marked Crashed."""
    settings = load_settings(home=tmp_path)
    run_lock.lock_path(settings).parent.mkdir(parents=True)
    run_lock.lock_path(settings).write_text("")
    clock = _fake_clock(monkeypatch)
    monkeypatch.setattr(run_lock, "mark_crashed", lambda flow_run_id, message: pytest.fail("nothing to mark"))
    with run_lock.hold(settings, "12121212-1212-1212-1212-121212121212"):
        pass
    assert clock.sleeps == []


def _watchdog_process() -> subprocess.Popen:
    """A process whose command line is a run's watchdog's (`python -m elt.processes ...`), still alive."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-m", "elt.processes"])


def test_a_dead_runs_watchdog_is_waited_for_then_its_run_marked_crashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The dead run's watchdog may still be stopping dbt: the next run waits (fake clock) until
    it is gone, then marks the dead run Crashed with the message the UI shows."""
    settings = load_settings(home=tmp_path)
    watchdog = _watchdog_process()
    _wait_until(lambda: b"elt.processes" in Path(f"/proc/{watchdog.pid}/cmdline").read_bytes(), 30, "the watchdog started")
    dead = {"flow_run_id": "99999999-9999-9999-9999-999999999999", "pid": 1234, "started": "x", "watchdog_pid": watchdog.pid}
    run_lock.lock_path(settings).parent.mkdir(parents=True)
    run_lock.lock_path(settings).write_text(json.dumps(dead))
    clock = _fake_clock(monkeypatch)

    def watchdog_ends(count: int) -> None:
        if count == 4:
            watchdog.kill()
            watchdog.wait()

    clock.on_sleep(watchdog_ends)
    crashed: list[tuple[str, str, int]] = []
    monkeypatch.setattr(
        run_lock, "mark_crashed", lambda flow_run_id, message: crashed.append((flow_run_id, message, len(clock.sleeps)))
    )
    with caplog.at_level(logging.WARNING, logger="elt.run_lock"), run_lock.hold(settings, "12121212-1212-1212-1212-121212121212"):
        pass
    assert crashed == [
        (
            "99999999-9999-9999-9999-999999999999",
            "The process running this flow run (PID 1234) died without finishing it; "
            "marked Crashed by the next all-etl run, flow run 12121212-1212-1212-1212-121212121212",
            4,
        )
    ]
    assert clock.sleeps == [0.1] * 4
    assert [record.getMessage() for record in caplog.records] == [
        "The previous all-etl run (flow run 99999999-9999-9999-9999-999999999999, PID 1234) ended without finishing"
    ]


def test_a_watchdog_that_never_ends_is_waited_for_at_most_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(home=tmp_path)
    watchdog = _watchdog_process()
    try:
        _wait_until(lambda: b"elt.processes" in Path(f"/proc/{watchdog.pid}/cmdline").read_bytes(), 30, "the watchdog started")
        dead = {"flow_run_id": "99999999-9999-9999-9999-999999999999", "pid": 1, "started": "x", "watchdog_pid": watchdog.pid}
        run_lock.lock_path(settings).parent.mkdir(parents=True)
        run_lock.lock_path(settings).write_text(json.dumps(dead))
        clock = _fake_clock(monkeypatch)
        crashed: list[str] = []
        monkeypatch.setattr(run_lock, "mark_crashed", lambda flow_run_id, message: crashed.append(flow_run_id))
        with run_lock.hold(settings, "12121212-1212-1212-1212-121212121212"):
            pass
    finally:
        watchdog.kill()
        watchdog.wait()
    assert crashed == ["99999999-9999-9999-9999-999999999999"]
    assert sum(clock.sleeps) == pytest.approx(run_lock.WATCHDOG_WAIT_SECONDS, abs=0.11) and set(clock.sleeps) == {0.1}


def test_a_pid_that_is_no_watchdog_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead run's watchdog PID now belongs to another process (or none): no wait."""
    settings = load_settings(home=tmp_path)
    dead = {"flow_run_id": "99999999-9999-9999-9999-999999999999", "pid": 1, "started": "x", "watchdog_pid": os.getpid()}
    run_lock.lock_path(settings).parent.mkdir(parents=True)
    run_lock.lock_path(settings).write_text(json.dumps(dead))
    clock = _fake_clock(monkeypatch)
    monkeypatch.setattr(run_lock, "mark_crashed", lambda flow_run_id, message: [])
    with run_lock.hold(settings, "12121212-1212-1212-1212-121212121212"):
        pass
    assert clock.sleeps == []


def test_prefect_unreachable_while_marking_the_dead_run_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The dead run's record is history: this run goes on, saying why it could not mark it."""
    settings = load_settings(home=tmp_path)
    dead = {"flow_run_id": "99999999-9999-9999-9999-999999999999", "pid": 1, "started": "x"}
    run_lock.lock_path(settings).parent.mkdir(parents=True)
    run_lock.lock_path(settings).write_text(json.dumps(dead))

    def unreachable(flow_run_id: str, message: str) -> list[str]:
        raise ConnectionError("All connection attempts failed\nsecond line")

    monkeypatch.setattr(run_lock, "mark_crashed", unreachable)
    with (
        caplog.at_level(logging.WARNING, logger="elt.run_lock"),
        run_lock.hold(settings, "12121212-1212-1212-1212-121212121212") as me,
    ):
        assert me.flow_run_id == "12121212-1212-1212-1212-121212121212"
    assert caplog.records[-1].getMessage() == (
        "Could not mark flow run 99999999-9999-9999-9999-999999999999 Crashed: All connection attempts failed"
    )


def _left_running(prefect_server: PrefectServer) -> tuple[str, str, str]:
    """A parent flow run with a child left Running and a child that finished, as a process killed
    during the second child leaves them: (parent, running child, completed child)."""
    from prefect.runtime import flow_run as current

    from prefect import flow

    ids: dict[str, str] = {}

    @flow(name="finished-child")
    def finished_child() -> None:
        ids["completed"] = str(current.id)

    @flow(name="killed-child")
    def killed_child() -> None:
        ids["running"], ids["parent"] = str(current.id), str(current.parent_flow_run_id)
        raise KeyboardInterrupt  # the test plays the dead process

    @flow(name="killed-run")
    def killed_run() -> None:
        finished_child()
        killed_child()

    with pytest.raises(KeyboardInterrupt):
        killed_run()
    for flow_run_id in (ids["running"], ids["parent"]):
        prefect_server.post(
            f"/flow_runs/{flow_run_id}/set_state", {"state": {"type": "RUNNING"}, "force": True}
        ).raise_for_status()
    return ids["parent"], ids["running"], ids["completed"]


class _Warnings(logging.Handler):
    """What run_lock logs (Prefect's logging setup replaces the root handlers pytest's caplog uses)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        run_lock.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        run_lock.logger.removeHandler(self)


def test_mark_crashed_sets_the_unfinished_run_and_children_crashed_and_leaves_the_finished_one(
    prefect_server: PrefectServer,
) -> None:
    """mark_crashed itself against the real Prefect server (the slow test above goes through a killed holder)."""
    parent, running, completed = _left_running(prefect_server)

    with _Warnings() as warnings:
        marked = run_lock.mark_crashed(parent, "the process died")

    assert sorted(marked) == sorted([parent, running])
    assert marked[0] == parent
    states = {run: prefect_server.get(f"/flow_runs/{run}").json()["state"] for run in (parent, running, completed)}
    assert {run: (state["type"], state["message"]) for run, state in states.items()} == {
        parent: ("CRASHED", "the process died"),
        running: ("CRASHED", "the process died"),
        completed: ("COMPLETED", states[completed]["message"]),
    }
    assert warnings == [
        f"Flow run {completed} is already Completed; leaving it so",
        f"Marked flow run(s) {', '.join(marked)} Crashed",
    ]


def test_mark_crashed_leaves_a_finished_run_and_an_unknown_one_alone(prefect_server: PrefectServer) -> None:
    parent, running, completed = _left_running(prefect_server)
    run_lock.mark_crashed(parent, "first")
    unknown = "66666666-6666-6666-6666-666666666666"

    with _Warnings() as warnings:
        assert run_lock.mark_crashed(parent, "again") == []
        assert run_lock.mark_crashed(unknown, "never ran here") == []

    assert prefect_server.get(f"/flow_runs/{parent}").json()["state"]["message"] == "first"
    assert warnings[0] == f"Flow run {parent} is already Crashed; leaving it so"
    assert sorted(warnings[1:3]) == sorted(
        [f"Flow run {running} is already Crashed; leaving it so", f"Flow run {completed} is already Completed; leaving it so"]
    )
    assert warnings[3:] == [f"Flow run {unknown} is not on this Prefect server; nothing to mark"]


def test_a_run_being_cancelled_when_its_process_died_is_marked_crashed(prefect_server: PrefectServer) -> None:
    """The run was Cancelling (cancelled from the UI) when its process was killed, so it never
    reached Cancelled. Prefect's orchestration refuses to take a Cancelling run anywhere but
    Cancelled (EnforceCancellingToCancelledTransition: checked here, unforced, first), so only a
    forced state marks it Crashed; unforced, it would stay Cancelling for ever."""
    parent, cancelling, _ = _left_running(prefect_server)
    prefect_server.post(f"/flow_runs/{cancelling}/set_state", {"state": {"type": "CANCELLING"}, "force": True}).raise_for_status()
    refused = prefect_server.post(f"/flow_runs/{cancelling}/set_state", {"state": {"type": "CRASHED"}})
    assert refused.json()["status"] == "REJECT", refused.json()

    assert sorted(run_lock.mark_crashed(parent, "the process died")) == sorted([parent, cancelling])

    for run in (parent, cancelling):
        state = prefect_server.get(f"/flow_runs/{run}").json()["state"]
        assert (state["type"], state["message"]) == ("CRASHED", "the process died")
