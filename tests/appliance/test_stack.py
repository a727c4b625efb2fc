"""The appliance brought up for real: setup.sh + docker compose on a real Docker engine.

Builds the local base image (debootstrap, no registry needed) and the project image on it,
runs setup.sh twice with the CI compose override, then drives the stack through the Prefect
API: a deployed all-etl run completes and fills the marts, the dbt docs are regenerated, the
history survives `down` + `up`, a run whose worker is killed ends Crashed and the next one
completes, no port listens on 0.0.0.0 and no secret from .env reaches any container's log.

Needs root and apt (it installs docker.io, docker-compose and debootstrap with
tests/appliance/install_docker.sh); skipped otherwise. Takes about 10 minutes after the
images are cached, about 20 from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(2400)]

HERE = Path(__file__).parent
BASE_IMAGE = "elt-base:bookworm"
CI_OVERRIDE = "docker/docker-compose.ci.yml"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def sh(command: list[str] | str, *, cwd: Path | None = None, timeout: int = 1200, check: bool = True, env=None):
    completed = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=isinstance(command, str), env=env
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"{command} exited {completed.returncode}:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
        )
    return completed


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value
    return values


class Stack:
    def __init__(self, checkout: Path) -> None:
        self.checkout = checkout
        self.env_file = checkout / ".env"

    @property
    def env(self) -> dict[str, str]:
        return read_env(self.env_file)

    def compose(self, *args: str, timeout: int = 600, check: bool = True):
        return sh([str(self.checkout / "docker" / "compose.sh"), *args], cwd=self.checkout, timeout=timeout, check=check)

    def setup(self) -> subprocess.CompletedProcess:
        return sh(
            [str(self.checkout / "setup.sh"), "--no-airbyte", "--no-docker-install",
             "--compose-override", CI_OVERRIDE, "--base-image", BASE_IMAGE],
            cwd=self.checkout, timeout=1500,
        )

    def container_ids(self) -> dict[str, str]:
        ids = {}
        for service in ("postgres", "prefect-server", "prefect-worker", "dbt-docs"):
            ids[service] = self.compose("ps", "-q", service).stdout.strip()
        return ids

    def exec_worker(self, *command: str, timeout: int = 120) -> str:
        return self.compose("exec", "-T", "prefect-worker", *command, timeout=timeout).stdout

    @property
    def api(self) -> httpx.Client:
        user, _, password = self.env["PREFECT_SERVER_API_AUTH_STRING"].partition(":")
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['PREFECT_PORT']}/api", auth=(user, password), timeout=30
        )

    def wait_api(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.api as api:
                    if api.get("/health").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Prefect API did not come up"
            time.sleep(2)

    def start_run(self, parameters: dict | None = None) -> str:
        with self.api as api:
            deployment = api.get("/deployments/name/all-etl/all-etl")
            deployment.raise_for_status()
            created = api.post(
                f"/deployments/{deployment.json()['id']}/create_flow_run", json={"parameters": parameters or {}}
            )
            created.raise_for_status()
            return created.json()["id"]

    def state(self, run_id: str) -> dict:
        with self.api as api:
            response = api.get(f"/flow_runs/{run_id}")
            response.raise_for_status()
            return response.json()["state"]

    def wait_state(self, run_id: str, types: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(run_id)
            if state["type"] in types:
                return state
            if time.monotonic() > deadline:
                logs = self.compose("logs", "--tail", "60", "prefect-worker", check=False).stdout
                raise AssertionError(f"run {run_id} still {state['type']} after {timeout} s: {state}\n{logs}")
            time.sleep(2)

    def mart_rows(self, table: str = "main_marts.daily_revenue") -> int:
        out = self.exec_worker(
            "python", "-c",
            "import duckdb,sys; c=duckdb.connect('/var/lib/elt/data/warehouse.duckdb', read_only=True); "
            f"print(c.execute('select count(*) from {table}').fetchone()[0])",
        )
        return int(out.strip().splitlines()[-1])


def _copy_working_tree(destination: Path) -> None:
    """The repo as the next commit would hold it (tracked + untracked, minus ignored files)."""
    listed = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT).stdout
    for relative in filter(None, listed.split("\0")):
        source = REPO_ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def git(*args: str, cwd: Path) -> str:
    return sh(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", *args], cwd=cwd).stdout.strip()


def prepare_checkout(checkout: Path) -> None:
    """The VM's checkout: this repo's working tree as a git repo with its own `.env`.

    Its origin (a bare repo inside it, ignored) is reachable from the worker container at the
    same /opt/elt path, so the update-code stage really pulls. Also used by bench/p4_stack.py.
    """
    checkout.mkdir(parents=True)
    _copy_working_tree(checkout)
    git("init", "-q", "-b", "main", cwd=checkout)
    git("add", "-A", cwd=checkout)
    git("commit", "-q", "-m", "appliance", cwd=checkout)
    git("clone", "-q", "--bare", str(checkout), str(checkout / ".ci-remote.git"), cwd=checkout)
    (checkout / ".git" / "info" / "exclude").write_text(".ci-remote.git/\n")
    git("remote", "add", "origin", "/opt/elt/.ci-remote.git", cwd=checkout)
    git("update-ref", "refs/remotes/origin/main", "HEAD", cwd=checkout)
    git("branch", "-q", "--set-upstream-to=origin/main", "main", cwd=checkout)

    project = f"elt-ci-{os.getpid()}"
    (checkout / ".env").write_text(
        (REPO_ROOT / ".env.example").read_text()
        + "\n# --- test settings ---\n"
        + f"COMPOSE_PROJECT_NAME={project}\nELT_IMAGE=elt-appliance:ci\n"
        + f"PREFECT_PORT={_free_port()}\nDBT_DOCS_PORT={_free_port()}\n"
        + "ELT_ZOMBIE_SECONDS=60\nELT_DOCS_POLL_SECONDS=5\n"
        # No SLACK_WEBHOOK_URL: a notification would leave this machine, which tests must not do.
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the appliance test needs root and apt-get (it installs and starts a Docker engine)")
    timings: dict[str, float] = {}
    started = time.monotonic()
    sh(["bash", str(HERE / "install_docker.sh")], timeout=900)
    sh(["bash", str(HERE / "build_base_image.sh"), BASE_IMAGE], timeout=1200)
    timings["engine+base image"] = time.monotonic() - started

    checkout = tmp_path_factory.mktemp("vm") / "elt"
    prepare_checkout(checkout)
    stack = Stack(checkout)
    try:
        t = time.monotonic()
        first = stack.setup()
        timings["setup.sh (first)"] = time.monotonic() - t
        stack.first_output = first.stdout + first.stderr
        stack.timings = timings
        yield stack
    finally:
        logs = stack.compose("logs", "--no-color", "--tail", "200", check=False).stdout
        (tmp_path_factory.getbasetemp() / "stack.log").write_text(logs)
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
        # The image elt-appliance:ci stays: its layers are the build cache of the next run.
        print("appliance timings:", json.dumps({k: round(v) for k, v in timings.items()}))


def test_setup_twice_changes_nothing(stack: Stack) -> None:
    env_before = stack.env_file.read_bytes()
    ids_before = stack.container_ids()
    assert all(ids_before.values()), ids_before
    t = time.monotonic()
    second = stack.setup()
    stack.timings["setup.sh (second)"] = time.monotonic() - t
    assert stack.env_file.read_bytes() == env_before
    assert stack.container_ids() == ids_before
    output = second.stdout + second.stderr
    assert ".env: set" not in output and "Creating" not in output and "Recreating" not in output, output
    assert "automation crash-zombie-flow-runs: unchanged" in output, output
    assert "automation notify-failed-all-etl: skipped (SLACK_WEBHOOK_URL is not set)" in output, output
    assert "ssh -L 4200:localhost:4200 -L 8000:localhost:8000 -L 8080:localhost:8080" in output
    env = stack.env
    assert len(env["POSTGRES_PASSWORD"]) >= 32
    assert env["PREFECT_SERVER_API_AUTH_STRING"].startswith("admin:")


def test_ports_are_published_on_localhost_only(stack: Stack) -> None:
    ports = sh(["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.env['COMPOSE_PROJECT_NAME']}",
                "--format", "{{.Names}} {{.Ports}}"]).stdout
    published = [line for line in ports.splitlines() if "->" in line]
    assert len(published) == 2, ports  # Prefect UI/API and the dbt docs
    assert "0.0.0.0" not in ports and ":::" not in ports, ports
    assert all("127.0.0.1:" in line for line in published), ports


def test_api_requires_the_auth_string(stack: Stack) -> None:
    response = httpx.post(f"http://127.0.0.1:{stack.env['PREFECT_PORT']}/api/flow_runs/filter", json={}, timeout=30)
    assert response.status_code == 401


def test_all_etl_completes_pulls_the_new_commit_and_fills_the_marts(stack: Stack, tmp_path: Path) -> None:
    # A new commit on the remote: the run's update-code stage must fast-forward to it.
    author = tmp_path / "author"
    git("clone", "-q", str(stack.checkout / ".ci-remote.git"), str(author), cwd=tmp_path)
    (author / "dbt" / "models" / "README.md").write_text("Pushed by the appliance test.\n")
    git("add", "-A", cwd=author)
    git("commit", "-q", "-m", "new commit on the remote", cwd=author)
    git("push", "-q", "origin", "HEAD:main", cwd=author)
    pushed = git("rev-parse", "HEAD", cwd=author)

    run_id = stack.start_run()
    t = time.monotonic()
    state = stack.wait_state(run_id, TERMINAL, 900)
    stack.timings["first all-etl run"] = time.monotonic() - t
    assert state["type"] == "COMPLETED", state
    assert git("rev-parse", "HEAD", cwd=stack.checkout) == pushed
    assert stack.mart_rows() > 0
    assert stack.mart_rows("main_marts.customer_lifetime_value") > 0
    stack.completed_run = run_id


def test_dbt_docs_are_regenerated_after_a_successful_run(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.env['DBT_DOCS_PORT']}"
    deadline = time.monotonic() + 300
    while True:
        response = httpx.get(f"{url}/generated-for.json", timeout=10)
        if response.status_code == 200 and response.json()["flow_run_id"] == stack.completed_run:
            break
        if time.monotonic() > deadline:
            logs = stack.compose("logs", "--tail", "40", "dbt-docs", check=False).stdout
            raise AssertionError(f"docs not regenerated for {stack.completed_run}:\n{logs}")
        time.sleep(3)
    manifest = httpx.get(f"{url}/manifest.json", timeout=30).json()
    assert any(node.endswith("daily_revenue") for node in manifest["nodes"])
    catalog = httpx.get(f"{url}/catalog.json", timeout=30).json()
    assert any(node.endswith("daily_revenue") for node in catalog["nodes"])
    assert "dbt" in httpx.get(f"{url}/index.html", timeout=30).text.lower()


def test_history_survives_down_and_up(stack: Stack) -> None:
    stack.compose("down", "--timeout", "10")
    stack.compose("up", "-d")
    stack.wait_api()
    assert stack.state(stack.completed_run)["type"] == "COMPLETED"
    assert stack.mart_rows() > 0


def test_a_run_whose_worker_is_killed_ends_crashed_and_the_next_completes(stack: Stack) -> None:
    deadline = time.monotonic() + 300
    while "healthy" not in sh(["docker", "inspect", "-f", "{{.State.Health.Status}}",
                               stack.container_ids()["prefect-worker"]], check=False).stdout:
        assert time.monotonic() < deadline, "worker not healthy after up"
        time.sleep(2)
    run_id = stack.start_run()
    stack.wait_state(run_id, {"RUNNING"} | TERMINAL, 300)
    time.sleep(8)  # mid-run: the connector is syncing; the first heartbeat has been sent
    assert stack.state(run_id)["type"] == "RUNNING"
    worker = stack.container_ids()["prefect-worker"]
    t = time.monotonic()
    sh(["docker", "kill", worker])
    state = stack.wait_state(run_id, TERMINAL, 400)
    stack.timings["killed run marked crashed after"] = time.monotonic() - t
    assert state["type"] == "CRASHED", state

    stack.compose("up", "-d")
    next_run = stack.start_run()
    state = stack.wait_state(next_run, TERMINAL, 900)
    assert state["type"] == "COMPLETED", state


def test_no_secret_from_env_reaches_any_container_log(stack: Stack) -> None:
    env = stack.env
    secrets = {
        "POSTGRES_PASSWORD": env["POSTGRES_PASSWORD"],
        "PREFECT_SERVER_API_AUTH_STRING": env["PREFECT_SERVER_API_AUTH_STRING"].partition(":")[2],
    }
    logs = stack.compose("logs", "--no-color").stdout
    assert len(logs) > 1000
    leaked = [name for name, value in secrets.items() if value in logs or value in stack.first_output]
    assert not leaked, f"secrets in container logs or setup.sh output: {leaked}"
