"""`elt doctor` on the snowflake warehouse: an unreachable account is named once and the checks
that need it say "not checked"; a fresh embedded install is not a failure; dbt debug's own error
reaches the user. The warehouse is fakesnow's server (no roles or privileges there: a real
account is needed to see a privilege refused) or a closed local port."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import duckdb
import pytest

from tests.conftest import BIN, FakesnowServer, GitRemote

pytestmark = pytest.mark.slow


def _doctor(env: dict[str, str], cwd: Path, deadline: float = 300) -> subprocess.CompletedProcess:
    """Fails the test (TimeoutExpired) if doctor has not ended by the deadline."""
    return subprocess.run(
        [str(BIN / "elt"), "doctor"], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=deadline
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_warehouse_is_named_once_and_dependent_checks_are_not_run(
    appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """Against a closed port: one FAIL naming account, host and port; dbt debug and the grant
    probes (each a dbt process and a login) are not run again. Deadline: 60 s."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    port = _closed_port()
    env = {
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
    completed = _doctor(env, checkout, deadline=60)
    assert completed.returncode == 1
    out = completed.stdout
    assert (
        f"FAIL warehouse: cannot connect to Snowflake account acme-test at http://127.0.0.1:{port} as TRANSFORMER: 250001: Could not connect"
        in out
    )
    assert out.count(f"127.0.0.1:{port}") == 1
    assert "skip dbt project: not checked: warehouse unreachable" in out
    assert "skip snowflake grants: not checked: warehouse unreachable" in out
    assert "250001" not in out.split("FAIL warehouse:")[1].split("\n", 1)[1]  # the error itself is printed once

    bad_key = _doctor(env | {"SNOWFLAKE_PRIVATE_KEY": "not a key at all!"}, checkout, deadline=60)
    assert bad_key.stdout.count("SNOWFLAKE_PRIVATE_KEY is not a key") == 1, bad_key.stdout
    assert "skip dbt project: not checked: warehouse settings unusable" in bad_key.stdout


def test_snowflake_grants_on_a_fresh_embedded_install_and_after_loading(
    snowflake_env: FakesnowServer, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """Fresh install, embedded backend: the raw schema does not exist yet and the first run
    creates it, so doctor passes and says so. Once the appliance has staged that schema
    locally (it has loaded before) a raw schema the role can't see is a missing grant. Once the
    raw tables exist, every probe (use warehouse, read sources, create schemas and tables) passes."""
    import snowflake.connector

    checkout = appliance_remote.clone(tmp_path / "checkout")
    env = snowflake_env.env() | {"ELT_HOME": str(checkout), "SNOWFLAKE_DATABASE": "DOCTOR_DB"}
    fresh = _doctor(env, checkout)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert (
        "ok   snowflake grants: role TRANSFORMER can use TRANSFORMING, read 0 source table(s) and build in DOCTOR_DB.DBT; "
        "raw schema DOCTOR_DB.RAW_FAKER not loaded yet (the first run creates it)"
    ) in fresh.stdout
    assert "ok   dbt project:" in fresh.stdout and "passes dbt debug" in fresh.stdout

    (checkout / "data").mkdir(exist_ok=True)
    with duckdb.connect(str(checkout / "data" / "airbyte-staging.duckdb")) as staging:
        staging.execute("create schema raw_faker")
        staging.execute("create table raw_faker.users (id int)")
    staged = _doctor(env, checkout)
    assert staged.returncode == 1
    assert "FAIL snowflake grants: 1 missing grant(s) or object(s):" in staged.stdout
    assert "GRANT USAGE ON SCHEMA DOCTOR_DB.RAW_FAKER TO ROLE TRANSFORMER;" in staged.stdout
    assert snowflake_env.env()["SNOWFLAKE_PASSWORD"] not in staged.stdout + staged.stderr

    with snowflake.connector.connect(
        user="x", password="x", account="x", host="127.0.0.1", port=snowflake_env.port, protocol="http"
    ) as connection:
        cursor = connection.cursor()
        cursor.execute("create database if not exists DOCTOR_DB")
        cursor.execute("create schema if not exists DOCTOR_DB.RAW_FAKER")
        for table in ("users", "products", "purchases"):
            cursor.execute(f"create table if not exists DOCTOR_DB.RAW_FAKER.{table} (id int, _airbyte_extracted_at timestamp_tz)")
    loaded = _doctor(env, checkout)
    assert "ok   snowflake grants: role TRANSFORMER can use TRANSFORMING, read 3 source table(s)" in loaded.stdout, loaded.stdout


def test_dbt_debug_failure_shows_dbts_own_error(
    snowflake_env: FakesnowServer, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """The appliance reaches the warehouse, but the project's own profiles.yml points dbt at a
    closed port: the dbt check shows dbt's error line, not its "Connection test: [ERROR]" header."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    profile = checkout / "dbt" / "profiles.yml"
    profile.write_text(profile.read_text().replace("env_var('SNOWFLAKE_PORT', '0')", f"'{_closed_port()}'"))
    env = snowflake_env.env() | {"ELT_HOME": str(checkout), "ELT_DBT_USE_PROJECT_PROFILES": "true"}
    completed = _doctor(env, checkout)
    line = next(line for line in completed.stdout.splitlines() if line.startswith("FAIL dbt project:"))
    assert line.startswith(
        f"FAIL dbt project: dbt debug failed in {checkout / 'dbt'}: dbt was unable to connect to the specified database.: "
        "250001: Could not connect to Snowflake backend after "
    ), completed.stdout
    assert "ok   warehouse: reachable" in completed.stdout
