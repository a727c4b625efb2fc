"""Environments: environments/<name>.env over .env, each with its own branch, data folder and
warehouse. Real settings loading, the real `elt doctor`, and real all-etl runs (real dbt on real
DuckDB, a real git remote with a staging and a main branch) against a real Prefect server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from elt.cli import app
from elt.errors import ConfigurationError
from elt.settings import load_settings
from tests.conftest import BIN, REPO_ROOT, GitRemote, PrefectServer, git


def _environment(home: Path, name: str, content: str) -> Path:
    path = home / "environments" / f"{name}.env"
    path.parent.mkdir(exist_ok=True)
    path.write_text(content)
    return path


def test_an_environment_overlays_env_and_never_shares_the_default_warehouse(
    appliance_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker container sets ELT_DATA_DIR and ELT_DUCKDB_PATH for the default: an environment
    whose file does not name its own gets a folder of its own under the data folder instead."""
    monkeypatch.setenv("ELT_DATA_DIR", str(appliance_env / "worker-data"))
    monkeypatch.setenv("ELT_DUCKDB_PATH", str(appliance_env / "worker-data" / "warehouse.duckdb"))
    (appliance_env / ".env").write_text("ELT_GIT_BRANCH=main\nELT_DBT_THREADS=2\n")
    _environment(appliance_env, "staging", "ELT_GIT_BRANCH=staging\nELT_DBT_TARGET=duckdb\nCRM_TOKEN=staging-token\n")
    monkeypatch.chdir(appliance_env)

    staging = load_settings(env="staging")
    assert staging.env == "staging"
    assert staging.git_branch == "staging" and staging.dbt_threads == 2 and staging.dbt_target == "duckdb"
    assert staging.path(staging.data_dir) == appliance_env / "worker-data" / "environments" / "staging"
    assert staging.path(staging.duckdb_path) == appliance_env / "worker-data" / "environments" / "staging" / "warehouse.duckdb"
    assert staging.environment()["CRM_TOKEN"] == "staging-token"

    default = load_settings()
    assert default.env is None and default.git_branch == "main"
    assert default.path(default.duckdb_path) == appliance_env / "worker-data" / "warehouse.duckdb"

    monkeypatch.setenv("ELT_ENV", "staging")
    assert load_settings().git_branch == "staging"


def test_an_environment_file_may_name_its_own_warehouse_and_data_folder(appliance_env: Path) -> None:
    _environment(appliance_env, "prod", f"ELT_DATA_DIR={appliance_env}/prod-data\nELT_DUCKDB_PATH={appliance_env}/prod.duckdb\n")
    prod = load_settings(env="prod")
    assert prod.path(prod.data_dir) == appliance_env / "prod-data"
    assert prod.path(prod.duckdb_path) == appliance_env / "prod.duckdb"


def test_an_unknown_environment_is_refused_naming_the_file_and_those_defined(appliance_env: Path) -> None:
    _environment(appliance_env, "prod", "")
    _environment(appliance_env, "staging", "")
    with pytest.raises(ConfigurationError) as refused:
        load_settings(env="stagign")
    assert str(refused.value) == (
        f"ELT_ENV=stagign: {appliance_env / 'environments' / 'stagign.env'} does not exist "
        "(environments defined: prod, staging); create it or choose another"
    )


def test_a_misspelled_setting_in_an_environment_file_is_refused_naming_the_file(appliance_env: Path) -> None:
    path = _environment(appliance_env, "staging", "ELT_GIT_BRANC=staging\n")
    with pytest.raises(ConfigurationError) as refused:
        load_settings(env="staging")
    assert str(refused.value) == f"{path}: ELT_GIT_BRANC: unknown setting(s) (every setting is listed in .env.example)"


def test_doctor_names_two_environments_that_share_a_warehouse(appliance_env: Path) -> None:
    shared = appliance_env / "one.duckdb"
    _environment(appliance_env, "prod", f"ELT_DUCKDB_PATH={shared}\n")
    _environment(appliance_env, "staging", f"ELT_DUCKDB_PATH={shared}\n")
    completed = subprocess.run(
        [str(BIN / "elt"), "doctor", "--env", "staging"],
        cwd=appliance_env,
        env={**os.environ, "ELT_HOME": str(appliance_env)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    lines = completed.stdout.splitlines()
    assert any(line.startswith("ok   settings: environment staging (") for line in lines), completed.stdout
    assert "FAIL environments: 1 problem(s) in environments/:" in lines
    assert (
        f"       - environment prod and environment staging share the warehouse {shared}: "
        "give each its own in environments/<name>.env" in lines
    )


def _marker(warehouse: Path) -> str:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return connection.execute("select branch from main_marts.marker").fetchone()[0]


def _files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


@pytest.mark.slow
def test_each_environment_builds_its_branch_into_its_warehouse_and_a_merge_reaches_prod(
    prefect_server: PrefectServer, tiny_remote: GitRemote, appliance_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """staging builds the staging branch, prod (main) its own; the staging run touches no file of
    prod's data folder or warehouse; staging merged into main is what prod's next run builds."""
    tiny_remote.commit("dbt/models/marker.sql", "select 'main' as branch\n", "marker on main")
    author = tiny_remote.author_clone
    git("checkout", "-q", "-b", "staging", cwd=author)
    (author / "dbt" / "models" / "marker.sql").write_text("select 'staging' as branch\n")
    git("commit", "-qam", "marker on staging", cwd=author)
    git("push", "-q", "origin", "staging", cwd=author)
    for name, branch in (("staging", "staging"), ("prod", "main")):
        _environment(appliance_env, name, f"ELT_GIT_REPO={tiny_remote.bare}\nELT_GIT_BRANCH={branch}\n")
    monkeypatch.chdir(appliance_env)
    data = appliance_env / "data" / "environments"

    def run(env: str) -> None:
        handler = signal.getsignal(signal.SIGTERM)  # the CLI's watchdog installs its own
        try:
            result = CliRunner().invoke(app, ["run", "--skip-extract", "--env", env])
        finally:
            signal.signal(signal.SIGTERM, handler)
        assert result.exit_code == 0, result.output

    run("prod")
    prod_files = {path: path.stat().st_mtime_ns for path in _files(data / "prod")}
    assert _marker(data / "prod" / "warehouse.duckdb") == "main"
    run("staging")
    assert _marker(data / "staging" / "warehouse.duckdb") == "staging"
    assert {path: path.stat().st_mtime_ns for path in _files(data / "prod")} == prod_files, "staging touched prod's files"
    assert not (appliance_env / "data" / "warehouse.duckdb").exists(), "a run used the default warehouse"

    git("checkout", "-q", "main", cwd=author)
    git("merge", "-q", "--no-ff", "-m", "promote staging", "staging", cwd=author)
    git("push", "-q", "origin", "main", cwd=author)
    run("prod")
    assert _marker(data / "prod" / "warehouse.duckdb") == "staging"
    response = prefect_server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["all-etl"]}}, "sort": "START_TIME_DESC"})
    assert [flow_run["parameters"]["env"] for flow_run in response.json()[:3]] == ["prod", "staging", "prod"]


@pytest.mark.slow
def test_elt_deploy_makes_one_deployment_per_environment_whose_runs_use_it(
    prefect_server: PrefectServer, tiny_remote: GitRemote, appliance_env: Path
) -> None:
    """`elt deploy` (what `make deploy` and setup.sh run) against a real server: all-etl/prod and
    all-etl/staging, each with its env parameter and a concurrency limit of its own; a schedule
    made on one survives a redeploy; a real process worker runs the staging deployment into
    staging's warehouse."""
    (appliance_env / "prefect").mkdir()
    shutil.copy(REPO_ROOT / "prefect" / "prefect.yaml", appliance_env / "prefect" / "prefect.yaml")
    for name in ("prod", "staging"):
        _environment(appliance_env, name, f"ELT_GIT_REPO={tiny_remote.bare}\n")
    env = prefect_server.env() | {"ELT_HOME": str(appliance_env)}
    deployed = subprocess.run(
        [str(BIN / "elt"), "deploy"], env=env, cwd=appliance_env, capture_output=True, text=True, timeout=300
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert deployed.stdout.splitlines() == ["deployed all-etl/prod", "deployed all-etl/staging"]

    deployments = {name: prefect_server.get(f"/deployments/name/all-etl/{name}").json() for name in ("prod", "staging")}
    for name, deployment in deployments.items():
        assert deployment["parameters"] == {"env": name}
        assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployments["prod"]["global_concurrency_limit"]["id"] != deployments["staging"]["global_concurrency_limit"]["id"]
    staging_id = deployments["staging"]["id"]
    added = prefect_server.post(f"/deployments/{staging_id}/schedules", [{"schedule": {"interval": 86400}, "active": False}])
    assert added.status_code == 201, added.text
    again = subprocess.run([str(BIN / "elt"), "deploy"], env=env, cwd=appliance_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    schedules = prefect_server.get(f"/deployments/{staging_id}").json()["schedules"]
    assert [schedule["schedule"]["interval"] for schedule in schedules] == [86400.0]

    flow_run = prefect_server.post(f"/deployments/{staging_id}/create_flow_run", {"parameters": {"skip_extract": True}}).json()
    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "elt", "--run-once"],
        env=env,
        cwd=appliance_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert prefect_server.get(f"/flow_runs/{flow_run['id']}").json()["state"]["type"] == "COMPLETED"
    with duckdb.connect(
        str(appliance_env / "data" / "environments" / "staging" / "warehouse.duckdb"), read_only=True
    ) as warehouse:
        assert warehouse.execute("select count(*) from main_marts.customer_totals").fetchone()[0] > 0
    assert not (appliance_env / "data" / "environments" / "prod").exists()
