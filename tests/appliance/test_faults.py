"""Faults of the machine under a running all-etl run, on the real compose stack (the shared
session-scoped `stack` fixture): PostgreSQL restarted, the Prefect server restarted, the VM
rebooted (the Docker engine stopped and started again, as systemd does at a reboot).

The promise: the run either completes with the right data, or ends in a final state whose
message names the cause (never left Running, never Completed over half-written data), and the
next run completes. Every test leaves the stack healthy for the tests after it, even when it fails.

Needs root and apt, like every test under tests/appliance/ (see conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.appliance.stack import HERE, TERMINAL, Stack, sh, slowed_worker, wait_stack_healthy

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1200)]

FAKER_USERS = 1000  # `count` of the faker connection in airbyte/connections.yaml


def wait_until_syncing(stack: Stack, run_id: str, timeout: float = 300, state_type: str = "RUNNING") -> None:
    """Until the run's sync-faker task is Running (the connector is reading, mid-run), or has
    just ended (state_type="COMPLETED": the run is creating its update-code and transform runs,
    its busiest moment with the API)."""
    deadline = time.monotonic() + timeout
    while True:
        with stack.api as api:
            tasks = api.post(
                "/task_runs/filter",
                json={
                    "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}},
                    "task_runs": {"name": {"any_": ["sync-faker"]}},
                },
            ).json()
        if any(task["state"]["type"] == state_type for task in tasks):
            return
        state = stack.state(run_id)
        assert state["type"] not in TERMINAL, f"run {run_id} ended before its sync was seen running: {state}"
        assert time.monotonic() < deadline, f"run {run_id}: no running sync-faker after {timeout} s ({state['type']})"
        time.sleep(1)


def wait_state_through_outages(stack: Stack, run_id: str, types: set[str], timeout: float) -> dict:
    """Stack.wait_state, tolerating the API being unreachable for a while (it is restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = stack.state(run_id)
            if state["type"] in types:
                return state
        except httpx.HTTPError as error:
            state = {"type": f"API unreachable ({type(error).__name__})"}
        if time.monotonic() > deadline:
            logs = stack.compose("logs", "--tail", "60", "prefect-worker", check=False).stdout
            raise AssertionError(f"run {run_id} still {state['type']} after {timeout} s: {state}\n{logs}")
        time.sleep(2)


def warehouse_facts(stack: Stack) -> dict:
    """Raw users, and the purchases the daily_revenue mart counted against what the raw tables
    hold now (staging models are views on them): equal unless a mart was built over half a load."""
    out = stack.exec_worker(
        "python",
        "-c",
        """
import duckdb, json
c = duckdb.connect('/var/lib/elt/data/warehouse.duckdb', read_only=True)
one = lambda sql: c.execute(sql).fetchone()[0]
print(json.dumps({
    'raw users': one('select count(*) from raw_faker.users'),
    'purchases in daily_revenue': int(one('select sum(purchase_count) from main_marts.daily_revenue')),
    'purchases in the raw tables': one('select count(*) from main_staging.stg_faker__purchases p join main_staging.stg_faker__products using (product_id) where p.is_purchased'),
    'customer_lifetime_value rows': one('select count(*) from main_marts.customer_lifetime_value'),
}))
""",
    )
    return json.loads(out.strip().splitlines()[-1])


def marts_built(stack: Stack) -> bool:
    return (
        stack.compose(
            "exec",
            "-T",
            "prefect-worker",
            "python",
            "-c",
            "import duckdb; duckdb.connect('/var/lib/elt/data/warehouse.duckdb', read_only=True)"
            ".execute('select 1 from main_marts.daily_revenue limit 1')",
            check=False,
        ).returncode
        == 0
    )


def assert_completed_with_the_right_data(stack: Stack, run_id: str, state: dict) -> None:
    assert state["type"] == "COMPLETED", state
    with stack.api as api:
        children = api.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()
    assert children, f"run {run_id} has no extract-load/update-code/transform runs"
    assert {child["state"]["type"] for child in children} == {"COMPLETED"}, [(c["name"], c["state"]) for c in children]
    facts = warehouse_facts(stack)
    assert facts["raw users"] == FAKER_USERS, facts
    assert facts["purchases in daily_revenue"] == facts["purchases in the raw tables"] > 0, facts
    assert facts["customer_lifetime_value rows"] > 0, facts


def hold_postgres_down(stack: Stack, seconds: float) -> None:
    """PostgreSQL stopped for `seconds` (a slow restart: crash recovery, a big shared_buffers),
    checking all along that the server really answers requests that need the database with 5xx."""
    container = stack.container_ids()["postgres"]
    sh(["docker", "stop", container], timeout=120)
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            with stack.api as api:
                answered = api.post("/flow_runs/count", json={}).status_code
            assert answered >= 500, f"the server answered {answered} with PostgreSQL stopped"
            time.sleep(1)
    finally:
        sh(["docker", "start", container], timeout=120)


def restart_mid_run(stack: Stack, service: str) -> None:
    wait_stack_healthy(stack)
    run_id = stack.start_run()
    wait_until_syncing(stack, run_id, state_type="COMPLETED")
    try:
        if service == "postgres":
            hold_postgres_down(stack, 15)
        else:
            sh(["docker", "restart", stack.container_ids()[service]], timeout=120)
        state = wait_state_through_outages(stack, run_id, TERMINAL, 600)
    finally:
        wait_stack_healthy(stack)
    assert_completed_with_the_right_data(stack, run_id, state)


def test_postgres_restarted_mid_run_the_run_completes_with_the_right_data(stack: Stack) -> None:
    restart_mid_run(stack, "postgres")


def test_prefect_server_restarted_mid_run_the_run_completes_with_the_right_data(stack: Stack) -> None:
    restart_mid_run(stack, "prefect-server")


def dockerd_pid() -> int:
    return int(sh(["pidof", "dockerd"]).stdout.split()[0])


def reboot_docker_engine() -> None:
    """What a reboot does to the stack: systemd stops dockerd (which stops every container, as
    `docker stop` does), the machine comes back and dockerd starts again; nobody runs compose."""
    pid = dockerd_pid()
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    deadline = time.monotonic() + 120
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "dockerd did not stop within 120 s"
        time.sleep(0.5)
    sh(["bash", str(HERE / "install_docker.sh")], timeout=300)


def test_vm_reboot_mid_run_the_stack_comes_back_and_the_scheduled_run_completes(stack: Stack) -> None:
    wait_stack_healthy(stack)
    with stack.api as api:
        deployment = api.get("/deployments/name/all-etl/all-etl").json()
        runs_before = api.post("/flow_runs/count", json={}).json()
    facts_before = warehouse_facts(stack) if marts_built(stack) else None
    with slowed_worker(stack):  # the run still going when the machine goes down
        interrupted = stack.start_run()
        wait_until_syncing(stack, interrupted)
        # A daily schedule whose run comes due while the machine is down.
        due = datetime.now(UTC) + timedelta(seconds=10)
        with stack.api as api:
            created = api.post(
                f"/deployments/{deployment['id']}/schedules",
                json=[
                    {
                        "schedule": {"interval": 86400, "anchor_date": due.isoformat()},
                        "active": True,
                    }
                ],
            )
            created.raise_for_status()
            schedule_id = created.json()[0]["id"]
            api.post(f"/deployments/{deployment['id']}/schedule", json={"max_runs": 1}).raise_for_status()
            scheduled = api.post(
                "/flow_runs/filter",
                json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}},
            ).json()
        soon = (due + timedelta(hours=1)).isoformat()
        due_runs = [run for run in scheduled if run["auto_scheduled"] and run["expected_start_time"] < soon]
        assert len(due_runs) == 1, scheduled
        try:
            reboot_docker_engine()
            wait_stack_healthy(stack)  # by itself: restart: unless-stopped, no compose command
            state = stack.wait_state(interrupted, TERMINAL, 120)
            assert state["type"] == "CRASHED", state
            # Marked by docker/worker_start.py when the worker's container started again: the
            # server stops with the other containers, so the run cannot record its own end.
            assert state["message"] == (
                "The worker restarted during this run (its container or the machine restarted), so the run's "
                "process is gone; marked Crashed by the worker on its start."
            ), state
            state = stack.wait_state(due_runs[0]["id"], TERMINAL, 600)
            assert_completed_with_the_right_data(stack, due_runs[0]["id"], state)
        finally:
            with stack.api as api:
                api.delete(f"/deployments/{deployment['id']}/schedules/{schedule_id}")
                left = api.post(
                    "/flow_runs/filter",
                    json={
                        "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}
                    },
                ).json()
                for run in left:
                    if run["auto_scheduled"]:
                        api.delete(f"/flow_runs/{run['id']}")
            wait_stack_healthy(stack)

    with stack.api as api:
        assert api.get("/deployments/name/all-etl/all-etl").json()["id"] == deployment["id"]
        assert api.post("/flow_runs/count", json={}).json() >= runs_before + 2
        ui = httpx.get(f"http://127.0.0.1:{stack.env['PREFECT_PORT']}/", follow_redirects=True, timeout=30)
    assert ui.status_code == 200 and "<title>Prefect Server</title>" in ui.text
    if facts_before is not None:
        assert warehouse_facts(stack) == facts_before  # the same source, seed and models
