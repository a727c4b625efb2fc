"""`--only-changed` and `elt plan` on the snowflake target, against fakesnow's server (Snowflake's
wire protocol over DuckDB), each build compared with the saved state of the one before: real
dbt-snowflake, real git pulls from a bare remote, real Prefect server, the state kept per target.

What this proves: dbt-snowflake's `source freshness` reads `loaded_at_field`
(`_airbyte_extracted_at`, TIMESTAMP_TZ) through Snowflake's protocol, and its results feed
`source_status:fresher+` against the state saved by the Snowflake build before; `state:modified+`
and the failed-last-run selectors against that state select nothing when nothing changed (they
compare manifests and run results, no warehouse involved: a code change and a failed model are
tested on DuckDB in tests/test_only_changed.py); the state is kept under the snowflake target,
never compared with a DuckDB build's (the fast test below, files only). What only a real account
would show: what the freshness query costs (it resumes the warehouse on every run and every
`elt plan`), Snowflake's own conversions of TIMESTAMP_TZ/LTZ/NTZ loaded-at columns to UTC, and
dbt's metadata-based freshness (LAST_ALTERED, for sources without `loaded_at_field`), which
fakesnow does not have.

The raw tables are written here through the Snowflake connector, in the shape the embedded
backend publishes them (tests/test_snowflake_flow.py runs the real connector into fakesnow):
what a test changes is exactly which rows arrived and when, which a re-sync can't pin down.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elt import dbt_runner, dbt_state, git_repo
from elt.cli import app
from elt.flows import transform
from elt.settings import load_settings
from elt.warehouse_snowflake import SnowflakeCredentials, connect
from tests.conftest import FakesnowServer, GitRemote, PrefectServer

P = "elt_appliance"
RAW = '"ANALYTICS".RAW_FAKER'
MARTS = '"ANALYTICS".DBT_MARTS'


def _snowflake(*statements: tuple[str, list[tuple] | None]) -> list[list]:
    """Run (statement, rows to bind or None) through the Snowflake connector with the appliance's
    login, as the embedded backend does; each statement's result rows."""
    with connect(SnowflakeCredentials.from_settings(load_settings())) as connection:
        cursor = connection.cursor()
        results: list[list] = []
        for statement, rows in statements:
            if rows:
                cursor.executemany(statement, rows)
                results.append([])
            else:
                cursor.execute(statement)
                results.append(cursor.fetchall() if cursor.description else [])
        return results


def _load_raw_snowflake(loaded_at: datetime) -> None:
    """Users 1-20, products 1-5 at 10.00, purchases 1-40 (two per user), all loaded at `loaded_at`."""
    users = (
        "id NUMBER(38,0), name VARCHAR, email VARCHAR, age NUMBER(38,0), gender VARCHAR, nationality VARCHAR, occupation VARCHAR"
    )
    stamps = "created_at TIMESTAMP_TZ, updated_at TIMESTAMP_TZ, _airbyte_extracted_at TIMESTAMP_TZ"
    _snowflake(
        ('create schema if not exists "ANALYTICS".RAW_FAKER', None),
        (f"create or replace table {RAW}.USERS ({users}, {stamps})", None),
        (
            f"insert into {RAW}.USERS values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (i, f"user {i}", f"U{i}@example.com", 30, "x", "NL", "baker", loaded_at, loaded_at, loaded_at)
                for i in range(1, 21)
            ],
        ),
        (
            f"create or replace table {RAW}.PRODUCTS (id NUMBER(38,0), make VARCHAR, model VARCHAR, year NUMBER(38,0),"
            f" price FLOAT, {stamps})",
            None,
        ),
        (
            f"insert into {RAW}.PRODUCTS values (%s, %s, %s, %s, %s, %s, %s, %s)",
            [(i, "make", "model", 2020, 10.0, loaded_at, loaded_at, loaded_at) for i in range(1, 6)],
        ),
        (
            f"create or replace table {RAW}.PURCHASES (id NUMBER(38,0), user_id NUMBER(38,0), product_id NUMBER(38,0),"
            f" added_to_cart_at TIMESTAMP_TZ, purchased_at TIMESTAMP_TZ, returned_at TIMESTAMP_TZ, {stamps})",
            None,
        ),
        (
            f"insert into {RAW}.PURCHASES values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(i, i % 20 + 1, i % 5 + 1, loaded_at, loaded_at, None, loaded_at, loaded_at, loaded_at) for i in range(1, 41)],
        ),
    )


def _pull(remote: GitRemote) -> tuple[Path, str]:
    """What all-etl's update-code does: `git pull` into the checkout; the dbt project's folder and the commit."""
    settings = load_settings()
    source = git_repo.RepoSource.from_settings(settings, str(remote.bare))
    deployed = git_repo.update_code(source)
    return dbt_runner.project_folder(settings, source), deployed.sha


def _build(server: PrefectServer, remote: GitRemote) -> tuple[dict[str, str], list[dict], str]:
    """Pull, then an `--only-changed` transform flow run on the checkout, as all-etl runs it (which
    the CLI run below does whole): {node: status} of what dbt ran, its run-plan rows, the plan's note."""
    folder, commit = _pull(remote)
    state = transform(str(folder), only_changed=True, commit=commit, return_state=True)
    assert state.is_completed(), state.message
    run = state.result()
    assert run.plan is not None
    return (
        {node.unique_id: node.status for node in run.results},
        _plan_rows(server, str(state.state_details.flow_run_id)),
        run.plan.note,
    )


def _plan_rows(server: PrefectServer, transform_run_id: str) -> list[dict]:
    """The run-plan artifact of this transform flow run."""
    (artifact,) = [artifact for artifact in server.artifacts("run-plan") if artifact["flow_run_id"] == transform_run_id]
    data = artifact["data"]
    return data if isinstance(data, list) else json.loads(data)


def _latest_plan_rows(server: PrefectServer) -> list[dict]:
    """The run-plan artifact of the latest transform flow run (the CLI run's)."""
    (latest,) = server.post(
        "/flow_runs/filter", {"flows": {"name": {"any_": ["transform"]}}, "sort": "START_TIME_DESC", "limit": 1}
    ).json()
    return _plan_rows(server, latest["id"])


def _cli(*arguments: str) -> str:
    """`elt <arguments>` as a user types it; its output (exit code 0, else the test fails showing it)."""
    handler = signal.getsignal(signal.SIGTERM)  # the CLI's watchdog installs its own
    try:
        result = CliRunner().invoke(app, list(arguments))
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert result.exit_code == 0, result.output
    return result.output


def _ran(rows: list[dict]) -> set[str]:
    return {row["node"] for row in rows if row["action"] == "run"}


def _reasons(rows: list[dict]) -> dict[str, str]:
    return {row["node"]: row["reason"] for row in rows}


def _models(nodes: set[str] | dict[str, str]) -> set[str]:
    return {node for node in nodes if node.startswith("model.")}


def _marts() -> tuple[tuple, tuple]:
    """(rows, total lifetime value) of customer_lifetime_value and (rows, total net revenue) of daily_revenue."""
    lifetime, revenue = _snowflake(
        (f"select count(*), sum(lifetime_value) from {MARTS}.CUSTOMER_LIFETIME_VALUE", None),
        (f"select count(*), sum(net_revenue) from {MARTS}.DAILY_REVENUE", None),
    )
    return tuple(lifetime[0]), tuple(revenue[0])


@pytest.fixture
def own_raw_tables(snowflake_env: FakesnowServer) -> Iterator[None]:
    """This test's raw tables have fewer columns than source-faker's, and fakesnow is one server
    for the whole session: they are dropped after it, so a later load (test_snowflake_flow)
    creates source-faker's own."""
    yield
    _snowflake(*((f"drop table if exists {RAW}.{table}", None) for table in ("USERS", "PRODUCTS", "PURCHASES")))


@pytest.mark.slow
def test_only_changed_on_snowflake_builds_what_has_new_rows_and_says_why(
    prefect_server: PrefectServer,
    snowflake_env: FakesnowServer,
    own_raw_tables: None,
    appliance_remote: GitRemote,
    appliance_env: Path,
) -> None:
    """One Snowflake warehouse, three builds, each compared with the saved state of the one before:
    1. no saved state of target snowflake: everything built, `never built`;
    2. no new rows (`elt run --only-changed`): everything skipped, `no new data and code unchanged`,
       the run succeeds;
    3. a new user loaded (newer `_airbyte_extracted_at`), and the products' price changed in place
       without a load (a probe: a mart dbt rebuilt shows it, one it skipped does not): `elt plan`
       prints, and the run builds, exactly what faker.users feeds."""
    first_load = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    _load_raw_snowflake(first_load)

    built, rows, note = _build(prefect_server, appliance_remote)
    assert note == "no build of target snowflake saved yet: building everything"
    everything = {row["node"] for row in rows}
    assert {row["reason"] for row in rows} == {"never built"} and _ran(rows) == everything == set(built)
    assert set(built.values()) == {"success", "pass"}
    assert _models(everything) == {
        f"model.{P}.stg_faker__users",
        f"model.{P}.stg_faker__products",
        f"model.{P}.stg_faker__purchases",
        f"model.{P}.customer_lifetime_value",
        f"model.{P}.daily_revenue",
    }
    assert _marts() == ((20, 400), (1, 400))  # two purchases of a 10.00 product per user, all on one day
    states = appliance_env / "data" / "dbt-state"
    commit = _pull(appliance_remote)[1]
    assert sorted(path.name for path in (states / "snowflake" / commit).iterdir()) == [
        "manifest.json",
        "run_results.json",
        "sources.json",
    ]

    output = _cli("run", "--skip-extract", "--only-changed", "--repo", str(appliance_remote.bare))
    assert f"  plan     only changed: 0 built, {len(everything)} skipped\n" in output, output
    assert "  dbt      build: \n" in output, output  # dbt ran nothing
    assert _reasons(_latest_plan_rows(prefect_server)) == dict.fromkeys(everything, "no new data and code unchanged")

    _snowflake(
        (
            f"insert into {RAW}.USERS values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(21, "user 21", "U21@example.com", 30, "x", "NL", "baker", first_load, first_load, datetime.now(UTC))],
        ),
        (f"update {RAW}.PRODUCTS set price = 99", None),
    )
    planned = _elt_plan(appliance_remote)
    built, rows, note = _build(prefect_server, appliance_remote)
    assert note.startswith(f"compared with the build of commit {commit} saved "), note
    assert set(built.values()) == {"success", "pass"}
    assert _models(built) == {f"model.{P}.stg_faker__users", f"model.{P}.customer_lifetime_value"}
    assert _ran(rows) == set(built)
    new_users = f"new rows in source faker.users since {first_load:%Y-%m-%d %H:%M} UTC"
    assert _reasons(rows)[f"model.{P}.stg_faker__users"] == new_users
    assert _reasons(rows)[f"model.{P}.customer_lifetime_value"] == new_users
    assert {_reasons(rows)[node] for node in everything - set(built)} == {"no new data and code unchanged"}
    assert planned == {(row["action"], row["node"], row["reason"]) for row in rows}
    # customer_lifetime_value rebuilt: the new user, and today's price (2 × 99.00 per old user);
    # daily_revenue skipped: still the revenue at the old price.
    assert _marts() == ((21, 20 * 198), (1, 400))


def _elt_plan(remote: GitRemote) -> set[tuple[str, str, str]]:
    """`elt plan` as a user types it, on the checkout the runs deployed: {(action, node, reason)}."""
    *lines, last = _cli("plan", "--repo", str(remote.bare)).strip().splitlines()
    planned = {tuple(line.split(maxsplit=2)) for line in lines}
    runs = sum(action == "run" for action, _, _ in planned)
    assert last.startswith(f"{runs} to run, {len(planned) - runs} to skip: compared with the build of commit "), last
    return planned  # type: ignore[return-value]


def test_the_snowflake_and_duckdb_targets_never_compare_with_each_others_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast, files only (no dbt, no fakesnow): each target's build is kept under its own name, and a
    state saved under the same target name (ELT_DBT_TARGET=prod) by the other warehouse is refused,
    so the next `--only-changed` build builds everything (`never built`), in both directions."""
    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    for name, value in {"SNOWFLAKE_ACCOUNT": "acme-test", "SNOWFLAKE_DATABASE": "ANALYTICS", "SNOWFLAKE_SCHEMA": "DBT"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "project" / "target").mkdir(parents=True)
    (tmp_path / "project" / "dbt_project.yml").write_text("name: p\nprofile: p\n")
    project = dbt_runner.DbtProject.at(tmp_path / "project")

    def save(warehouse: str) -> dbt_state.SavedState:
        monkeypatch.setenv("ELT_WAREHOUSE", warehouse)
        (project.path / "target" / "manifest.json").write_text(json.dumps({"built_in": warehouse}))
        return dbt_state.StateStore(load_settings()).save(project, "c1", with_sources=False)

    def last(warehouse: str) -> tuple[dbt_state.SavedState | None, str]:
        monkeypatch.setenv("ELT_WAREHOUSE", warehouse)
        return dbt_state.StateStore(load_settings()).last()

    snowflake = save("snowflake")
    assert last("duckdb") == (None, "no build of target duckdb saved yet")
    save("duckdb")
    assert last("snowflake") == (snowflake, "")
    assert json.loads(snowflake.file("manifest.json").read_text()) == {"built_in": "snowflake"}

    monkeypatch.setenv("ELT_DBT_TARGET", "prod")
    save("snowflake")
    duckdb_file = tmp_path / "data" / "warehouse.duckdb"
    assert last("duckdb") == (None, f"the saved state of target prod is of Snowflake acme-test ANALYTICS.DBT, not {duckdb_file}")
    save("duckdb")
    assert last("snowflake") == (
        None,
        f"the saved state of target prod is of {duckdb_file}, not Snowflake acme-test ANALYTICS.DBT",
    )
