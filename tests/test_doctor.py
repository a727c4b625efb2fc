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
