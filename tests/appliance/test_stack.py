"""The appliance brought up for real: setup.sh + docker compose on a real Docker engine.

Builds the local base image (debootstrap, no registry needed) and the project image on it,
runs setup.sh twice with the CI compose override, then drives the stack through the Prefect
API: a deployed all-etl run completes and fills the marts, the dbt docs are regenerated, the
history survives `down` + `up`, a run whose worker is killed ends Crashed and the next one
completes, no port listens on 0.0.0.0 and no secret from .env reaches any container's log.
Every alert channel is set in .env and delivered by the stack's own Prefect server to receivers
on this machine (tests/alert_receivers.py; Slack's webhook through the stand-in test_alerts.py
uses): a failing run, a dbt warning, a long-running and a crashed run each send one message per
channel.

Needs root and apt (it installs docker.io, docker-compose and debootstrap with
tests/appliance/install_docker.sh); skipped otherwise. Takes about 10 minutes after the
images are cached, about 20 from scratch.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

# BASE_IMAGE, HERE, Stack, prepare_checkout, sh: also imported from here by bench/p4_stack.py.
from tests.alert_receivers import SLACK_URL, SMTP_PASSWORD, WEBHOOK_SECRET, Receivers, assert_no_secret, one_per_channel
from tests.appliance.stack import (  # noqa: F401
    BASE_IMAGE,
    HERE,
    TERMINAL,
    Stack,
    git,
    prepare_checkout,
    sh,
    slowed_worker,
    wait_stack_healthy,
)

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(2400)]


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
    lines = [line.strip() for line in output.splitlines()]
    assert all(line.format("unchanged") in lines for line in ALERT_SETUP), output  # no second automation
    env = stack.env
    assert len(env["POSTGRES_PASSWORD"]) >= 32
    assert env["PREFECT_SERVER_API_AUTH_STRING"].startswith("admin:")


def test_first_install_says_created(stack: Stack) -> None:
    assert "work pool elt: created" in stack.first_output, stack.first_output
    assert "automation crash-zombie-flow-runs: created" in stack.first_output, stack.first_output
    lines = [line.strip() for line in stack.first_output.splitlines()]
    assert all(line.format("created") in lines for line in ALERT_SETUP), stack.first_output


def _prefect_setup(stack: Stack, zombie_seconds: int | str, *env: str) -> list[str]:
    """docker/prefect_setup.py run as setup.sh runs it (the alert lines of .env on stdin), with
    ELT_ZOMBIE_SECONDS=`zombie_seconds`; its lines."""
    settings = [
        f"{name}={value}" for name, value in stack.env.items() if name == "SLACK_WEBHOOK_URL" or name.startswith("ELT_ALERT_")
    ]
    output = stack.compose(
        "exec",
        "-T",
        *[arg for pair in env for arg in ("-e", pair)],
        "prefect-server",
        "sh",
        "-c",
        'PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING" '
        "exec python /opt/elt/docker/prefect_setup.py --settings-from-stdin",
        stdin="\n".join([*settings, f"ELT_ZOMBIE_SECONDS={zombie_seconds}"]) + "\n",
    ).stdout
    return output.splitlines()


ALERT_SETUP = [
    "slack block elt-alerts: {}",
    "email block elt-alerts-email: {}",
    "webhook block elt-alerts-webhook: {}",
    "automation notify-failed-all-etl: {}",
    "automation notify-long-running-all-etl: {}",
    "automation notify-late-all-etl: {}",
    "automation notify-dbt-warnings: {}",
]


@pytest.mark.parametrize("seed", ["0", "1", "2", "3", "7", "11"])
def test_rerunning_the_prefect_setup_says_unchanged_whatever_the_hash_seed(stack: Stack, seed: str) -> None:
    # The trigger's expect/after are sets: their order in the JSON depends on PYTHONHASHSEED.
    output = _prefect_setup(stack, stack.env["ELT_ZOMBIE_SECONDS"], f"PYTHONHASHSEED={seed}")
    assert output == [
        "work pool elt: unchanged",
        "automation crash-zombie-flow-runs: unchanged",
        *(line.format("unchanged") for line in ALERT_SETUP),
    ], output


def test_setup_prints_the_tunnel_with_the_ports_of_env_and_no_airbyte_when_skipped(stack: Stack) -> None:
    prefect, docs = stack.env["PREFECT_PORT"], stack.env["DBT_DOCS_PORT"]
    lines = stack.first_output.splitlines()
    tunnel = [line.strip() for line in lines if line.strip().startswith("ssh ")]
    assert len(tunnel) == 1, stack.first_output
    assert tunnel[0].startswith(f"ssh -L {prefect}:localhost:{prefect} -L {docs}:localhost:{docs} "), tunnel
    assert "8000" not in stack.first_output.split("open the tunnel:")[1], stack.first_output
    assert f"http://localhost:{prefect}   Prefect: log in with the whole PREFECT_SERVER_API_AUTH_STRING" in stack.first_output
    assert f"http://localhost:{docs}   dbt docs" in stack.first_output


def test_the_git_ignored_override_applies_and_the_checkout_stays_clean(stack: Stack) -> None:
    # conftest.py wrote docker/docker-compose.override.yml as docs/operations.md says.
    assert "TZ=Europe/Berlin" in stack.exec_worker("env").splitlines()
    assert sh(["git", "status", "--porcelain"], cwd=stack.checkout).stdout == ""


def container_env(container: str) -> dict[str, str]:
    listed = sh(["docker", "inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", container]).stdout
    return dict(line.split("=", 1) for line in listed.splitlines() if "=" in line)


def test_each_container_gets_only_the_secrets_it_needs(stack: Stack) -> None:
    env = stack.env
    password = env["POSTGRES_PASSWORD"]
    auth = env["PREFECT_SERVER_API_AUTH_STRING"]
    ids = stack.container_ids()
    environments = {service: container_env(container) for service, container in ids.items()}

    def holders(secret: str) -> set[str]:
        return {service for service, values in environments.items() if any(secret in value for value in values.values())}

    assert holders(password) == {"postgres", "prefect-server"}
    assert holders(auth) == {"prefect-server", "prefect-worker", "dbt-docs"}
    # The alert channels' secrets live in Prefect blocks only (setup.sh pipes them in on stdin).
    for secret in (SLACK_URL, SMTP_PASSWORD, WEBHOOK_SECRET, env["ELT_ALERT_WEBHOOK_URL"]):
        assert holders(secret) == set(), secret
    assert environments["prefect-worker"]["PREFECT_API_AUTH_STRING"] == auth
    assert environments["dbt-docs"]["PREFECT_API_AUTH_STRING"] == auth
    for client in ("prefect-worker", "dbt-docs"):
        assert "PREFECT_SERVER_API_AUTH_STRING" not in environments[client]
        # The checkout is mounted, its .env is not: the file holds PostgreSQL's password.
        shown = sh(["docker", "exec", ids[client], "cat", "/opt/elt/.env"]).stdout
        assert shown == "", f"{client} reads the checkout's .env"
    # The server mounts docker/ only, not the checkout.
    assert sh(["docker", "exec", ids["prefect-server"], "test", "-e", "/opt/elt/.env"], check=False).returncode == 1


def test_the_ui_is_served_not_just_the_api(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.env['PREFECT_PORT']}"
    page = httpx.get(base + "/", follow_redirects=True, timeout=30)
    assert page.status_code == 200 and "<title>Prefect Server</title>" in page.text, page.text[:300]
    # The UI build lives in the image, not in a volume: a new image brings its own.
    server = stack.container_ids()["prefect-server"]
    mounts = sh(["docker", "inspect", "-f", "{{range .Mounts}}{{println .Destination}}{{end}}", server]).stdout
    assert "/var/lib/elt/prefect-ui" not in mounts
    built_for = sh(["docker", "exec", server, "cat", "/var/lib/elt/prefect-ui/v2/UI_SERVE_BASE"]).stdout
    version = sh(["docker", "exec", server, "python", "-c", "import prefect; print(prefect.__version__)"]).stdout.strip()
    assert built_for == f"v2:{version}:/v2"


_UNCOMPILED = """
import glob, importlib.util, os, sys
sources = [importlib.util.find_spec(name).origin for name in ("prefect", "airbyte", "airbyte_cdk", "dbt.version", "pandas")]
sources += glob.glob("/opt/connectors/.installs/*/lib/python*/site-packages/source_faker/source.py")
assert len(sources) == 6, sources
print(" ".join(source for source in sources if not os.path.exists(importlib.util.cache_from_source(source))))
"""


def test_the_workers_packages_and_connectors_are_compiled_in_the_image(stack: Stack) -> None:
    """The image sets PYTHONDONTWRITEBYTECODE and its venv is root-owned: without bytecode from the
    build, every flow run would compile each module it imports again, the connector's too."""
    assert stack.exec_worker("python", "-c", _UNCOMPILED).strip() == ""


def test_ports_are_published_on_localhost_only(stack: Stack) -> None:
    ports = sh(
        [
            "docker",
            "ps",
            "--filter",
            f"label=com.docker.compose.project={stack.env['COMPOSE_PROJECT_NAME']}",
            "--format",
            "{{.Names}} {{.Ports}}",
        ]
    ).stdout
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


def test_history_and_the_ui_survive_down_and_up(stack: Stack) -> None:
    stack.compose("down", "--timeout", "10")
    stack.compose("up", "-d")
    stack.wait_api()
    assert stack.state(stack.completed_run)["type"] == "COMPLETED"
    assert stack.mart_rows() > 0
    ui = httpx.get(f"http://127.0.0.1:{stack.env['PREFECT_PORT']}/", follow_redirects=True, timeout=30)
    assert ui.status_code == 200 and "<title>Prefect Server</title>" in ui.text


def _receivers(stack: Stack) -> Receivers:
    if stack.receivers is None:
        pytest.skip("the alert receivers exist only for a stack this session brought up")
    return stack.receivers


def _run_link(stack: Stack, run_id: str) -> str:
    return f"Run: http://localhost:{stack.env['PREFECT_PORT']}/runs/flow-run/{run_id}"  # PREFECT_UI_URL: the tunnel's end


def _deployed_commits(stack: Stack, run_id: str) -> tuple[str | None, str]:
    """(the commit label update-code set on the run, if it got that far; the deployment's version,
    the commit the last run deployed): an alert names the label, else the version."""
    with stack.api as api:
        run = api.get(f"/flow_runs/{run_id}").json()
        return run["labels"].get("elt.commit"), api.get(f"/deployments/{run['deployment_id']}").json()["version"]


def _child_run(stack: Stack, parent_id: str, flow_name: str) -> str:
    with stack.api as api:
        response = api.post("/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC"})
        response.raise_for_status()
        for run in response.json():
            if (
                run["parent_task_run_id"]
                and api.get(f"/task_runs/{run['parent_task_run_id']}").json()["flow_run_id"] == parent_id
            ):
                return run["id"]
    pytest.fail(f"no {flow_name} run under all-etl run {parent_id}")


def test_a_failing_run_and_a_dbt_warning_each_send_one_message_per_channel(stack: Stack, tmp_path: Path) -> None:
    """Every channel of .env set (Slack, email to two recipients, a webhook), sent by the stack's
    own Prefect server to receivers on this machine: a pushed model that fails and a dbt test that
    warns give one Failed and one warning message per channel, with the tunnel's link, the pulled
    commit and the cause. Then the two files are removed again on the remote."""
    receivers = _receivers(stack)
    author = tmp_path / "author"
    git("clone", "-q", str(stack.checkout / ".ci-remote.git"), str(author), cwd=tmp_path)
    (author / "dbt" / "models" / "broken.sql").write_text("select missing_column from {{ ref('daily_revenue') }}\n")
    (author / "dbt" / "tests" / "daily_revenue_warn.sql").write_text(
        "{{ config(severity='warn') }}\nselect * from {{ ref('daily_revenue') }}\n"
    )
    git("add", "-A", cwd=author)
    git("commit", "-q", "-m", "a model that fails and a test that warns", cwd=author)
    git("push", "-q", "origin", "HEAD:main", cwd=author)
    commit = git("rev-parse", "HEAD", cwd=author)
    try:
        run_id = stack.start_run({"skip_extract": True})
        state = stack.wait_state(run_id, TERMINAL, 900)
        assert state["type"] == "FAILED", state
        cause = state["message"].removeprefix("Flow run encountered an exception: ")
        assert cause.startswith("DbtBuildFailed: dbt build failed on 1 node(s): model.elt_appliance.broken (error: "), cause
        for channel, message in one_per_channel(receivers, run_id, "all-etl Failed").items():
            lines = message.text.strip().splitlines()
            assert lines[0].startswith("all-etl run ") and lines[0].endswith(" is Failed."), (channel, lines)
            assert lines[1:] == ["Stage: transform", f"Cause: {cause}", f"Commit: {commit}", _run_link(stack, run_id)], (
                channel,
                lines,
            )
        transform_run = _child_run(stack, run_id, "transform")
        for channel, message in one_per_channel(receivers, transform_run, "dbt warning: daily_revenue_warn").items():
            lines = message.text.strip().splitlines()
            assert lines[0] == "dbt test daily_revenue_warn ended in warn.", (channel, lines)
            assert lines[1].startswith("Cause: Got "), (channel, lines)
            assert lines[2:] == [f"Commit: {commit}", _run_link(stack, transform_run)], (channel, lines)
        # transform failed too: only all-etl's failure is sent.
        failures = [message for message in receivers.all() if " is Failed." in message.text]
        assert all(f"/runs/flow-run/{run_id}" in message.text for message in failures), [m.text for m in failures]
        assert_no_secret(receivers.all())
    finally:
        git("rm", "-q", "dbt/models/broken.sql", "dbt/tests/daily_revenue_warn.sql", cwd=author)
        git("commit", "-q", "-m", "remove the failing model and the warning test", cwd=author)
        git("push", "-q", "origin", "HEAD:main", cwd=author)


def _heartbeats_since(stack: Stack, run_id: str, since: str) -> int:
    with stack.api as api:
        response = api.post(
            "/events/filter",
            json={
                "filter": {
                    "event": {"name": ["prefect.flow-run.heartbeat"]},
                    "resource": {"id": [f"prefect.flow-run.{run_id}"]},
                    "occurred": {"since": since},
                },
                "limit": 10,
            },
        )
        response.raise_for_status()
        return len(response.json()["events"])


KILL_TEST_ZOMBIE_SECONDS = 90


def test_a_run_whose_worker_is_killed_ends_crashed_and_the_next_completes(stack: Stack) -> None:
    """The zombie window shortened the way a user would (ELT_ZOMBIE_SECONDS, then the setup's
    prefect_setup.py) so the test waits 90 s for the Crashed state, not the stack's 240."""
    deadline = time.monotonic() + 300
    while (
        "healthy"
        not in sh(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", stack.container_ids()["prefect-worker"]], check=False
        ).stdout
    ):
        assert time.monotonic() < deadline, "worker not healthy after up"
        time.sleep(2)
    changed = _prefect_setup(stack, KILL_TEST_ZOMBIE_SECONDS)
    assert "automation crash-zombie-flow-runs: updated" in changed, changed
    try:
        with slowed_worker(stack) as worker:
            with stack.api as api:
                version_before = api.get("/deployments/name/all-etl/all-etl").json()["version"]
            run_id = stack.start_run()
            stack.wait_state(run_id, {"RUNNING"} | TERMINAL, 300)
            # The updated automation's trigger starts its window at the run's next heartbeat.
            since = stack.state(run_id)["timestamp"]
            deadline = time.monotonic() + 120
            while not _heartbeats_since(stack, run_id, since):
                assert time.monotonic() < deadline, f"no heartbeat of run {run_id} within 120 s"
                time.sleep(2)
            assert stack.state(run_id)["type"] == "RUNNING"
            t = time.monotonic()
            sh(["docker", "kill", worker])
            state = stack.wait_state(run_id, TERMINAL, 600)
            stack.timings["killed run marked crashed after"] = time.monotonic() - t
            assert state["type"] == "CRASHED", state
            assert state["message"] == (
                f"No heartbeat for {KILL_TEST_ZOMBIE_SECONDS} s: the worker or the machine stopped during the run."
            ), state
            # A stack this session brought up has the alert receivers (ELT_APPLIANCE_CHECKOUT's has none).
            if stack.receivers is not None:
                receivers = stack.receivers
                label, version = _deployed_commits(stack, run_id)
                commit = label or version
                for channel, message in one_per_channel(receivers, run_id, "all-etl Crashed").items():
                    lines = message.text.strip().splitlines()
                    assert lines[0].endswith(" is Crashed."), (channel, lines)
                    assert lines[2:] == [f"Cause: {state['message']}", f"Commit: {commit}", _run_link(stack, run_id)], (
                        channel,
                        lines,
                    )
                # It ran past ELT_ALERT_RUNNING_SECONDS (10 s) before it crashed.
                for channel, message in one_per_channel(receivers, run_id, "all-etl still running").items():
                    lines = message.text.strip().splitlines()
                    assert " has been Running for more than 10 s (since " in lines[0], (channel, lines)
                    assert lines[1] == "Cause: no end yet; a sync or a dbt query may be stuck (see the run's logs).", (
                        channel,
                        lines,
                    )
                    # Sent 10 s in: before update-code pulled (the version of before the run), or after.
                    assert lines[2] in {f"Commit: {label}", f"Commit: {version_before}"}, (channel, lines, label, version_before)
                    assert lines[3:] == [_run_link(stack, run_id)], (channel, lines)
                assert_no_secret(receivers.all())
    finally:
        restored = _prefect_setup(stack, stack.env["ELT_ZOMBIE_SECONDS"])
        assert "automation crash-zombie-flow-runs: updated" in restored, restored

    stack.compose("up", "-d")
    next_run = stack.start_run()
    state = stack.wait_state(next_run, TERMINAL, 900)
    assert state["type"] == "COMPLETED", state


def test_no_secret_from_env_reaches_any_container_log(stack: Stack) -> None:
    env = stack.env
    secrets = {
        "POSTGRES_PASSWORD": env["POSTGRES_PASSWORD"],
        "PREFECT_SERVER_API_AUTH_STRING": env["PREFECT_SERVER_API_AUTH_STRING"].partition(":")[2],
        "SLACK_WEBHOOK_URL": SLACK_URL.rsplit("/", 1)[1],
        "ELT_ALERT_SMTP_PASSWORD": SMTP_PASSWORD,
        "ELT_ALERT_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    logs = stack.compose("logs", "--no-color").stdout
    assert len(logs) > 1000
    leaked = [name for name, value in secrets.items() if value in logs or value in stack.first_output]
    assert not leaked, f"secrets in container logs or setup.sh output: {leaked}"


def _psql(stack: Stack, sql: str) -> list[str]:
    login = 'PGPASSWORD="$POSTGRES_PASSWORD" exec psql -h 127.0.0.1 -U prefect -d prefect -At -c "$0"'
    out = stack.compose("exec", "-T", "postgres", "sh", "-c", login, sql).stdout
    return [line for line in out.splitlines() if line]


def _rows(stack: Stack, table: str, runs: str) -> int:
    """Rows of `table` belonging to the flow runs `runs` selects (a SQL condition on flow_run_id)."""
    return int(_psql(stack, f"SELECT count(*) FROM {table} WHERE {runs}")[0])


def _finished_runs(stack: Stack) -> list[dict]:
    """Top-level flow runs that ended, the last to end first."""
    with stack.api as api:
        response = api.post(
            "/flow_runs/filter",
            json={
                "flow_runs": {"parent_task_run_id": {"is_null_": True}, "end_time": {"is_null_": False}},
                "sort": "END_TIME_DESC",
            },
        )
        response.raise_for_status()
        return response.json()


def test_runs_older_than_the_retention_are_deleted_with_their_logs_and_artifacts(stack: Stack) -> None:
    """Prefect's own database vacuum, as the compose file configures it (ELT_RETENTION_DAYS,
    default 30; the test stack checks every 5 s). The runs earlier tests left, child flow runs
    included, are aged 40 days in PostgreSQL (nothing else can make a run end in the past):
    they go, with their logs and artifacts; the newest run (every run that ended before it
    started is aged) with its own, the deployment, its schedules and the automations stay."""
    finished = _finished_runs(stack)
    for _ in range(2 - len(finished)):  # run alone (-k), the test makes the runs earlier tests leave
        assert stack.wait_state(stack.start_run(), TERMINAL, 900)["type"] == "COMPLETED"
        finished = _finished_runs(stack)
    with stack.api as api:
        recent, old = finished[0]["id"], finished[-1]["id"]
        recent_start = finished[0]["start_time"]
        automations_before = sorted(automation["name"] for automation in api.post("/automations/filter", json={}).json())
        schedules_before = api.get("/deployments/name/all-etl/all-etl").json()["schedules"]
    # Counted before the runs are aged: the vacuum (every 5 s) deletes them, and with them at once
    # their artifacts, as soon as they are old.
    to_age = _psql(stack, f"SELECT id FROM flow_run WHERE end_time < '{recent_start}'")
    assert old in to_age and recent not in to_age
    in_aged = f"flow_run_id IN ({', '.join(repr(run_id) for run_id in to_age)})"
    kept = f"flow_run_id IS NOT NULL AND NOT {in_aged}"
    assert _rows(stack, "log", in_aged) > 0 and _rows(stack, "artifact", in_aged) > 0
    kept_before = {table: _rows(stack, table, kept) for table in ("log", "artifact")}
    assert all(kept_before.values()), kept_before
    aged = _psql(
        stack,
        # A SELECT over the UPDATE: psql prints its rows and no "UPDATE n" tag.
        "WITH aged AS (UPDATE flow_run SET start_time = start_time - interval '40 days', "
        f"end_time = end_time - interval '40 days' WHERE {in_aged.replace('flow_run_id', 'id')} RETURNING id) "
        "SELECT id FROM aged",
    )
    assert sorted(aged) == sorted(to_age)

    deadline = time.monotonic() + 180
    while (
        _rows(stack, "flow_run", in_aged.replace("flow_run_id", "id"))
        or _rows(stack, "log", in_aged)
        or _rows(stack, "artifact", in_aged)
    ):
        assert time.monotonic() < deadline, "the vacuum left aged runs, logs or artifacts for 180 s"
        time.sleep(5)

    assert stack.state(recent)["type"] == "COMPLETED"
    for table, before in kept_before.items():
        assert _rows(stack, table, kept) >= before, f"the vacuum deleted {table} rows of runs inside the retention"
    with stack.api as api:
        assert api.get("/deployments/name/all-etl/all-etl").json()["schedules"] == schedules_before
        assert sorted(automation["name"] for automation in api.post("/automations/filter", json={}).json()) == automations_before


def test_the_appliance_doctor_reports_the_prefect_database_and_the_free_space_of_its_volume(stack: Stack) -> None:
    """docker/doctor.sh: elt doctor in the worker, then PostgreSQL's size and its volume's free
    space, which only the postgres container can see; under ELT_MIN_FREE_GB it fails naming it."""
    doctor = sh([str(stack.checkout / "docker" / "doctor.sh")], cwd=stack.checkout, check=False)
    lines = doctor.stdout.splitlines()
    assert any(line.startswith(("ok   disk space: ", "FAIL disk space: ")) for line in lines), doctor.stdout  # the worker's
    (database,) = [line for line in lines if line.startswith("ok   prefect database: ")]
    assert database.endswith(" MB in PostgreSQL (runs, logs, artifacts; kept ELT_RETENTION_DAYS)"), database
    shown = float(database.removeprefix("ok   prefect database: ").split(" MB")[0])
    actual = int(_psql(stack, "select pg_database_size('prefect')")[0]) / 1048576
    assert abs(shown - actual) <= max(1.0, actual * 0.1), (shown, actual)  # the database grows as runs are logged
    (volume,) = [line for line in lines if "postgres volume: " in line]
    assert re.fullmatch(r"ok   postgres volume: \d+\.\d GB free of \d+\.\d GB on the disk of PostgreSQL's volume", volume), volume

    full = sh(
        [str(stack.checkout / "docker" / "doctor.sh")],
        cwd=stack.checkout,
        check=False,
        env={**os.environ, "ELT_MIN_FREE_GB": "1000000"},
    )
    assert full.returncode == 1
    (volume,) = [line for line in full.stdout.splitlines() if "postgres volume: " in line]
    assert re.fullmatch(
        r"FAIL postgres volume: \d+\.\d GB free of \d+\.\d GB on the disk of PostgreSQL's volume, "
        r"under ELT_MIN_FREE_GB=1000000: free space or grow the disk",
        volume,
    ), volume


def test_backup_then_new_volumes_then_restore_brings_back_history_and_marts(stack: Stack, tmp_path: Path) -> None:
    """docker/backup.sh while the stack runs, `down -v` (every volume gone, as on a new VM),
    `up`, docker/restore.sh: the runs, the deployment, the automations and the marts are back,
    and the next run completes. Runs last: it replaces the stack's volumes."""
    with stack.api as api:
        runs_before = sorted(flow_run["id"] for flow_run in api.post("/flow_runs/filter", json={}).json())
        deployment_before = api.get("/deployments/name/all-etl/all-etl").json()["id"]
        automations_before = sorted(automation["name"] for automation in api.post("/automations/filter", json={}).json())
    marts_before = stack.mart_rows()
    assert runs_before and marts_before > 0

    backed_up = sh([str(stack.checkout / "docker" / "backup.sh"), str(tmp_path)], cwd=stack.checkout)
    folder = Path(backed_up.stdout.strip().splitlines()[-1].removeprefix("backed up to "))
    assert folder.parent == tmp_path and {path.name for path in folder.iterdir()} == {"prefect.dump", "warehouse.duckdb"}

    stack.compose("down", "-v", "--timeout", "10")
    stack.compose("up", "-d")
    wait_stack_healthy(stack)
    with stack.api as api:
        assert api.get("/deployments/name/all-etl/all-etl").status_code == 404, "down -v kept the database"

    restored = sh([str(stack.checkout / "docker" / "restore.sh"), str(folder)], cwd=stack.checkout)
    assert f"restored from {folder}" in restored.stdout, restored.stdout + restored.stderr
    wait_stack_healthy(stack)
    with stack.api as api:
        assert sorted(flow_run["id"] for flow_run in api.post("/flow_runs/filter", json={}).json()) == runs_before
        assert api.get("/deployments/name/all-etl/all-etl").json()["id"] == deployment_before
        assert sorted(automation["name"] for automation in api.post("/automations/filter", json={}).json()) == automations_before
    assert stack.mart_rows() == marts_before
    after = stack.start_run()
    assert stack.wait_state(after, TERMINAL, 900)["type"] == "COMPLETED"
