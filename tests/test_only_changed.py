"""`--only-changed` and `elt plan` on the appliance's own dbt project (git pulls from a bare remote,
real dbt on real DuckDB, real Prefect server), each build compared with the saved state of the one
before. One `elt run --only-changed` and one `elt plan` from the CLI, as a user types them; the other
builds run the `transform` flow on the checkout `git_repo.update_code` pulled, as all-etl does
(its syncs and summary are tested in tests/test_flows.py; here they would only add minutes).

The raw tables are written here with SQL in the shape source-faker lands them (the end-to-end test in
tests/test_flows.py runs the real connector): what a test changes is exactly which rows arrived and
when (`_airbyte_extracted_at`, the sources' loaded_at_field), which a re-sync can't pin down.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from elt import dbt_runner, git_repo
from elt.cli import app
from elt.dbt_runner import DbtBuildFailed
from elt.flows import transform
from elt.settings import load_settings
from tests.conftest import GitRemote, PrefectServer

pytestmark = pytest.mark.slow

P = "elt_appliance"
PRODUCTS_DOWNSTREAM_MODELS = {f"model.{P}.stg_faker__products", f"model.{P}.daily_revenue", f"model.{P}.customer_lifetime_value"}


def _load_raw(warehouse: Path, loaded_at: datetime) -> None:
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("create schema raw_faker")
        connection.execute(
            "create table raw_faker.users as select range as id, 'user ' || range as name, 'u' || range || '@example.com' as email,"
            " 30 as age, 'x' as gender, 'NL' as nationality, 'baker' as occupation, ?::timestamptz as created_at,"
            " ?::timestamptz as updated_at, ?::timestamptz as _airbyte_extracted_at from range(1, 21)",
            [loaded_at] * 3,
        )
        connection.execute(
            "create table raw_faker.products as select range as id, 'make' as make, 'model' as model, 2020 as year,"
            " 10.0::double as price, ?::timestamptz as created_at, ?::timestamptz as updated_at,"
            " ?::timestamptz as _airbyte_extracted_at from range(1, 6)",
            [loaded_at] * 3,
        )
        connection.execute(
            "create table raw_faker.purchases as select range as id, range % 20 + 1 as user_id, range % 5 + 1 as product_id,"
            " ?::timestamptz as added_to_cart_at, ?::timestamptz as purchased_at, null::timestamptz as returned_at,"
            " ?::timestamptz as created_at, ?::timestamptz as updated_at, ?::timestamptz as _airbyte_extracted_at"
            " from range(1, 41)",
            [loaded_at] * 5,
        )


def _sql(warehouse: Path, statement: str, *parameters: object) -> None:
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute(statement, list(parameters))


def _pull(remote: GitRemote) -> tuple[Path, str]:
    """What all-etl's update-code does: `git pull` into the checkout; the dbt project's folder and the commit."""
    settings = load_settings()
    source = git_repo.RepoSource.from_settings(settings, str(remote.bare))
    deployed = git_repo.update_code(source)
    return dbt_runner.project_folder(settings, source), deployed.sha


def _build(remote: GitRemote) -> tuple[object, dict[str, str], list[dict]]:
    """Pull, then an `--only-changed` transform flow run on the checkout, as all-etl runs it: its
    state, {node: status} of what dbt ran, its run-plan rows."""
    folder, commit = _pull(remote)
    state = transform(str(folder), only_changed=True, commit=commit, return_state=True)
    run = state.result(raise_on_failure=False)
    statuses = {} if isinstance(run, BaseException) else {node.unique_id: node.status for node in run.results}
    return state, statuses, _artifact_rows(str(state.state_details.flow_run_id))


def _cli_run(remote: GitRemote) -> tuple[str, str, list[dict]]:
    """`elt run --only-changed --skip-extract` as a user types it: its output, its summary artifact
    and its run-plan rows."""
    handler = signal.getsignal(signal.SIGTERM)  # the CLI's watchdog installs its own
    try:
        result = CliRunner().invoke(app, ["run", "--skip-extract", "--only-changed", "--repo", str(remote.bare)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert result.exit_code == 0, result.output
    assert _server is not None
    (latest,) = _server.post(
        "/flow_runs/filter", {"flows": {"name": {"any_": ["all-etl"]}}, "sort": "START_TIME_DESC", "limit": 1}
    ).json()
    return result.output, _summary(latest["id"]), _plan_rows(latest["id"])


_server: PrefectServer | None = None


def _plan_rows(flow_run_id: str) -> list[dict]:
    """The run-plan artifact of the transform under this all-etl run."""
    assert _server is not None
    flows = _server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["transform"]}}}).json()
    for run in flows:
        task = _server.get(f"/task_runs/{run['parent_task_run_id']}").json() if run["parent_task_run_id"] else {}
        if task.get("flow_run_id") == flow_run_id:
            return _artifact_rows(run["id"])
    pytest.fail(f"no transform run under {flow_run_id}")


def _artifact_rows(transform_run_id: str) -> list[dict]:
    """The run-plan artifact of this transform flow run."""
    assert _server is not None
    (artifact,) = [artifact for artifact in _server.artifacts("run-plan") if artifact["flow_run_id"] == transform_run_id]
    data = artifact["data"]
    return data if isinstance(data, list) else json.loads(data)


def _ran(rows: list[dict]) -> set[str]:
    return {row["node"] for row in rows if row["action"] == "run"}


def _reasons(rows: list[dict]) -> dict[str, str]:
    return {row["node"]: row["reason"] for row in rows}


def test_only_changed_builds_what_has_new_rows_new_code_or_failed_and_says_why(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path
) -> None:
    """One warehouse, six builds, each compared with the build before:
    1. no saved state: everything is built, `never built`;
    2. nothing new (`elt run --only-changed`): everything skipped, `no new data and code unchanged`,
       the run succeeds and says so in its output and summary;
    3. new rows in faker.products: exactly what it feeds is built;
    4. stg_faker__users' SQL changed in a commit pulled by the run: it and what it feeds;
    5. new purchases while raw_faker.purchases lacks a column: stg_faker__purchases errors, the run Fails;
    6. the column back, no new rows, same code: the failed model and what it skipped are rebuilt
       (`failed last run`, `skipped last run`); `elt plan` before it printed exactly that."""
    global _server
    _server = prefect_server
    warehouse = appliance_env / "data" / "warehouse.duckdb"
    warehouse.parent.mkdir(parents=True)
    first_load = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    _load_raw(warehouse, first_load)

    state, built, rows = _build(appliance_remote)
    assert state.is_completed(), state.message
    everything = {row["node"] for row in rows}
    assert {row["reason"] for row in rows} == {"never built"} and _ran(rows) == everything == set(built)
    assert {node for node in everything if node.startswith("model.")} == PRODUCTS_DOWNSTREAM_MODELS | {
        f"model.{P}.stg_faker__users",
        f"model.{P}.stg_faker__purchases",
    }
    saved = sorted(path.name for path in (appliance_env / "data" / "dbt-state" / "duckdb").iterdir())
    assert saved == [_pull(appliance_remote)[1], "last-successful.json"]
    assert sorted(path.name for path in (appliance_env / "data" / "dbt-state" / "duckdb" / saved[0]).iterdir()) == [
        "manifest.json",
        "run_results.json",
        "sources.json",
    ]

    output, summary, rows = _cli_run(appliance_remote)
    assert f"  plan     only changed: 0 built, {len(everything)} skipped\n" in output, output
    assert f"`--only-changed`: 0 node(s) built, {len(everything)} skipped (the run-plan artifact says why)" in summary
    assert "  dbt      build: \n" in output, output  # dbt ran nothing
    assert _reasons(rows) == dict.fromkeys(everything, "no new data and code unchanged")

    _sql(warehouse, "insert into raw_faker.products select 6, 'make', 'model', 2021, 20.0, now(), now(), now()")
    state, built, rows = _build(appliance_remote)
    assert state.is_completed(), state.message
    assert _ran(rows) == set(built)
    assert {node for node in built if node.startswith("model.")} == PRODUCTS_DOWNSTREAM_MODELS
    assert f"test.{P}.unique_stg_faker__users_user_id.{_suffix(rows, 'unique_stg_faker__users_user_id')}" not in built
    assert (
        _reasons(rows)[f"model.{P}.daily_revenue"] == f"new rows in source faker.products since {first_load:%Y-%m-%d %H:%M} UTC"
    )
    assert _reasons(rows)[f"model.{P}.stg_faker__users"] == "no new data and code unchanged"

    users_sql = (appliance_remote.author_clone / "dbt/models/staging/faker/stg_faker__users.sql").read_text()
    appliance_remote.commit(
        "dbt/models/staging/faker/stg_faker__users.sql", users_sql.replace("email,", "lower(email) as email,"), "lower emails"
    )
    state, built, rows = _build(appliance_remote)
    assert state.is_completed(), state.message
    assert {node for node in built if node.startswith("model.")} == {
        f"model.{P}.stg_faker__users",
        f"model.{P}.customer_lifetime_value",
    }
    assert _ran(rows) == set(built)
    assert _reasons(rows)[f"model.{P}.customer_lifetime_value"] == "modified"
    assert _reasons(rows)[f"model.{P}.daily_revenue"] == "no new data and code unchanged"

    # New purchases while the loader dropped a column the staging model reads: the model errors.
    _sql(warehouse, "alter table raw_faker.purchases drop column returned_at")
    _sql(
        warehouse,
        "insert into raw_faker.purchases (id, user_id, product_id, added_to_cart_at, purchased_at, created_at, updated_at,"
        " _airbyte_extracted_at) select 41, 1, 1, now(), now(), now(), now(), now()",
    )
    state, built, rows = _build(appliance_remote)
    assert state.is_failed()
    with pytest.raises(
        DbtBuildFailed, match=rf"^dbt build failed on 1 node\(s\): model\.{P}\.stg_faker__purchases \(error: .*returned_at"
    ):
        state.result()
    assert _reasons(rows)[f"model.{P}.stg_faker__purchases"].startswith("new rows in source faker.purchases since ")

    _sql(warehouse, "alter table raw_faker.purchases add column returned_at timestamptz")  # no new rows: same load time
    planned = _elt_plan(appliance_remote)
    state, built, rows = _build(appliance_remote)
    assert state.is_completed(), state.message
    assert {node for node in built if node.startswith("model.")} == {
        f"model.{P}.stg_faker__purchases",
        f"model.{P}.daily_revenue",
        f"model.{P}.customer_lifetime_value",
    }
    assert _ran(rows) == set(built)
    assert _reasons(rows)[f"model.{P}.stg_faker__purchases"] == "failed last run"
    assert _reasons(rows)[f"model.{P}.daily_revenue"] == "skipped last run"  # dbt skipped it: its upstream failed
    assert _reasons(rows)[f"model.{P}.stg_faker__products"] == "no new data and code unchanged"
    assert planned == {(row["action"], row["node"], row["reason"]) for row in rows}
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        # user 1 had purchases 20 and 40; purchase 41 reached the mart rebuilt in this run
        assert connection.execute(
            "select purchase_count from main_marts.customer_lifetime_value where user_id = 1"
        ).fetchone() == (3,)


def _suffix(rows: list[dict], name: str) -> str:
    (node,) = [row["node"] for row in rows if row["node"].startswith(f"test.{P}.{name}.")]
    return node.rsplit(".", 1)[1]


def _summary(flow_run_id: str) -> str:
    assert _server is not None
    (artifact,) = [artifact for artifact in _server.artifacts("all-etl-summary") if artifact["flow_run_id"] == flow_run_id]
    return artifact["data"]


def _elt_plan(remote: GitRemote) -> set[tuple[str, str, str]]:
    """`elt plan` as a user types it, on the checkout the runs deployed: {(action, node, reason)}."""
    result = CliRunner().invoke(app, ["plan", "--repo", str(remote.bare)])
    assert result.exit_code == 0, result.output
    *lines, last = result.output.strip().splitlines()
    planned = {tuple(line.split(maxsplit=2)) for line in lines}
    runs = sum(action == "run" for action, _, _ in planned)
    assert last.startswith(f"{runs} to run, {len(planned) - runs} to skip: compared with the build of commit "), last
    return planned  # type: ignore[return-value]
