"""Shared fixtures: a real Prefect server, a local bare git remote, an isolated appliance home."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.mutmut_children import pytest_runtest_call  # noqa: F401 - a hook: mutmut measures what children run

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_PROJECT = Path(__file__).parent / "dbt_projects" / "tiny_shop"
# Connectors are installed once per checkout and shared by every test (a real pip install).
CONNECTORS_DIR = REPO_ROOT / ".venv-connectors"

# `make test` runs two lanes side by side (pytest-xdist, `-n 2 --dist loadscope`, with the
# scope below), each in collection order: the compose stack's tests, which mostly wait on
# containers, with two slow modules that balance the lanes; and everything else. No two tests of
# one lane overlap. (xdist's loadgroup cannot do it on pytest 9: it renames `item._nodeid`,
# which pytest 9 no longer reads.)
STACK_LANE = ("tests/appliance/", "tests/test_secrets.py", "tests/test_snowflake_doctor.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "stack" if nodeid.startswith(STACK_LANE) else "local"

    return Lanes(config, log)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ELT_/SNOWFLAKE_ setting leaks in from the machine; `.env` lookups start in an empty folder."""
    for name in list(os.environ):
        if name.startswith(("ELT_", "SNOWFLAKE_")):
            monkeypatch.delenv(name)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)


def git(*args: str, cwd: Path) -> str:
    completed = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return completed.stdout.strip()


@dataclass
class GitRemote:
    """A bare repository on disk and a working clone used to push new commits to it."""

    bare: Path
    author_clone: Path

    def commit(self, relative: str, content: str, message: str) -> str:
        path = self.author_clone / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        git("add", relative, cwd=self.author_clone)
        git("commit", "-q", "-m", message, cwd=self.author_clone)
        git("push", "-q", "origin", "HEAD:main", cwd=self.author_clone)
        return git("rev-parse", "HEAD", cwd=self.author_clone)

    def clone(self, destination: Path) -> Path:
        git("clone", "-q", str(self.bare), str(destination), cwd=destination.parent)
        _identify(destination)
        return destination


def _identify(checkout: Path) -> None:
    git("config", "user.email", "tests@example.invalid", cwd=checkout)
    git("config", "user.name", "tests", cwd=checkout)


def make_remote(root: Path, project: Path, project_dir: str = "dbt") -> GitRemote:
    """A bare remote whose `main` holds `project` under `project_dir`."""
    bare = root / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
    author = root / "author"
    git("clone", "-q", str(bare), str(author), cwd=root)
    _identify(author)
    git("checkout", "-q", "-b", "main", cwd=author)
    shutil.copytree(project, author / project_dir, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    git("add", ".", cwd=author)
    git("commit", "-q", "-m", "dbt project", cwd=author)
    git("push", "-q", "origin", "main", cwd=author)
    return GitRemote(bare, author)


@pytest.fixture
def appliance_remote(tmp_path: Path) -> GitRemote:
    """A bare remote holding a copy of the appliance's own dbt project."""
    return make_remote(tmp_path, REPO_ROOT / "dbt")


@pytest.fixture
def tiny_remote(tmp_path: Path) -> GitRemote:
    """A bare remote holding tests/dbt_projects/tiny_shop (seeds only, no Airbyte sources)."""
    return make_remote(tmp_path, TINY_PROJECT)


@pytest.fixture
def faker_connections(tmp_path: Path) -> Path:
    """A connections file that runs the real source-faker with a small row count."""
    path = tmp_path / "connections.yaml"
    path.write_text((REPO_ROOT / "airbyte" / "connections.yaml").read_text().replace("count: 1000", "count: 200"))
    return path


@pytest.fixture
def appliance_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, faker_connections: Path) -> Path:
    """ELT_ settings pointing every path of the appliance into this test's folder; returns ELT_HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ELT_HOME", str(home))
    monkeypatch.setenv("ELT_CONNECTORS_DIR", str(CONNECTORS_DIR))
    monkeypatch.setenv("ELT_AIRBYTE_CONNECTIONS_FILE", str(faker_connections))
    return home


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home)}

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.api_url + path, timeout=30)

    def post(self, path: str, payload: dict) -> httpx.Response:
        return httpx.post(self.api_url + path, json=payload, timeout=30)

    def artifacts(self, key: str) -> list[dict]:
        response = self.post("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on SQLite, shared by the session; flows in this process report to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - the log file outlives this function: the process writes to it
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrefectServer(f"http://127.0.0.1:{port}/api", home, process)
    # A wait, not a limit: its first start (migrations) shares the CPU with the other test lane.
    deadline = time.monotonic() + 300
    while True:
        try:
            if server.get("/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = server.api_url
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server
    os.environ.pop("PREFECT_API_URL", None)
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture
def fake_airbyte():
    """A fake Airbyte server that checks every request and response against the pinned public API
    spec (tests/fakes/airbyte_server.py); any contract violation fails the test."""
    from tests.fakes.airbyte_server import FakeAirbyte

    with FakeAirbyte() as fake:
        yield fake
        fake.assert_no_violations()


@pytest.fixture
def airbyte_env(monkeypatch: pytest.MonkeyPatch, fake_airbyte) -> None:
    """Settings that point the server backend at the fake, with fast polling."""
    monkeypatch.setenv("ELT_AIRBYTE_BACKEND", "server")
    monkeypatch.setenv("ELT_AIRBYTE_URL", fake_airbyte.ui_url)
    monkeypatch.setenv("ELT_AIRBYTE_CLIENT_ID", "fake-client-id")
    monkeypatch.setenv("ELT_AIRBYTE_CLIENT_SECRET", "fake-client-secret")
    monkeypatch.setenv("ELT_AIRBYTE_POLL_SECONDS", "0.2")


FAKESNOW = REPO_ROOT / ".venv-fakesnow" / "bin" / "fakesnow"


@dataclass
class FakesnowServer:
    port: int
    data_dir: Path

    def env(self) -> dict[str, str]:
        """Settings that point the appliance at this server. The password has the characters
        URL-style DSNs choke on, to prove it is passed through intact."""
        return {
            "ELT_WAREHOUSE": "snowflake",
            "SNOWFLAKE_ACCOUNT": "acme-test",
            "SNOWFLAKE_USER": "TRANSFORMER",
            "SNOWFLAKE_PASSWORD": "p@ss:w/rd@#%!",
            "SNOWFLAKE_ROLE": "TRANSFORMER",
            "SNOWFLAKE_WAREHOUSE": "TRANSFORMING",
            "SNOWFLAKE_DATABASE": "ANALYTICS",
            "SNOWFLAKE_SCHEMA": "DBT",
            "SNOWFLAKE_HOST": "127.0.0.1",
            "SNOWFLAKE_PORT": str(self.port),
            "SNOWFLAKE_PROTOCOL": "http",
        }


@pytest.fixture(scope="session")
def fakesnow_server(tmp_path_factory: pytest.TempPathFactory):
    """fakesnow 0.12's server mode (Snowflake's wire protocol over DuckDB), from its own venv
    (`make test` creates .venv-fakesnow: it needs duckdb 2, which PyAirbyte excludes)."""
    if not FAKESNOW.exists():
        raise RuntimeError(f"{FAKESNOW} is missing: run `make test`, which installs it from tests/fakesnow.lock")
    data_dir = tmp_path_factory.mktemp("fakesnow")
    port = _free_port()
    log = open(data_dir / "server.log", "w")  # noqa: SIM115 - the log file outlives this function: the process writes to it
    process = subprocess.Popen(
        [str(FAKESNOW), "-s", "--host", "127.0.0.1", "-p", str(port), "-d", str(data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"fakesnow did not start: {(data_dir / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield FakesnowServer(port, data_dir)
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture
def snowflake_env(monkeypatch: pytest.MonkeyPatch, fakesnow_server: FakesnowServer) -> FakesnowServer:
    for name, value in fakesnow_server.env().items():
        monkeypatch.setenv(name, value)
    return fakesnow_server


@pytest.fixture
def settings_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every Settings object built in this process from now on (load_settings and direct builds alike),
    as the keyword arguments it was built with."""
    from elt.settings import Settings

    loads: list[dict] = []
    build = Settings.__init__

    def counted(self: Settings, **values: object) -> None:
        loads.append(values)
        build(self, **values)

    monkeypatch.setattr(Settings, "__init__", counted)
    return loads


@pytest.fixture
def run_events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What all-etl does in this process from now on, in order: each dbt process it starts (the
    one started before the transform needs it is "dbt process started early") and each sync's
    start and end, whichever backend runs it."""
    from elt import dbt_runner
    from elt.extract.embedded import EmbeddedBackend
    from elt.extract.server import ServerBackend

    events: list[str] = []
    start_driver = dbt_runner._start_driver

    def recorded_start(env: dict[str, str], *, warm_up: bool = False) -> object:
        events.append("dbt process started early" if warm_up else "dbt process started")
        return start_driver(env, warm_up=warm_up)

    monkeypatch.setattr(dbt_runner, "_start_driver", recorded_start)
    for backend in (EmbeddedBackend, ServerBackend):

        def recorded_sync(self: object, connection: str, *, full_refresh: bool, sync: object = backend.sync) -> object:
            events.append(f"sync {connection} starts")
            try:
                return sync(self, connection, full_refresh=full_refresh)  # type: ignore[operator]
            finally:
                events.append(f"sync {connection} ends")

        monkeypatch.setattr(backend, "sync", recorded_sync)
    return events
