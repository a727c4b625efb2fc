"""all-etl on the snowflake target, against fakesnow's server (Snowflake's wire protocol over DuckDB).

What this proves: the appliance's settings drive both snowflake-connector-python and an
unmodified dbt-snowflake (profile rendered under the project's profile name, a password with
'@', ':' and '/' passed intact); the embedded backend publishes PyAirbyte's rows to Snowflake;
the project's SQL builds and its tests pass on the snowflake target. What only a real account
would show: grants and roles (fakesnow has none), warehouse sizing and cost, PUT/COPY-based
loading, and Snowflake's exact type coercions. The project has no incremental models or
snapshots, the parts fakesnow 0.12 can't run a second time (temporary relations, MERGE).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from elt.flows import all_etl
from tests.conftest import BIN, FakesnowServer, GitRemote, PrefectServer

pytestmark = pytest.mark.slow


def test_all_etl_into_snowflake(
    prefect_server: PrefectServer, snowflake_env: FakesnowServer, appliance_remote: GitRemote, appliance_env: Path
) -> None:
    import snowflake.connector

    # Another project's table in the same marts schema: not this run's, so not in its summary.
    with snowflake.connector.connect(
        user="x", password="x", account="x", host="127.0.0.1", port=snowflake_env.port, protocol="http"
    ) as connection:
        connection.cursor().execute("create database if not exists ANALYTICS")
        connection.cursor().execute("create schema if not exists ANALYTICS.DBT_MARTS")
        connection.cursor().execute("create or replace table ANALYTICS.DBT_MARTS.OTHER_PROJECTS_TABLE as select 1 as id")
    state = all_etl(repo=str(appliance_remote.bare), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.extract.rows_per_stream["faker.users"] == 200
    # `dbt source freshness` ran on fakesnow: its freshness query (max(_airbyte_extracted_at)) works there.
    assert [(source.source, source.status) for source in summary.dbt_run.freshness] == [
        ("faker.products", "pass"),
        ("faker.purchases", "pass"),
        ("faker.users", "pass"),
    ]
    statuses = {node.unique_id: node.status for node in summary.dbt_run.results}
    assert statuses["model.elt_appliance.customer_lifetime_value"] == "success"
    assert {status for node, status in statuses.items() if node.startswith("test.")} == {"pass"}
    assert set(summary.mart_rows) == {"ANALYTICS.DBT_MARTS.CUSTOMER_LIFETIME_VALUE", "ANALYTICS.DBT_MARTS.DAILY_REVENUE"}
    assert summary.mart_rows["ANALYTICS.DBT_MARTS.CUSTOMER_LIFETIME_VALUE"] == 200
    assert summary.mart_rows["ANALYTICS.DBT_MARTS.DAILY_REVENUE"] > 0

    # fakesnow has no QUERY_HISTORY: the run still completes, and its cost artifact and summary say why.
    reason = "query history unavailable: ANALYTICS.INFORMATION_SCHEMA.QUERY_HISTORY could not be read as role TRANSFORMER: "
    cost = prefect_server.artifacts("snowflake-cost")[0]
    assert cost["data"].startswith(f"Cost unknown: {reason}"), cost["data"]
    assert summary.dbt_run.cost.startswith(f"unknown: {reason}")

    password = snowflake_env.env()["SNOWFLAKE_PASSWORD"]
    logs = prefect_server.post("/logs/filter", {"limit": 200, "sort": "TIMESTAMP_DESC"}).json()
    artifacts = prefect_server.post("/artifacts/filter", {"limit": 200}).json()
    assert logs and artifacts
    assert password not in str(logs) and password not in str(artifacts)


def test_unreachable_warehouse_run_ends_naming_the_connection_failure(
    prefect_server: PrefectServer, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """`elt run` with Snowflake on a closed port: the last line is dbt's connection error, not
    the deprecation summary dbt prints after it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    checkout = appliance_remote.clone(tmp_path / "checkout")
    env = {
        **os.environ,
        "ELT_HOME": str(checkout),
        "ELT_WAREHOUSE": "snowflake",
        "SNOWFLAKE_ACCOUNT": "acme-test",
        "SNOWFLAKE_USER": "TRANSFORMER",
        "SNOWFLAKE_PASSWORD": "p@ss",
        "SNOWFLAKE_WAREHOUSE": "TRANSFORMING",
        "SNOWFLAKE_DATABASE": "ANALYTICS",
        "SNOWFLAKE_HOST": "127.0.0.1",
        "SNOWFLAKE_PORT": str(port),
        "SNOWFLAKE_PROTOCOL": "http",
    }
    completed = subprocess.run(
        [str(BIN / "elt"), "run", "--skip-extract", "--skip-pull"],
        env=env,
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    # The freshness check is the transform's first warehouse query.
    assert last.startswith(
        f"all-etl Failed: dbt source freshness in {checkout / 'dbt'} could not run: 250001: Could not connect to Snowflake backend"
    ), completed.stderr[-2000:]
