"""The appliance stack as the tests drive it: a VM-like checkout, setup.sh, docker compose.

Shared by every test under tests/appliance/ through the session-scoped `stack` fixture
(tests/appliance/conftest.py): the stack is built and brought up once per test session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.alert_receivers import SITECUSTOMIZE, Receivers, channel_settings
from tests.conftest import REPO_ROOT, _free_port

HERE = Path(__file__).parent
BASE_IMAGE = "elt-base:bookworm"
CI_OVERRIDE = "docker/docker-compose.ci.yml"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def sh(
    command: list[str] | str,
    *,
    cwd: Path | None = None,
    timeout: int = 1200,
    check: bool = True,
    env=None,
    stdin: str | None = None,
):
    completed = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=isinstance(command, str),
        env=env,
        input=stdin,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"{command} exited {completed.returncode}:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
    return completed


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value
    return values


class Stack:
    def __init__(self, checkout: Path, receivers: Receivers | None = None) -> None:
        self.checkout = checkout
        self.env_file = checkout / ".env"
        # Where the stack's alerts arrive (alert_settings below), when this session brought it up.
        self.receivers = receivers

    @property
    def env(self) -> dict[str, str]:
        return read_env(self.env_file)

    def compose(self, *args: str, timeout: int = 600, check: bool = True, stdin: str | None = None):
        return sh(
            [str(self.checkout / "docker" / "compose.sh"), *args], cwd=self.checkout, timeout=timeout, check=check, stdin=stdin
        )

    def setup(self) -> subprocess.CompletedProcess:
        return sh(
            [
                str(self.checkout / "setup.sh"),
                "--no-airbyte",
                "--no-docker-install",
                "--compose-override",
                CI_OVERRIDE,
                "--base-image",
                BASE_IMAGE,
            ],
            cwd=self.checkout,
            timeout=1500,
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
        return httpx.Client(base_url=f"http://127.0.0.1:{self.env['PREFECT_PORT']}/api", auth=(user, password), timeout=30)

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
            created = api.post(f"/deployments/{deployment.json()['id']}/create_flow_run", json={"parameters": parameters or {}})
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
            "python",
            "-c",
            "import duckdb,sys; c=duckdb.connect('/var/lib/elt/data/warehouse.duckdb', read_only=True); "
            f"print(c.execute('select count(*) from {table}').fetchone()[0])",
        )
        return int(out.strip().splitlines()[-1])


def copy_working_tree(destination: Path) -> None:
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


def prepare_checkout(
    checkout: Path, extra_env: dict[str, str] | None = None, *, release: str | None = None, project: str | None = None
) -> None:
    """The VM's checkout: this repo's working tree (or the tree of commit `release`) as a git
    repo with its own `.env` and compose project.

    Its origin (a bare repo inside it, ignored) is reachable from the worker container at the
    same /opt/elt path, so the update-code stage really pulls. Also used by bench/p4_stack.py.
    """
    checkout.mkdir(parents=True)
    if release:
        sh(["bash", "-c", f"set -o pipefail; git -C {REPO_ROOT} archive {release} | tar -x -C {checkout}"])
    else:
        copy_working_tree(checkout)
    git("init", "-q", "-b", "main", cwd=checkout)
    git("add", "-A", cwd=checkout)
    git("commit", "-q", "-m", f"release {release}" if release else "appliance", cwd=checkout)
    git("clone", "-q", "--bare", str(checkout), str(checkout / ".ci-remote.git"), cwd=checkout)
    (checkout / ".git" / "info" / "exclude").write_text(".ci-remote.git/\n")
    git("remote", "add", "origin", "/opt/elt/.ci-remote.git", cwd=checkout)
    git("update-ref", "refs/remotes/origin/main", "HEAD", cwd=checkout)
    git("branch", "-q", "--set-upstream-to=origin/main", "main", cwd=checkout)

    project = project or f"elt-ci-{os.getpid()}"
    (checkout / ".env").write_text(
        (checkout / ".env.example").read_text()
        + "\n# --- test settings ---\n"
        + f"COMPOSE_PROJECT_NAME={project}\nELT_IMAGE=elt-appliance:ci\n"
        + f"PREFECT_PORT={_free_port()}\nDBT_DOCS_PORT={_free_port()}\n"
        + "ELT_ZOMBIE_SECONDS=240\nELT_DOCS_POLL_SECONDS=5\n"
        # The retention vacuum every 5 s instead of hourly: test_stack ages runs and waits for it.
        + "ELT_RETENTION_CHECK_SECONDS=5\n"
        + "".join(f"{name}={value}\n" for name, value in (extra_env or {}).items())
    )


SERVICES = ("postgres", "prefect-server", "prefect-worker", "dbt-docs")


@contextmanager
def slowed_worker(stack: Stack, cpus: float = 0.5) -> Iterator[str]:
    """The worker's container held to `cpus` cores, as on a busy VM, for a test that acts on a
    run while it runs: the demo run takes ~8 s on a quiet machine, less than some tests need to
    act. The limit stays with the container through a restart until the block ends. Yields the
    container's id."""
    worker = stack.container_ids()["prefect-worker"]
    sh(["docker", "update", "--cpus", str(cpus), worker])
    try:
        yield worker
    finally:
        sh(["docker", "update", "--cpus", str(os.cpu_count()), worker])


def health(container: str) -> str:
    return sh(
        ["docker", "inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}", container],
        check=False,
    ).stdout.strip()


def wait_stack_healthy(stack: Stack, timeout: float = 300) -> None:
    """Every service healthy (its compose healthcheck) and the API answering, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        ids = {
            service: sh(
                [str(stack.checkout / "docker" / "compose.sh"), "ps", "-q", service], cwd=stack.checkout, check=False
            ).stdout.strip()
            for service in SERVICES
        }
        statuses = {service: health(container) if container else "not created" for service, container in ids.items()}
        if all(status == "healthy" for status in statuses.values()):
            stack.wait_api(max(deadline - time.monotonic(), 5))
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the stack is not healthy after {timeout} s: {statuses}")
        time.sleep(2)


def docker_bridge_gateway() -> str:
    """The host's address on Docker's default bridge: what host.docker.internal (host-gateway) is."""
    return sh(["docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}"]).stdout.strip()


def alert_settings(receivers: Receivers) -> dict[str, str]:
    """The .env lines of every alert channel, pointed at receivers the containers reach as
    host.docker.internal; a run counts as long-running after 10 s (Prefect's least)."""
    return {**channel_settings(receivers, smtp_host="host.docker.internal"), "ELT_ALERT_RUNNING_SECONDS": "10"}


def slack_redirect_override(receivers: Receivers, folder: Path) -> str:
    """Compose override lines for the Prefect server: its Apprise posts Slack webhooks to the
    receiver (a sitecustomize.py on its PYTHONPATH sets NotifySlack.webhook_url, as
    tests/test_alerts.py does), so nothing leaves this machine. The block keeps Slack's URL."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the server runs as uid 1000
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (folder / "sitecustomize.py").chmod(0o644)
    return f"""\
  prefect-server:
    environment:
      PYTHONPATH: /opt/slack-redirect
      TEST_SLACK_WEBHOOK_BASE: {receivers.http.slack_base}
    volumes:
      - {folder}:/opt/slack-redirect:ro
"""
