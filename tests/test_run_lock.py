"""One all-etl run per warehouse: a real flock held by a real second process, and the message a
second run shows; a run whose process died is marked Crashed in a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elt import run_lock
from elt.settings import load_settings
from tests.conftest import PrefectServer

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
