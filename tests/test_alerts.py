"""Alerts delivered for real, to receivers on 127.0.0.1: an HTTP server standing in for Slack's
incoming webhook and for the generic webhook, and an SMTP server (aiosmtpd) for email.

The alerts go through the production path: docker/prefect_setup.py saves the blocks and the
automations, a real `prefect server start` (its triggers and actions services) renders and sends
them. Slack's block is the production SlackWebhook with a production-shaped URL
(https://hooks.slack.com/services/...); Apprise's Slack plugin builds the real payload and posts
it to `NotifySlack.webhook_url`. The only test-only change: a sitecustomize.py on the
PYTHONPATH of the Prefect server and of `elt alert test` (processes this module starts) sets
that class attribute to the local receiver, so nothing leaves this machine. Production code is
unchanged by it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from tests.alert_receivers import (
    CHANNELS,
    SITECUSTOMIZE,
    SLACK_URL,
    SMTP_PASSWORD,
    SMTP_USER,
    WEBHOOK_SECRET,
    Receivers,
    assert_no_secret,
    channel_settings,
    messages_about,
    one_per_channel,
    start_receivers,
    stop_receivers,
    wait_for,
)
from tests.conftest import BIN, REPO_ROOT, GitRemote, PrefectServer, _free_port, git

UI_URL = "http://127.0.0.1:4200"  # PREFECT_UI_URL of the stack: the tunnel's end


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    started = start_receivers()
    yield started
    stop_receivers(started)


@pytest.fixture(scope="module")
def slack_redirect(tmp_path_factory: pytest.TempPathFactory, receivers: Receivers) -> dict[str, str]:
    """Environment for a process whose Apprise posts Slack webhooks to the local receiver."""
    folder = tmp_path_factory.mktemp("slack-redirect")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(folder), "TEST_SLACK_WEBHOOK_BASE": receivers.http.slack_base}


@pytest.fixture
def alert_env(monkeypatch: pytest.MonkeyPatch, receivers: Receivers) -> dict[str, str]:
    """All three channels pointed at the receivers, as a user would set them in .env."""
    values = channel_settings(receivers)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    receivers.clear()
    receivers.smtp.logins.clear()
    receivers.http.status = 200
    return values


# --- a Prefect server whose Apprise posts to the local Slack -----------------------------------
@pytest.fixture(scope="module")
def alert_server(tmp_path_factory: pytest.TempPathFactory, slack_redirect: dict[str, str]) -> Iterator[PrefectServer]:
    """A real `prefect server start` (SQLite) for this module: its Apprise posts Slack webhooks to
    the receiver (slack_redirect), its UI URL is the tunnel's, and its late-runs service marks a
    run Late 1 s after its scheduled time (15 s by default). Flows in this process report to it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("alert-prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        **slack_redirect,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_UI_URL": UI_URL,
        "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - the process writes to it until the end
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrefectServer(f"http://127.0.0.1:{port}/api", home, process)

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            return server.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the alert test's Prefect server to answer /health", healthy, timeout=300)
    previous = os.environ.get("PREFECT_API_URL")
    # Events and logs go to the server of the moment their worker started: restart them here.
    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=30)
    os.environ["PREFECT_API_URL"] = server.api_url
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server
        for worker in (EventsWorker, APILogWorker):
            worker.drain_all(timeout=30)
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _prefect_setup() -> Any:
    spec = importlib.util.spec_from_file_location("prefect_setup", REPO_ROOT / "docker" / "prefect_setup.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_setup(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """docker/prefect_setup.py's alert part, with the settings of this environment; its output lines."""
    from elt.settings import load_settings

    capsys.readouterr()
    _prefect_setup().alerts(load_settings())
    return capsys.readouterr().out.splitlines()


def automations_named(server: PrefectServer, name: str) -> list[dict]:
    response = server.post("/automations/filter", {"automations": {"name": {"any_": [name]}}})
    response.raise_for_status()
    return response.json()


# --- tests ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_failing_all_etl_sends_one_message_per_channel_with_link_commit_and_cause(
    alert_server: PrefectServer,
    receivers: Receivers,
    alert_env: dict[str, str],
    tiny_remote: GitRemote,
    appliance_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real all-etl on the tiny project: a model that fails and a dbt test that warns. Each
    channel gets one Failed message (link, commit, the failed node) and one warning message."""
    from elt.flows import all_etl

    run_setup(capsys)
    tiny_remote.commit("dbt/models/broken.sql", "select missing_column from {{ ref('orders') }}\n", "break a model")
    commit = tiny_remote.commit(
        "dbt/tests/orders_warn.sql", "{{ config(severity='warn') }}\nselect * from {{ ref('orders') }}\n", "a warning"
    )
    state = all_etl(skip_extract=True, repo=str(tiny_remote.bare), return_state=True)
    assert state.is_failed()
    run_id = str(state.state_details.flow_run_id)

    failed = one_per_channel(receivers, run_id, "all-etl Failed")
    for channel, message in failed.items():
        lines = message.text.strip().splitlines()
        assert lines[0].startswith("all-etl run ") and lines[0].endswith(" is Failed."), (channel, lines)
        assert lines[1] == "Stage: transform", (channel, lines)
        assert lines[2] == (
            'Cause: DbtBuildFailed: dbt build failed on 1 node(s): model.tiny_shop.broken (error: Binder Error: Referenced column "missing_column" not found in FROM clause!)'
        ), lines
        assert lines[3] == f"Commit: {commit}", (channel, lines)
        assert lines[4] == f"Run: {UI_URL}/runs/flow-run/{run_id}", (channel, lines)
    assert failed["email to data@example.com"].headers["From"] == "elt@example.com"
    assert failed["webhook"].headers["X-Alert-Token"] == WEBHOOK_SECRET
    assert receivers.smtp.logins and set(receivers.smtp.logins) == {SMTP_USER}  # the password logged in

    transform_run = _child_run(alert_server, run_id, "transform")
    warned = one_per_channel(receivers, transform_run, "dbt warning: orders_warn")
    for channel, message in warned.items():
        lines = message.text.strip().splitlines()
        assert lines[0] == "dbt test orders_warn ended in warn.", (channel, lines)
        assert lines[1].startswith("Cause: Got "), (channel, lines)
        assert lines[2] == f"Commit: {commit}", (channel, lines)
        assert lines[3] == f"Run: {UI_URL}/runs/flow-run/{transform_run}", (channel, lines)
    # The child flow runs failed too (transform, then all-etl): only all-etl's failure is sent.
    failures = [message for message in receivers.all() if " is Failed." in message.text]
    assert {message.channel for message in failures} == set(CHANNELS), [(m.channel, m.subject) for m in failures]
    assert all(f"/runs/flow-run/{run_id}" in message.text for message in failures), [m.text for m in failures]
    assert_no_secret(receivers.all())


@pytest.mark.slow
def test_a_stale_source_is_left_out_and_fails_the_run_and_a_late_one_warns_on_each_channel(
    alert_server: PrefectServer,
    receivers: Receivers,
    alert_env: dict[str, str],
    appliance_remote: GitRemote,
    appliance_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real all-etl on the appliance's project (source-faker → DuckDB → dbt build), then again
    with skip_extract after the raw tables were aged in DuckDB, as a connection that stopped
    syncing leaves them: users last loaded 72 h ago (past its error_after, 48 h), products 30 h
    ago (past warn_after, 24 h). customer_lifetime_value, built on users, is left out and keeps
    its rows though every user's email changed; daily_revenue (purchases and products) is rebuilt.
    The run Fails naming the stale source: one Failed message per channel with that cause, one
    warning message per channel naming products and its last load, none for users."""
    from elt.dbt_runner import DbtSourcesStale
    from elt.flows import all_etl

    run_setup(capsys)
    first = all_etl(repo=str(appliance_remote.bare), return_state=True)
    assert first.is_completed(), first.message
    commit = git("rev-parse", "HEAD", cwd=appliance_remote.author_clone)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    stale_at, late_at = now - timedelta(hours=72), now - timedelta(hours=30)
    lifetime = "select * from main_marts.customer_lifetime_value order by user_id"
    revenue = "select * from main_marts.daily_revenue order by all"
    with duckdb.connect(str(appliance_env / "data" / "warehouse.duckdb")) as warehouse:
        lifetime_before, revenue_before = warehouse.execute(lifetime).fetchall(), warehouse.execute(revenue).fetchall()
        assert len(lifetime_before) == 200
        # New emails a rebuild would show (and break no dbt test); the load time of 72 h ago.
        warehouse.execute("update raw_faker.users set email = 'moved@example.com', _airbyte_extracted_at = ?", [stale_at])
        warehouse.execute("update raw_faker.products set _airbyte_extracted_at = ?", [late_at])
        warehouse.execute("delete from raw_faker.purchases where id % 2 = 0")

    state = all_etl(skip_extract=True, repo=str(appliance_remote.bare), return_state=True)
    assert state.is_failed()
    cause = f"source faker.users is stale: last loaded {stale_at:%Y-%m-%d %H:%M} UTC, error_after 48 hours"
    with pytest.raises(DbtSourcesStale) as error:
        state.result()
    assert str(error.value) == cause
    with duckdb.connect(str(appliance_env / "data" / "warehouse.duckdb"), read_only=True) as warehouse:
        assert warehouse.execute(lifetime).fetchall() == lifetime_before  # stale data not presented as fresh
        assert warehouse.execute(revenue).fetchall() != revenue_before  # rebuilt from the purchases left

    run_id = str(state.state_details.flow_run_id)
    transform_run = _child_run(alert_server, run_id, "transform")
    (nodes,) = [artifact for artifact in alert_server.artifacts("dbt-node-results") if artifact["flow_run_id"] == transform_run]
    rows = nodes["data"] if isinstance(nodes["data"], list) else json.loads(nodes["data"])
    statuses = {row["node"]: row["status"] for row in rows}
    late = f"source faker.products is stale: last loaded {late_at:%Y-%m-%d %H:%M} UTC, warn_after 24 hours"
    assert rows[:3] == [
        {
            "node": "source.elt_appliance.faker.products",
            "status": "freshness warn",
            "seconds": None,
            "rows_affected": None,
            "message": late,
        },
        {
            "node": "source.elt_appliance.faker.purchases",
            "status": "freshness pass",
            "seconds": None,
            "rows_affected": None,
            "message": rows[1]["message"],
        },
        {
            "node": "source.elt_appliance.faker.users",
            "status": "freshness error",
            "seconds": None,
            "rows_affected": None,
            "message": cause,
        },
    ]
    assert rows[1]["message"].startswith("source faker.purchases is fresh: last loaded ")
    assert statuses["model.elt_appliance.daily_revenue"] == "success"
    assert statuses["model.elt_appliance.stg_faker__products"] == "success"
    assert "model.elt_appliance.customer_lifetime_value" not in statuses
    assert "model.elt_appliance.stg_faker__users" not in statuses
    summary = [artifact for artifact in alert_server.artifacts("all-etl-summary") if artifact["flow_run_id"] == run_id]
    assert f"**Failed:** {cause}\n" in summary[0]["data"]

    failed = one_per_channel(receivers, run_id, "all-etl Failed")
    for channel, message in failed.items():
        lines = message.text.strip().splitlines()
        assert lines[1:4] == ["Stage: transform", f"Cause: DbtSourcesStale: {cause}", f"Commit: {commit}"], (channel, lines)
    warned = one_per_channel(receivers, transform_run, "dbt warning: faker.products")
    for channel, message in warned.items():
        lines = message.text.strip().splitlines()
        assert lines == [
            "dbt source faker.products ended in warn.",
            f"Cause: {late}",
            f"Commit: {commit}",
            f"Run: {UI_URL}/runs/flow-run/{transform_run}",
        ], (channel, lines)
    assert not [message for message in receivers.all() if "faker.users" in message.subject]
    assert_no_secret(receivers.all())


def _child_run(server: PrefectServer, parent_id: str, flow_name: str) -> str:
    response = server.post("/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC"})
    response.raise_for_status()
    task_runs = {run["parent_task_run_id"] for run in response.json()}
    for run in response.json():
        task = server.get(f"/task_runs/{run['parent_task_run_id']}").json() if run["parent_task_run_id"] else {}
        if task.get("flow_run_id") == parent_id:
            return run["id"]
    pytest.fail(f"no {flow_name} run under {parent_id}: {task_runs}")


@pytest.mark.slow
def test_setup_twice_and_with_a_changed_url_keeps_one_automation_per_kind_and_updates_the_block(
    alert_server: PrefectServer, alert_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from elt import alerts

    run_setup(capsys)  # whatever an earlier test left: now as this environment says
    assert run_setup(capsys) == [
        "slack block elt-alerts: unchanged",
        "email block elt-alerts-email: unchanged",
        "webhook block elt-alerts-webhook: unchanged",
        *(f"automation {name}: unchanged" for name in alerts.AUTOMATIONS),
    ]
    block_id = CustomWebhookNotificationBlock.load(alerts.WEBHOOK_BLOCK)._block_document_id
    monkeypatch.setenv("ELT_ALERT_WEBHOOK_URL", alert_env["ELT_ALERT_WEBHOOK_URL"] + "-moved")
    monkeypatch.setenv("ELT_ALERT_RUNNING_SECONDS", "3600")
    assert run_setup(capsys) == [
        "slack block elt-alerts: unchanged",
        "email block elt-alerts-email: unchanged",
        "webhook block elt-alerts-webhook: updated",
        "automation notify-failed-all-etl: unchanged",
        "automation notify-long-running-all-etl: updated",
        "automation notify-late-all-etl: unchanged",
        "automation notify-dbt-warnings: unchanged",
    ]
    moved = CustomWebhookNotificationBlock.load(alerts.WEBHOOK_BLOCK)
    assert moved._block_document_id == block_id
    assert moved.secrets.get_secret_value()["url"] == alert_env["ELT_ALERT_WEBHOOK_URL"] + "-moved"
    for name in alerts.AUTOMATIONS:
        (automation,) = automations_named(alert_server, name)
        assert len(automation["actions"]) == 3, automation["actions"]
    (long_running,) = automations_named(alert_server, alerts.RUNNING_LONG)
    assert long_running["trigger"]["within"] == 3600.0

    monkeypatch.setenv("ELT_ALERT_WARNINGS", "daily")
    assert "automation notify-dbt-warnings: updated" in run_setup(capsys)
    (warnings,) = automations_named(alert_server, alerts.WARNINGS)
    assert (warnings["trigger"]["for_each"], warnings["trigger"]["within"]) == ([], 86400.0)

    monkeypatch.setenv("ELT_ALERT_WARNINGS", "off")
    monkeypatch.delenv("ELT_ALERT_WEBHOOK_URL")
    lines = run_setup(capsys)
    assert lines[-1] == "automation notify-dbt-warnings: deleted (ELT_ALERT_WARNINGS=off)", lines
    assert automations_named(alert_server, alerts.WARNINGS) == []
    (failed,) = automations_named(alert_server, alerts.FAILED)
    assert len(failed["actions"]) == 2, failed["actions"]


def _run_alert_test(slack_redirect: dict[str, str], alert_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **alert_env, **slack_redirect}
    return subprocess.run([str(BIN / "elt"), "alert", "test"], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two `elt` processes: 10 s of imports each
def test_elt_alert_test_sends_one_message_to_each_channel_and_says_what_each_answered(
    receivers: Receivers, alert_env: dict[str, str], slack_redirect: dict[str, str]
) -> None:
    completed = _run_alert_test(slack_redirect, alert_env)
    port = receivers.smtp.port
    assert completed.stdout.splitlines() == [
        "ok   slack (hooks.slack.com): accepted the test message",
        f"ok   email (smtp 127.0.0.1:{port} to oncall@example.com, data@example.com): accepted the test message",
        "ok   webhook (127.0.0.1): accepted the test message",
    ], completed.stderr
    assert completed.returncode == 0
    assert sorted(message.channel for message in receivers.all()) == CHANNELS
    assert {message.subject for message in receivers.all()} == {"elt alert test"}
    assert_no_secret(receivers.all())

    receivers.clear()
    receivers.http.status = 500
    failed = _run_alert_test(slack_redirect, alert_env)
    assert failed.stdout.splitlines()[2] == "FAIL webhook (127.0.0.1): answered HTTP 500 Internal Server Error", failed.stdout
    assert (
        failed.stdout.splitlines()[0]
        == "FAIL slack (hooks.slack.com): Failed to send to Slack: Internal server error., error=500."
    )
    assert failed.returncode == 1
    assert WEBHOOK_SECRET not in failed.stdout + failed.stderr and "slacktokenXYZ123" not in failed.stdout + failed.stderr


def test_no_secret_is_in_any_message_a_channel_receives(
    receivers: Receivers, alert_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each channel's block, as prefect_setup saves it, sends to the receivers from this process
    (Apprise's Slack plugin redirected here as in the Prefect server): the SMTP password only logs
    in, the webhook's secret only rides in its header, the Slack token only in the URL path."""
    from apprise.plugins.slack import NotifySlack

    from elt import alerts
    from elt.settings import load_settings

    monkeypatch.setattr(NotifySlack, "webhook_url", receivers.http.slack_base)
    answers = [alerts.send_test(channel) for channel in alerts.channels(load_settings())]
    assert [answer.line for answer in answers if not answer.ok] == []
    assert sorted(message.channel for message in receivers.all()) == CHANNELS
    assert_no_secret(receivers.all())
    (webhook,) = [message for message in receivers.all() if message.channel == "webhook"]
    assert webhook.headers["X-Alert-Token"] == WEBHOOK_SECRET
    assert receivers.smtp.logins == [SMTP_USER]  # the password logged in (once, for both emails)


def test_doctor_names_the_variable_of_an_unreachable_channel_and_sends_nothing(
    receivers: Receivers, alert_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from elt.cli import app

    closed = _free_port()
    monkeypatch.delenv("SLACK_WEBHOOK_URL")  # hooks.slack.com: tests do not leave this machine
    monkeypatch.setenv("ELT_ALERT_SMTP_PORT", str(closed))
    result = CliRunner().invoke(app, ["doctor"])
    (line,) = [line for line in result.output.splitlines() if " alerts: " in line]
    assert line == (
        f"FAIL alerts: email: 127.0.0.1:{closed} is not reachable ([Errno 111] Connection refused); "
        "check ELT_ALERT_SMTP_HOST and ELT_ALERT_SMTP_PORT"
    )
    monkeypatch.setenv("ELT_ALERT_SMTP_PORT", str(receivers.smtp.port))
    result = CliRunner().invoke(app, ["doctor"])
    (line,) = [line for line in result.output.splitlines() if " alerts: " in line]
    assert line == (
        f"ok   alerts: email 127.0.0.1:{receivers.smtp.port} answers SMTP (250); "
        f"webhook 127.0.0.1:{receivers.http.port} reachable"
    )
    assert receivers.all() == []


@pytest.mark.parametrize(
    "name", ["notify-failed-all-etl", "notify-long-running-all-etl", "notify-late-all-etl", "notify-dbt-warnings"]
)
def test_every_message_is_cut_to_what_a_channel_takes_and_keeps_the_link(name: str) -> None:
    """Each automation's subject and body, rendered by the Prefect server's own template renderer
    and filters, with a 10,000-character cause: the cause is cut, the commit and the link stay."""
    import uuid

    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.schemas.core import FlowRun
    from prefect.server.schemas.states import State, StateType
    from prefect.server.utilities.user_templates import register_user_template_filters, render_user_template_sync
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    from elt import alerts

    cause = "EltError: " + "x" * 10_000 + "\nthe second line"
    run = FlowRun(
        id=uuid.uuid4(),
        name="loud-run",
        flow_id=uuid.uuid4(),
        state=State(type=StateType.FAILED, name="Failed", message=f"Flow run encountered an exception: {cause}"),
        labels={alerts.COMMIT_LABEL: "abc123"},
    )
    event = ReceivedEvent(
        occurred=datetime.now(UTC),
        event="dbt.node.warn",
        resource={"prefect.resource.id": "dbt.node.test.shop.big", "prefect.resource.name": "big", "dbt.resource_type": "test"},
        payload={"message": cause},
        id=uuid.uuid4(),
    )
    register_user_template_filters(all_filters)
    message = alerts.MESSAGES[name]
    context = {"flow_run": run, "deployment": None, "event": event}
    with temporary_settings({PREFECT_UI_URL: UI_URL}):
        subject = render_user_template_sync(message.subject, context)
        body = render_user_template_sync(message.body, context)
    assert len(subject) + len(body) <= alerts.MAX_MESSAGE_CHARS, (len(subject), len(body))
    assert body.splitlines()[-2:] == ["Commit: abc123", f"Run: {UI_URL}/runs/flow-run/{run.id}"]
    if "Cause: EltError" in body:
        assert "x" * alerts.CAUSE_CHARS not in body and "second line" not in body


@pytest.mark.parametrize(
    ("message", "stage"),
    [
        ("ExtractFailed: 1 of 2 connections failed to sync: faker: boom", "extract-load"),
        ("AirbyteJobTimedOut: sync of orders ran longer than 21600 s", "extract-load"),
        (
            "EltError: 1 of 2 connections failed to sync: faker: boom; and then: dbt build failed",
            "extract-load, and a later stage",
        ),
        ("GitHistoryDiverged: origin/main and the checkout diverged", "update-code"),
        ("DbtBuildFailed: dbt build failed on 1 node(s): model.shop.orders (error: x)", "transform"),
        ("WarehouseInUse: another run holds the warehouse", "not named by the cause (the run's child flow runs show it)"),
    ],
)
def test_a_failure_message_names_the_stage_that_raised(message: str, stage: str) -> None:
    import uuid

    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.schemas.core import FlowRun
    from prefect.server.schemas.states import State, StateType
    from prefect.server.utilities.user_templates import register_user_template_filters, render_user_template_sync

    from elt import alerts

    state = State(type=StateType.FAILED, name="Failed", message=f"Flow run encountered an exception: {message}")
    run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4(), state=state)
    register_user_template_filters(all_filters)
    body = render_user_template_sync(alerts.MESSAGES[alerts.FAILED].body, {"flow_run": run, "deployment": None})
    assert body.splitlines()[1:3] == [f"Stage: {stage}", f"Cause: {message}"]


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        (
            "ELT_ALERT_EMAIL_TO",
            " , ",
            "ELT_ALERT_EMAIL_TO is empty: set the recipients of email alerts (comma-separated), or unset ELT_ALERT_SMTP_HOST",
        ),
        (
            "ELT_ALERT_WEBHOOK_SECRET",
            "",
            "ELT_ALERT_WEBHOOK_HEADER and ELT_ALERT_WEBHOOK_SECRET go together: set both (the header's name and value) or neither",
        ),
        (
            "ELT_ALERT_WEBHOOK_URL",
            "hooks.example.com/elt",
            "ELT_ALERT_WEBHOOK_URL is not an http(s) URL; set it to the URL the service gave you",
        ),
        (
            "SLACK_WEBHOOK_URL",
            "ftp://hooks.slack.com/x",
            "SLACK_WEBHOOK_URL is not an http(s) URL; set it to the URL the service gave you",
        ),
    ],
)
def test_an_incomplete_channel_is_one_line_naming_the_variable(
    alert_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    slack_redirect: dict[str, str],
    variable: str,
    value: str,
    error: str,
) -> None:
    from typer.testing import CliRunner

    from elt.cli import app

    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(app, ["alert", "test"])
    assert result.output.strip() == f"error: {error}"
    assert result.exit_code == 2


@pytest.mark.slow
def test_an_all_etl_still_running_past_the_limit_sends_one_message_per_channel(
    alert_server: PrefectServer,
    receivers: Receivers,
    alert_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run named all-etl that keeps running until the alert about it has arrived everywhere."""
    from prefect.runtime import flow_run

    from elt import alerts
    from prefect import flow

    monkeypatch.setenv("ELT_ALERT_RUNNING_SECONDS", "10")  # Prefect's least for a proactive trigger
    run_setup(capsys)
    commit = "c0ffee0123456789c0ffee0123456789c0ffee01"

    @flow(name="all-etl")
    def stuck_all_etl() -> str:
        alerts.label_run_with_commit(commit)
        run_id = str(flow_run.id)
        wait_for("the still-running alert on every channel", lambda: len(messages_about(receivers, run_id, "all-etl still")) >= 4)
        return run_id

    run_id = stuck_all_etl()
    running = one_per_channel(receivers, run_id, "all-etl still running")
    for channel, message in running.items():
        lines = message.text.strip().splitlines()
        assert lines[0].startswith("all-etl run ") and " has been Running for more than 10 s (since " in lines[0], (
            channel,
            lines,
        )
        assert lines[1] == "Cause: no end yet; a sync or a dbt query may be stuck (see the run's logs).", (channel, lines)
        assert lines[2] == f"Commit: {commit}", (channel, lines)
        assert lines[3] == f"Run: {UI_URL}/runs/flow-run/{run_id}", (channel, lines)
    assert_no_secret(receivers.all())


@pytest.mark.slow
def test_a_scheduled_all_etl_that_no_worker_starts_turns_late_and_sends_one_message_per_channel(
    alert_server: PrefectServer, receivers: Receivers, alert_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A deployment of all-etl with no worker: Prefect's late-runs service marks its due run Late.
    The commit is the deployment's version (what reporting.show_deployed_commit_as_version sets)."""
    from prefect.states import Scheduled

    from prefect import get_client

    run_setup(capsys)
    commit = "1a7e0123456789abcdef0123456789abcdef0123"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("all-etl")
        deployment_id = client.create_deployment(flow_id=flow_id, name="late-alert-test", version=commit)
        due = datetime.now(UTC) - timedelta(seconds=5)
        run = client.create_flow_run_from_deployment(deployment_id, state=Scheduled(scheduled_time=due))
    try:
        run_id = str(run.id)
        late = one_per_channel(receivers, run_id, "all-etl Late")
        for channel, message in late.items():
            lines = message.text.strip().splitlines()
            assert lines[0].startswith(f"Scheduled all-etl run {run.name} is Late: it was due at "), (channel, lines)
            assert lines[1] == "Cause: no worker picked it up (is the prefect-worker service up? `docker compose ps`).", lines
            assert lines[2] == f"Commit: {commit}", (channel, lines)
            assert lines[3] == f"Run: {UI_URL}/runs/flow-run/{run_id}", (channel, lines)
        assert_no_secret(receivers.all())
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


@pytest.mark.slow
def test_a_crashed_all_etl_sends_one_message_per_channel(
    alert_server: PrefectServer, receivers: Receivers, alert_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A Running all-etl set Crashed the way crash-zombie-flow-runs does when a worker dies (the
    kill itself is the compose stack's test): one message per channel naming the cause."""
    from prefect.states import Crashed, Running

    from elt import alerts
    from prefect import flow, get_client

    @flow(name="all-etl")
    def all_etl_on_a_dead_worker() -> None:
        """Never runs here: the run is created, then set Running and Crashed as the server would."""

    run_setup(capsys)
    commit = "dead0123456789abcdef0123456789abcdef0123"
    with get_client(sync_client=True) as client:
        run_id = client.create_flow_run(all_etl_on_a_dead_worker, name="killed-worker").id
        client.update_flow_run_labels(run_id, {alerts.COMMIT_LABEL: commit})
        client.set_flow_run_state(run_id, Running(), force=True)
        client.set_flow_run_state(
            run_id, Crashed(message="No heartbeat for 300 s: the worker or the machine stopped during the run."), force=True
        )
    crashed = one_per_channel(receivers, str(run_id), "all-etl Crashed")
    for channel, message in crashed.items():
        lines = message.text.strip().splitlines()
        assert lines[0].endswith(" is Crashed."), (channel, lines)
        assert lines[2] == "Cause: No heartbeat for 300 s: the worker or the machine stopped during the run.", lines
        assert lines[3] == f"Commit: {commit}", (channel, lines)
        assert lines[4] == f"Run: {UI_URL}/runs/flow-run/{run_id}", (channel, lines)


def test_setup_refuses_an_incomplete_channel_read_from_stdin_in_one_line() -> None:
    """setup.sh pipes the alert lines of .env to prefect_setup.py; an incomplete channel stops it
    before it changes anything (no Prefect API is needed to see that)."""
    lines = f"SLACK_WEBHOOK_URL={SLACK_URL}\nELT_ALERT_SMTP_HOST=smtp.example.com\nELT_ALERT_SMTP_PASSWORD='{SMTP_PASSWORD}'\n"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "prefect_setup.py"), "--settings-from-stdin"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
    )
    assert completed.stderr.strip() == (
        "error: ELT_ALERT_EMAIL_TO is empty: set the recipients of email alerts (comma-separated), or unset ELT_ALERT_SMTP_HOST"
    )
    assert completed.returncode == 2 and completed.stdout == ""
    assert SMTP_PASSWORD not in completed.stderr
