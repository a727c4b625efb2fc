"""`elt doctor` checks each configured dependency for real and lists every problem it finds."""

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import BIN, CONNECTORS_DIR, GitRemote, git


def _doctor(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "elt"), "doctor", *args], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=300
    )


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
    assert (
        f"FAIL git repo: ELT_GIT_REPO: {tmp_path / 'no-such-repo'} does not exist; give the path of a git repo or its URL" in out
    )
    assert "problem(s) found" in completed.stderr


def test_connectors_that_no_run_could_install_are_each_named(
    appliance_env: Path, faker_connections: Path, tmp_path: Path
) -> None:
    """The doctor asks the installer's own lookup (no install): a connector neither installed
    nor installable and an executable that is gone fail, each naming its connection and what to
    set; one with a pip spec and a disabled one pass."""
    faker_connections.write_text(
        "connections:\n"
        "  - {name: faker, source: {connector: source-faker, pip: airbyte-source-faker==7.2.1}, streams: [users], destination: {schema: raw_faker}}\n"
        "  - {name: crm, source: {connector: source-no-such-thing}, streams: [users], destination: {schema: raw_crm}}\n"
        f"  - {{name: erp, source: {{connector: source-erp, executable: {tmp_path}/gone/source-erp}}, streams: [users], destination: {{schema: raw_erp}}}}\n"
        "  - {name: old, enabled: false, source: {connector: source-also-missing}, streams: [users], destination: {schema: raw_old}}\n"
    )
    completed = _doctor({"ELT_HOME": str(appliance_env)}, appliance_env)
    assert completed.returncode == 1
    out = completed.stdout
    assert "FAIL airbyte connections: 2 connector(s) not installed and not installable:" in out
    assert (
        f"{faker_connections}: connection 'crm': source.connector: 'source-no-such-thing' is not installed "
        f"(looked in {CONNECTORS_DIR / 'source-no-such-thing'} and on PATH); "
        "add its PyPI package as source.pip, e.g. pip: airbyte-source-no-such-thing" in out
    )
    assert f"{faker_connections}: connection 'erp': source.executable: {tmp_path}/gone/source-erp does not exist" in out
    assert "'faker'" not in out and "'old'" not in out and "source-also-missing" not in out


def test_free_space_on_the_data_disk_is_reported_and_fails_under_the_threshold(appliance_env: Path) -> None:
    """The real disk of the data folder (not created yet: its nearest existing parent)."""
    data = appliance_env / "data"
    usage = shutil.disk_usage(appliance_env)
    healthy = _doctor({"ELT_HOME": str(appliance_env)}, appliance_env)
    line = next(line for line in healthy.stdout.splitlines() if "disk space:" in line)
    assert line.startswith("ok   disk space: ") and line.endswith(f"GB free of {usage.total / 1e9:.1f} GB on the disk of {data}")

    full = _doctor({"ELT_HOME": str(appliance_env), "ELT_MIN_FREE_GB": "1000000"}, appliance_env)
    assert full.returncode == 1
    line = next(line for line in full.stdout.splitlines() if "disk space:" in line)
    assert line.startswith("FAIL disk space: ")
    assert line.endswith(f"on the disk of {data}, under ELT_MIN_FREE_GB=1000000: free space or grow the disk")


def test_every_check_runs_after_invalid_settings_and_failed_checks(
    appliance_remote: GitRemote, faker_connections: Path, tmp_path: Path
) -> None:
    """An invalid setting, an unknown variable, an unset ${VAR} and a missing dbt project folder:
    each is reported on its own line, the checks that don't depend on the invalid setting still run
    with its default, and doctor exits non-zero."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    faker_connections.write_text(faker_connections.read_text().replace("seed: 42", "seed: '${FAKER_SEED}'"))
    completed = _doctor(
        {
            "ELT_HOME": str(checkout),
            "ELT_AIRBYTE_CONNECTIONS_FILE": str(faker_connections),
            "ELT_WAREHOUSE": "bigquery",
            "ELT_DBT_PROJECT_DIR": "missing",
            "ELT_AIRBYTE_BACKED": "server",
        },
        checkout,
    )
    assert completed.returncode == 1
    lines = completed.stdout.splitlines()
    assert lines[:3] == [
        "FAIL settings: 1 invalid setting(s); the checks below use the default instead",
        "       - ELT_WAREHOUSE: Input should be 'duckdb' or 'snowflake'",
        "FAIL environment: ELT_AIRBYTE_BACKED: unknown setting; did you mean ELT_AIRBYTE_BACKEND?",
    ]
    assert lines[3:6] == [
        f"FAIL airbyte connections: {faker_connections}: connection 'faker': source.config.seed refers to ${{FAKER_SEED}}, "
        "which is not set; set FAKER_SEED in the environment or .env",
        "skip warehouse: not checked: ELT_WAREHOUSE is invalid (see settings)",
        f"ok   git repo: {appliance_remote.bare} reachable",
    ]
    assert lines[6] == (
        f"FAIL dbt project: ELT_DBT_PROJECT_DIR: {checkout}/missing does not exist; set ELT_DBT_PROJECT_DIR to the "
        "dbt project's folder in the repo (dbt projects in the repo: dbt)"
    )
    assert lines[-1].startswith("ok   prefect api: ")
    assert completed.stderr.splitlines()[-1] == "4 problem(s) found"  # the skipped warehouse check is not one
    assert "Traceback" not in completed.stdout + completed.stderr


def test_credentials_in_the_repo_setting_fail_without_printing_them(appliance_env: Path) -> None:
    token = "ghp_TOPSECRET123"
    completed = _doctor(
        {"ELT_HOME": str(appliance_env), "ELT_GIT_REPO": f"https://x:{token}@git.example/team/analytics.git"}, appliance_env
    )
    assert completed.returncode == 1
    assert (
        "       - ELT_GIT_REPO: https://***@git.example/team/analytics.git has credentials written into it;" in completed.stdout
    )
    assert "skip git repo: not checked: ELT_GIT_REPO is invalid (see settings)" in completed.stdout
    assert "skip dbt project: not checked: ELT_GIT_REPO is invalid (see settings)" in completed.stdout
    assert token not in completed.stdout + completed.stderr


def test_checkout_of_another_repo_fails_naming_both(appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path) -> None:
    """ELT_GIT_CHECKOUT_DIR holds a clone of one repo while ELT_GIT_REPO names another (same name)."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    other = tmp_path / "other" / "analytics.git"
    other.parent.mkdir()
    git("init", "-q", "--bare", str(other), cwd=tmp_path)
    completed = _doctor(
        {
            "ELT_HOME": str(appliance_env),
            "ELT_GIT_REPO": str(other),
            "ELT_GIT_CHECKOUT_DIR": str(checkout),
            "ELT_DBT_PROJECT_DIR": "missing",
        },
        appliance_env,
        "--debug",
    )
    assert completed.returncode == 1
    assert (
        f"FAIL git repo: {checkout} is a checkout of {appliance_remote.bare}, not of the configured repo {other}; "
        f"`elt run` re-points it if it is clean and {other} has its HEAD, else stops"
    ) in completed.stdout.splitlines()
    assert "Traceback (most recent call last)" in completed.stderr  # --debug


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
