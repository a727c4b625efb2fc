"""`elt doctor` checks each configured dependency for real and lists every problem it finds."""

import subprocess
from pathlib import Path

from tests.conftest import BIN, GitRemote


def _doctor(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([str(BIN / "elt"), "doctor"], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_healthy_configuration_passes(appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path) -> None:
    """A checkout with the dbt project, a usable connections file and DuckDB: every check passes,
    including a real `dbt debug` against the rendered profile and `git ls-remote` of the upstream."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    completed = _doctor({"ELT_HOME": str(checkout)}, checkout)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for check in ("settings", "airbyte connections", "warehouse", "git repo", "dbt project", "prefect api"):
        assert f"ok   {check}:" in completed.stdout
    assert "passes dbt debug" in completed.stdout


def test_every_problem_is_listed_with_what_to_fix(appliance_env: Path, faker_connections: Path, tmp_path: Path) -> None:
    faker_connections.write_text("connections: [{name: faker}]\n")
    completed = _doctor(
        {"ELT_HOME": str(appliance_env), "ELT_GIT_REPO": str(tmp_path / "no-such-repo"), "ELT_WAREHOUSE": "snowflake"},
        appliance_env,
    )
    assert completed.returncode == 1
    out = completed.stdout
    assert f"FAIL airbyte connections: {faker_connections}: connection 'faker': source: Field required" in out
    assert "FAIL warehouse: ELT_WAREHOUSE=snowflake needs SNOWFLAKE_ACCOUNT, SNOWFLAKE_USER" in out
    assert "FAIL git repo: cannot reach" in out and "no-such-repo" in out
    assert "problem(s) found" in completed.stderr


def test_airbyte_server_checks(fake_airbyte, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path) -> None:
    """With the server backend, doctor proves the fake Airbyte (tests/fakes) answers, the client
    credentials work and lists the active connections; a wrong secret is reported by variable name."""
    fake_airbyte.add_connection("stripe")
    fake_airbyte.add_connection("paused", status="inactive")
    checkout = appliance_remote.clone(tmp_path / "checkout")
    env = {
        "ELT_HOME": str(checkout),
        "ELT_AIRBYTE_BACKEND": "server",
        "ELT_AIRBYTE_URL": fake_airbyte.ui_url,
        "ELT_AIRBYTE_CLIENT_ID": "fake-client-id",
        "ELT_AIRBYTE_CLIENT_SECRET": "fake-client-secret",
    }
    healthy = _doctor(env, checkout)
    assert "ok   airbyte server: " in healthy.stdout and "1 active connection(s): stripe" in healthy.stdout

    wrong = _doctor(env | {"ELT_AIRBYTE_CLIENT_SECRET": "not-the-secret"}, checkout)
    assert wrong.returncode == 1
    assert "FAIL airbyte server: " in wrong.stdout and "ELT_AIRBYTE_CLIENT_SECRET" in wrong.stdout
    assert "not-the-secret" not in wrong.stdout + wrong.stderr
