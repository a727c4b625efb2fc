"""all-etl against a real Prefect server, real PyAirbyte connectors, real dbt and DuckDB, real git remotes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from elt.cli import app
from elt.dbt_runner import DbtBuildFailed
from elt.extract.base import ExtractFailed
from elt.flows import all_etl, transform
from tests.conftest import BIN, TINY_PROJECT, GitRemote, PrefectServer, git, make_remote

pytestmark = pytest.mark.slow


def _artifact(server: PrefectServer, key: str, flow_run_id: str | None = None) -> dict:
    artifacts = server.artifacts(key)
    if flow_run_id:
        artifacts = [artifact for artifact in artifacts if artifact["flow_run_id"] == flow_run_id]
    assert artifacts, f"no '{key}' artifact"
    return artifacts[0]


def _elt_run(prefect_server: PrefectServer, home: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`elt run` as a user runs it, in `home`, against the session's Prefect server; it must succeed."""
    completed = subprocess.run(
        [str(BIN / "elt"), "run", *arguments],
        env=prefect_server.env() | {"ELT_HOME": str(home)},
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    return completed


def test_cli_runs_all_etl_end_to_end(prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path) -> None:
    """`elt run`: source-faker → DuckDB → git clone → dbt build; marts have rows, every dbt test passes,
    and the run's artifacts show rows per stream, the commit SHA and per-node results."""
    completed = _elt_run(prefect_server, appliance_env, "--repo", str(appliance_remote.bare), "--branch", "main")
    sha = git("rev-parse", "HEAD", cwd=appliance_remote.author_clone)
    assert "all-etl completed" in completed.stdout
    assert sha in completed.stdout
    assert "main_marts.customer_lifetime_value" in completed.stdout

    with duckdb.connect(str(appliance_env / "data" / "warehouse.duckdb"), read_only=True) as warehouse:
        assert warehouse.execute("select count(*) from raw_faker.users").fetchone()[0] == 200
        assert warehouse.execute("select count(*) from main_marts.customer_lifetime_value").fetchone()[0] == 200
        assert warehouse.execute("select count(*) from main_marts.daily_revenue").fetchone()[0] > 0

    summary = _artifact(prefect_server, "all-etl-summary")
    assert sha in summary["data"] and "faker.users" in summary["data"]
    nodes = _artifact(prefect_server, "dbt-node-results")["data"]
    rows = nodes if isinstance(nodes, list) else json.loads(nodes)
    statuses = {row["node"]: row["status"] for row in rows}
    assert statuses["model.elt_appliance.customer_lifetime_value"] == "success"
    assert {status for node, status in statuses.items() if node.startswith("test.")} == {"pass"}
    extract_rows = _artifact(prefect_server, "extract-load-results")["data"]
    assert "purchases" in str(extract_rows)


@pytest.mark.parametrize(
    ("dbt_start", "events"),
    [
        (None, ["dbt process started early", "sync faker starts", "sync faker ends"]),
        ("after-syncs", ["sync faker starts", "sync faker ends", "dbt process started early"]),
    ],
)
def test_dbts_process_starts_with_the_embedded_syncs_or_after_them_and_the_transform_uses_it(
    prefect_server: PrefectServer,
    appliance_remote: GitRemote,
    appliance_env: Path,
    run_events: list[str],
    monkeypatch: pytest.MonkeyPatch,
    dbt_start: str | None,
    events: list[str],
) -> None:
    """By default dbt's process starts with the embedded syncs (its import overlaps them); with
    ELT_DBT_START=after-syncs, when they end (its ~150 MB not beside the connector's and
    PyAirbyte's). Either way the transform takes that process over: one dbt process in the run."""
    if dbt_start:
        monkeypatch.setenv("ELT_DBT_START", dbt_start)
    state = all_etl(repo=str(appliance_remote.bare), return_state=True)
    assert state.is_completed()
    assert run_events == events


def test_a_second_run_names_its_incremental_streams_with_elts_way_to_a_full_refresh(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path
) -> None:
    """What `elt run` prints, as the user reads it: from the second sync on, PyAirbyte's own
    notice would tell them to pass `force_full_refresh=True` to `airbyte.read()`."""
    outputs = []
    for _ in range(2):
        completed = _elt_run(prefect_server, appliance_env, "--repo", str(appliance_remote.bare), "--skip-transform")
        outputs.append(completed.stdout + completed.stderr)

    assert "force_full_refresh" not in outputs[1]
    assert (
        "connection 'faker': incremental streams products, purchases, users (a full refresh: `elt run "
        "--full-refresh`, or all-etl's full_refresh parameter)"
    ) in outputs[1]


def test_cli_run_loads_settings_once_and_passes_its_flags_as_flow_parameters(
    prefect_server: PrefectServer, tiny_remote: GitRemote, appliance_env: Path, settings_loads: list[dict]
) -> None:
    """`elt run --target ci` in this process: the settings are loaded once (the CLI's check; the flow
    and its child flows use that object), and --target reaches the flow run's parameters and dbt
    without being written into os.environ."""
    handler = signal.getsignal(signal.SIGTERM)  # the CLI's watchdog installs its own
    try:
        result = CliRunner().invoke(app, ["run", "--skip-extract", "--repo", str(tiny_remote.bare), "--target", "ci"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert result.exit_code == 0, result.output
    assert "all-etl completed" in result.output
    assert len(settings_loads) == 1, settings_loads
    assert "ELT_DBT_TARGET" not in os.environ
    response = prefect_server.post(
        "/flow_runs/filter", {"flows": {"name": {"any_": ["all-etl"]}}, "sort": "START_TIME_DESC", "limit": 1}
    )
    assert response.json()[0]["parameters"]["dbt_target"] == "ci"
    (run_results,) = (appliance_env / "data" / "repos").glob("*/dbt/target/run_results.json")
    assert json.loads(run_results.read_text())["args"]["target"] == "ci"


def test_failing_model_fails_the_run_and_names_the_node(
    prefect_server: PrefectServer, tiny_remote: GitRemote, appliance_env: Path
) -> None:
    tiny_remote.commit("dbt/models/broken.sql", "select missing_column from {{ ref('orders') }}\n", "break a model")
    state = all_etl(skip_extract=True, repo=str(tiny_remote.bare), return_state=True)
    assert state.is_failed()
    with pytest.raises(DbtBuildFailed, match=r"model\.tiny_shop\.broken .*missing_column"):
        state.result()
    summary = _artifact(prefect_server, "all-etl-summary", str(state.state_details.flow_run_id))
    assert "model.tiny_shop.broken" in summary["data"]


def test_failed_extract_fails_the_run_and_skips_what_it_feeds(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path, faker_connections: Path
) -> None:
    """A connector that fails fails extract-load and all-etl; dbt builds nothing downstream of its sources."""
    faker_connections.write_text(faker_connections.read_text().replace("count: 200", "count: not-a-number"))
    state = all_etl(repo=str(appliance_remote.bare), return_state=True)
    assert state.is_failed()
    with pytest.raises(ExtractFailed, match=r"^1 of 1 connections failed to sync: faker"):
        state.result()
    summary = _artifact(prefect_server, "all-etl-summary", str(state.state_details.flow_run_id))["data"]
    assert "`dbt build`: \n" in summary, summary  # dbt ran, and every node of the project is downstream of faker
    assert "## Marts" not in summary
    assert not any(schema.endswith(("staging", "marts")) for schema in _schemas(appliance_env / "data" / "warehouse.duckdb"))


def _schemas(warehouse: Path) -> set[str]:
    """The warehouse's schemas; none when nothing ever opened it (the file is created on first use)."""
    if not warehouse.exists():
        return set()
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return {row[0] for row in connection.execute("select schema_name from information_schema.schemata").fetchall()}


def test_bad_connections_file_is_one_line_from_the_cli(appliance_env: Path, faker_connections: Path) -> None:
    faker_connections.write_text(faker_connections.read_text().replace("streams:", "stream:"))
    completed = subprocess.run([str(BIN / "elt"), "run"], cwd=appliance_env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    error = completed.stderr.strip()
    assert len(error.splitlines()) == 1
    assert str(faker_connections) in error and "connection 'faker'" in error and "stream" in error


def test_retry_of_all_etl_runs_dbt_retry(prefect_server: PrefectServer, tmp_path: Path, appliance_env: Path) -> None:
    """On the parent's second attempt the transform runs `dbt retry`: only the failed node is rebuilt."""
    project = tmp_path / "flaky_project"
    shutil.copytree(TINY_PROJECT, project)
    (project / "models" / "flaky.sql").write_text("select * from {{ target.schema }}.created_after_first_run\n")
    with (project / "dbt_project.yml").open("a") as config:
        config.write(
            'on-run-end:\n  - "create table if not exists {{ target.schema }}.created_after_first_run as select 1 as id"\n'
        )
    (tmp_path / "flaky").mkdir()
    remote = make_remote(tmp_path / "flaky", project)
    flow = all_etl.with_options(retries=1, retry_delay_seconds=0)
    state = flow(skip_extract=True, repo=str(remote.bare), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.dbt_run.command == "retry"
    rebuilt = [node.unique_id for node in summary.dbt_run.results if not node.unique_id.startswith("operation.")]
    assert rebuilt == ["model.tiny_shop.flaky"]


def test_transform_installs_packages_first(prefect_server: PrefectServer, tmp_path: Path, appliance_env: Path) -> None:
    """A project with packages.yml gets `dbt deps` before `dbt build` (a local package: no network)."""
    package = tmp_path / "greetings_pkg"
    (package / "macros").mkdir(parents=True)
    (package / "dbt_project.yml").write_text("name: greetings\nversion: '1.0.0'\nconfig-version: 2\n")
    (package / "macros" / "hello.sql").write_text("{% macro hello() %}'hello'{% endmacro %}\n")
    project = tmp_path / "project"
    shutil.copytree(TINY_PROJECT, project)
    (project / "packages.yml").write_text(f"packages:\n  - local: {package}\n")
    (project / "models" / "greeting.sql").write_text("select {{ greetings.hello() }} as greeting\n")

    run = transform(str(project))
    statuses = {node.unique_id: node.status for node in run.results}
    assert statuses["model.tiny_shop.greeting"] == "success"
    assert (project / "dbt_packages" / "greetings").exists()
