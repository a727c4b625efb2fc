"""The all-etl deployment from prefect/prefect.yaml, run by a real process worker against a real Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import BIN, REPO_ROOT, GitRemote, PrefectServer

pytestmark = pytest.mark.slow


def _run(command: list[str], env: dict[str, str], cwd: Path = REPO_ROOT, timeout: int = 300) -> str:
    completed = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{' '.join(command)}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


def test_worker_picks_up_and_completes_a_deployment_run(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path, faker_connections: Path
) -> None:
    env = prefect_server.env()
    _run(["make", "--no-print-directory", "deploy", f"VENV={BIN.parent}"], env | {"ELT_HOME": str(REPO_ROOT)})

    deployment = prefect_server.get("/deployments/name/all-etl/all-etl").json()
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["work_pool_name"] == "elt"
    assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO_ROOT)

    flow_run = prefect_server.post(f"/deployments/{deployment['id']}/create_flow_run", {}).json()

    worker_env = env | {
        "ELT_HOME": str(appliance_env),
        "ELT_GIT_REPO": str(appliance_remote.bare),
        "ELT_AIRBYTE_CONNECTIONS_FILE": str(faker_connections),
    }
    _run([str(BIN / "prefect"), "worker", "start", "--pool", "elt", "--run-once"], worker_env, cwd=appliance_env, timeout=600)

    deadline = time.monotonic() + 60
    while (state := prefect_server.get(f"/flow_runs/{flow_run['id']}").json()["state"])["type"] not in (
        "COMPLETED",
        "FAILED",
        "CRASHED",
        "CANCELLED",
    ):
        if time.monotonic() > deadline:
            pytest.fail(f"the flow run did not finish within 60 s of the worker's end: {state}")
        time.sleep(1)
    assert state["type"] == "COMPLETED", state
    with duckdb.connect(str(appliance_env / "data" / "warehouse.duckdb"), read_only=True) as warehouse:
        assert warehouse.execute("select count(*) from main_marts.daily_revenue").fetchone()[0] > 0


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_cancelling_the_flow_run_cancels_the_airbyte_jobs_it_started(
    prefect_server: PrefectServer, fake_airbyte, appliance_env: Path
) -> None:
    """Cancel a running all-etl in Prefect: the worker stops the flow process, which cancels its
    Airbyte job (DELETE /jobs/{id}) on the fake Airbyte server (tests/fakes/airbyte_server.py)."""
    connection_id = fake_airbyte.add_connection("endless", outcome="never")
    env = prefect_server.env()
    _run(["make", "--no-print-directory", "deploy", f"VENV={BIN.parent}"], env | {"ELT_HOME": str(REPO_ROOT)})
    deployment = prefect_server.get("/deployments/name/all-etl/all-etl").json()
    flow_run = prefect_server.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        {"parameters": {"skip_pull": True, "skip_transform": True}},
    ).json()

    worker_env = env | {
        "ELT_HOME": str(appliance_env),
        "ELT_AIRBYTE_BACKEND": "server",
        "ELT_AIRBYTE_URL": fake_airbyte.ui_url,
        "ELT_AIRBYTE_CLIENT_ID": "fake-client-id",
        "ELT_AIRBYTE_CLIENT_SECRET": "fake-client-secret",
        "ELT_AIRBYTE_POLL_SECONDS": "0.5",
    }
    # A long-lived worker, as on the appliance (--run-once polls once and exits: a run not ready
    # at that moment would never start). Its output goes to a file: an undrained pipe fills up and
    # blocks the worker and the flow process writing through it.
    worker_log = appliance_env / "worker.log"
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "elt"],
        env=worker_env,
        cwd=appliance_env,
        stdout=worker_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def what_happened() -> str:
        state = prefect_server.get(f"/flow_runs/{flow_run['id']}").json()["state"]
        requests = [(method, path) for method, path, _ in fake_airbyte.requests]
        return f"flow run {state}\nAirbyte requests {requests}\nworker:\n{worker_log.read_text()[-4000:]}"

    def polled() -> bool:
        if fake_airbyte.count("GET", "/jobs/") >= 2:
            return True
        state = prefect_server.get(f"/flow_runs/{flow_run['id']}").json()["state"]
        if worker.poll() is not None or state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            pytest.fail(f"the run or the worker ended before Airbyte was polled: {what_happened()}")
        return False

    try:
        try:
            _wait_for(polled, 300, "the Airbyte job to be polled")
        except AssertionError:
            raise AssertionError(f"no Airbyte poll within 300 s: {what_happened()}") from None
        cancel = prefect_server.post(
            f"/flow_runs/{flow_run['id']}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}
        )
        assert cancel.status_code in (200, 201), cancel.text
        _wait_for(
            lambda: fake_airbyte.jobs_for(connection_id)[-1]["status"] == "cancelled", 120, "the Airbyte job to be cancelled"
        )
        _wait_for(
            lambda: prefect_server.get(f"/flow_runs/{flow_run['id']}").json()["state"]["type"] == "CANCELLED",
            60,
            "the flow run to be Cancelled",
        )
        assert fake_airbyte.count("DELETE", "/jobs/") == 1
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
