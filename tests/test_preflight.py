"""Check before working: `elt run` with a mistake in its configuration stops before Prefect starts
and before any sync, with one line naming the variable or file and the fix.

Every test runs the real CLI (.venv/bin/elt) in a folder with a `.env`, as a user would, with
PREFECT_API_URL pointing at a recorder: a run that got past the checks would call it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from elt import preflight
from elt.errors import ConfigurationError
from elt.extract import backend_for
from elt.preflight import unknown_variables
from elt.settings import load_settings
from tests.conftest import BIN, CONNECTORS_DIR, GitRemote, git


class _Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def _record(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _record

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prefect_recorder():
    """An HTTP server standing in for Prefect's API that only records what reaches it."""
    _Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/api", _Recorder.requests
    server.shutdown()


@dataclass
class Home:
    """A folder `elt run` runs in: a checkout of the appliance's dbt project, with a `.env`."""

    path: Path
    connections: Path
    api_url: str
    requests: list[str]
    prefect_home: Path

    def run(self, *args: str, dotenv: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        (self.path / ".env").write_text(
            f"ELT_AIRBYTE_CONNECTIONS_FILE={self.connections}\nELT_CONNECTORS_DIR={CONNECTORS_DIR}\n" + dotenv
        )
        environment = {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.prefect_home), **(env or {})}
        process = subprocess.Popen(
            [str(BIN / "elt"), "run", *args],
            cwd=self.path,
            env=environment,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # A run that got past the checks calls Prefect's API within seconds: fail then, not at the deadline.
        deadline = time.monotonic() + 120
        while process.poll() is None and not self.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
        stdout, stderr = process.communicate()
        completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert self.requests == [], f"the run reached Prefect's API: {stdout + stderr}"
        assert completed.returncode == 2, completed.stdout + completed.stderr
        assert not self.prefect_home.exists(), "Prefect started (its home folder was created)"
        return completed


def _last_line(completed: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in completed.stdout + completed.stderr
    assert completed.stdout == ""
    return completed.stderr.rstrip("\n").splitlines()[-1]


@pytest.fixture
def home(appliance_remote: GitRemote, faker_connections: Path, prefect_recorder, tmp_path: Path) -> Home:
    api_url, requests = prefect_recorder
    checkout = appliance_remote.clone(tmp_path / "analytics")
    return Home(checkout, faker_connections, api_url, requests, tmp_path / "prefect-home")


def test_unknown_variable_in_dotenv_names_the_closest_setting(home: Home) -> None:
    completed = home.run(dotenv="ELT_AIRBYTE_BACKED=server\n")
    assert _last_line(completed) == (
        f"error: ELT_AIRBYTE_BACKED: unknown setting; did you mean ELT_AIRBYTE_BACKEND? (in {home.path}/.env)"
    )


def test_unknown_variable_in_the_environment_names_the_closest_setting(home: Home) -> None:
    completed = home.run(env={"ELT_WAREHOUS": "snowflake"})
    assert _last_line(completed) == "error: ELT_WAREHOUS: unknown setting; did you mean ELT_WAREHOUSE?"


def test_unknown_variables_are_all_named_and_stack_variables_are_not() -> None:
    """Variables the compose stack and setup.sh put in `.env` are no settings but are not flagged;
    names match case-insensitively like pydantic-settings does."""
    environ = {
        "ELT_UID": "1000",
        "ELT_IMAGE": "elt-appliance:latest",
        "ELT_HEARTBEAT_SECONDS": "30",
        "ELT_AIRBYTE_URL_FROM_STACK": "http://host.docker.internal:8000",
        "ELT_COMPOSE_OVERRIDE": "",
        "ELT_DOCS_DIR": "/var/lib/elt/dbt-docs",
        "elt_warehouse": "duckdb",
        "SNOWFLAKE_ACCOUNTT": "x",
        "ELT_DBT_THREAD": "8",
        "ELT_FROBNICATE": "1",
    }
    assert unknown_variables(environ, Path("/nonexistent/.env")) == [
        "ELT_DBT_THREAD: unknown setting; did you mean ELT_DBT_THREADS?",
        "ELT_FROBNICATE: unknown setting (every setting is listed in .env.example)",
    ]


def test_credentials_in_the_repo_flag_never_reach_prefect_or_the_output(home: Home) -> None:
    """`--repo https://user:token@host/...` would be stored verbatim in the flow run's parameters:
    the run stops before Prefect starts, and the token is printed nowhere."""
    token = "ghp_TOPSECRET123"
    completed = home.run("--repo", f"https://deploy:{token}@git.example/team/analytics.git")
    assert _last_line(completed) == (
        "error: --repo: https://***@git.example/team/analytics.git has credentials written into it; remove them "
        "from the URL and set ELT_GIT_TOKEN (and ELT_GIT_USERNAME if your host needs a user name) instead"
    )
    assert token not in completed.stdout + completed.stderr


def test_credentials_in_elt_git_repo_stop_the_run(home: Home) -> None:
    token = "glpat-TOPSECRET123"
    completed = home.run(dotenv=f"ELT_GIT_REPO=https://oauth2:{token}@gitlab.example/team/analytics.git\n")
    assert _last_line(completed) == (
        "error: invalid settings: ELT_GIT_REPO: https://***@gitlab.example/team/analytics.git has credentials written "
        "into it; remove them from the URL and set ELT_GIT_TOKEN (and ELT_GIT_USERNAME if your host needs a user name) instead"
    )
    assert token not in completed.stdout + completed.stderr


def test_invalid_setting_names_the_variable(home: Home) -> None:
    completed = home.run(dotenv="ELT_WAREHOUSE=bigquery\n")
    assert _last_line(completed) == "error: invalid settings: ELT_WAREHOUSE: Input should be 'duckdb' or 'snowflake'"


def test_unset_variable_in_a_connection_config_stops_before_any_sync(home: Home) -> None:
    home.connections.write_text(home.connections.read_text().replace("seed: 42", "seed: '${FAKER_SEED}'"))
    completed = home.run()
    assert _last_line(completed) == (
        f"error: {home.connections}: connection 'faker': source.config.seed refers to ${{FAKER_SEED}}, "
        "which is not set; set FAKER_SEED in the environment or .env"
    )


def test_variable_set_in_dotenv_satisfies_a_connection_reference(home: Home) -> None:
    """The same reference, set in `.env`: the checks pass it and stop at the next problem instead."""
    home.connections.write_text(home.connections.read_text().replace("seed: 42", "seed: '${FAKER_SEED}'"))
    completed = home.run("--project-dir", "nowhere", dotenv="FAKER_SEED=42\n")
    assert _last_line(completed).startswith("error: --project-dir: ")


def test_misspelled_key_in_a_connection_names_the_key_it_should_be(home: Home) -> None:
    home.connections.write_text(home.connections.read_text().replace("pip:", "pipp:"))
    completed = home.run()
    assert (
        _last_line(completed) == f"error: {home.connections}: connection 'faker': source.pipp: unknown key; did you mean 'pip'?"
    )


def test_unknown_connection_name_lists_the_enabled_ones(home: Home) -> None:
    completed = home.run("-c", "stripe")
    assert _last_line(completed) == f"error: connection 'stripe' is not in {home.connections} (enabled connections: faker)"


TAG_REFUSED = (
    "--tag nightly: tags select connections of an Airbyte server (ELT_AIRBYTE_BACKEND=server), "
    "but ELT_AIRBYTE_BACKEND=embedded; name the connections with --connection instead"
)


def test_tag_on_the_embedded_backend_is_refused_not_ignored(home: Home) -> None:
    """The embedded connections file has no tags: `--tag` there would sync every connection."""
    completed = home.run("--tag", "nightly")
    assert _last_line(completed) == f"error: {TAG_REFUSED}"


def test_the_extract_backend_refuses_a_tag_the_flow_was_given(tmp_path: Path) -> None:
    """A deployment run's `tag` parameter meets the same refusal where the backend is chosen."""
    with pytest.raises(ConfigurationError) as refused:
        backend_for(load_settings(home=tmp_path), tag="nightly")
    assert str(refused.value) == TAG_REFUSED


def test_missing_dbt_project_folder_names_the_setting_and_the_projects_found(home: Home) -> None:
    completed = home.run("--skip-extract", dotenv="ELT_DBT_PROJECT_DIR=missing\n")
    assert _last_line(completed) == (
        f"error: ELT_DBT_PROJECT_DIR: {home.path}/missing does not exist; set ELT_DBT_PROJECT_DIR to the dbt "
        "project's folder in the repo (dbt projects in the repo: dbt)"
    )


def test_folder_without_dbt_project_yml_names_the_flag(home: Home) -> None:
    completed = home.run("--skip-extract", "--project-dir", "dbt/models")
    assert _last_line(completed) == (
        f"error: --project-dir: {home.path}/dbt/models has no dbt_project.yml; set --project-dir to the dbt "
        "project's folder in the repo (dbt projects in the repo: dbt)"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("name: [\n", "line 2: not valid YAML: expected the node content, but found '<stream end>'"),
        ("name: \x07\n", "not valid YAML: unacceptable character #x0007: special characters are not allowed"),
    ],
)
def test_unreadable_dbt_project_yml_names_the_file_and_the_line_when_yaml_has_one(home: Home, content: str, problem: str) -> None:
    project = home.path / "broken"
    project.mkdir()
    (project / "dbt_project.yml").write_text(content)
    completed = home.run("--skip-extract", "--project-dir", "broken")
    assert _last_line(completed) == f"error: {project / 'dbt_project.yml'}: {problem}"


def test_repo_path_that_does_not_exist(home: Home, tmp_path: Path) -> None:
    completed = home.run("--repo", str(tmp_path / "no-such-repo"))
    assert _last_line(completed) == (
        f"error: --repo: {tmp_path / 'no-such-repo'} does not exist; give the path of a git repo or its URL"
    )


def test_dirty_checkout_stops_the_run_before_any_sync(home: Home) -> None:
    """What update-code would refuse after the syncs is refused before them."""
    model = home.path / "dbt" / "models" / "marts" / "daily_revenue.sql"
    model.write_text(model.read_text() + "\n-- hotfix on the VM\n")
    completed = home.run()
    assert _last_line(completed) == (
        f"error: {home.path} has uncommitted changes in dbt/models/marts/daily_revenue.sql: commit or stash them "
        "(nothing was pulled), or run with --skip-pull"
    )


def test_skip_pull_never_builds_another_repos_checkout(home: Home, tmp_path: Path) -> None:
    """ELT_GIT_CHECKOUT_DIR holds a clone of one repo while another is configured: --skip-pull would
    build the wrong code, so the run stops naming both."""
    other = tmp_path / "other" / "analytics.git"
    other.parent.mkdir()
    git("init", "-q", "--bare", str(other), cwd=tmp_path)
    origin = git("remote", "get-url", "origin", cwd=home.path)
    completed = home.run("--skip-pull", "--skip-extract", "--repo", str(other), dotenv=f"ELT_GIT_CHECKOUT_DIR={home.path}\n")
    assert _last_line(completed) == (
        f"error: {home.path} is a checkout of {origin}, not of the configured repo {other}, and --skip-pull would "
        f"build it as it is; nothing was deployed. Move the folder away so all-etl clones {other} afresh, or set "
        f"ELT_GIT_REPO back to {origin}"
    )


def test_debug_flag_adds_the_traceback(home: Home) -> None:
    completed = home.run("--debug", dotenv="ELT_DBT_PROJECT_DIR=missing\n")
    assert "Traceback (most recent call last)" in completed.stderr
    assert completed.stderr.rstrip("\n").splitlines()[-1].startswith("error: ELT_DBT_PROJECT_DIR: ")


def test_a_run_the_cli_checked_is_not_loaded_or_checked_again_by_its_flow(settings_loads: list[dict]) -> None:
    """`elt run` checks before Prefect starts, then runs the flow in the same process, whose first
    step is the same check: the settings are loaded once and the flow gets the CLI's object, with
    --target applied as an override (not written into os.environ). Another run is checked afresh."""
    run = {"skip_extract": True, "skip_pull": True, "skip_transform": True, "dbt_target": "ci"}
    with preflight.checked_once(**run) as checked:
        assert preflight.check_run(**run) is checked
        assert len(settings_loads) == 1
        other = preflight.check_run(**(run | {"dbt_target": "prod"}))
        assert len(settings_loads) == 2
    assert (checked.effective_dbt_target, other.effective_dbt_target) == ("ci", "prod")
    assert "ELT_DBT_TARGET" not in os.environ
    preflight.check_run(**run)
    assert len(settings_loads) == 3  # outside the block, a run is checked again
