"""Alerts: the channels set in `.env` (Slack, email over SMTP, any JSON webhook), the Prefect
blocks that deliver them, the automations docker/prefect_setup.py creates from them, `elt alert
test`, and the reachability check of `elt doctor`.

The Prefect server sends every alert: each automation's SendNotification action renders the
templates below (Jinja, with the flow run, its deployment and the triggering event) and calls
each channel's block. Every message is a few short lines: what happened, the first line of the
cause (cut to CAUSE_CHARS), the deployed commit and the link to the run (PREFECT_UI_URL of the
server), so it fits what every channel accepts (Discord's 2,000 characters are the least).
No template reads a setting: no secret can reach a message.
"""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from elt.errors import ConfigurationError, EltError, first_line
from elt.settings import AlertWarnings, Settings, SmtpTls

if TYPE_CHECKING:
    from prefect.automations import Automation
    from prefect.blocks.abstract import NotificationBlock

SLACK_BLOCK = "elt-alerts"  # the name setup.sh has always given it
EMAIL_BLOCK = "elt-alerts-email"
WEBHOOK_BLOCK = "elt-alerts-webhook"
FLOW = "all-etl"
COMMIT_LABEL = "elt.commit"
CAUSE_CHARS = 500
MAX_MESSAGE_CHARS = 2000
REACH_TIMEOUT_SECONDS = 5.0

FAILED = "notify-failed-all-etl"
RUNNING_LONG = "notify-long-running-all-etl"
LATE = "notify-late-all-etl"
WARNINGS = "notify-dbt-warnings"
AUTOMATIONS = (FAILED, RUNNING_LONG, LATE, WARNINGS)
NO_CHANNEL = "no alert channel is set: SLACK_WEBHOOK_URL, ELT_ALERT_SMTP_HOST and ELT_ALERT_WEBHOOK_URL are empty"


@dataclass(frozen=True)
class Channel:
    kind: str  # slack, email or webhook
    block_name: str
    variable: str  # the setting to fix when the channel can't be reached
    host: str
    port: int
    where: str  # where messages go, with no secret in it
    make_block: Callable[[], NotificationBlock]
    secrets: tuple[str, ...] = ()  # values no output may show
    implicit_tls: bool = False  # SMTP over TLS from the first byte (ELT_ALERT_SMTP_TLS=ssl)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def channels(settings: Settings) -> list[Channel]:
    """Every configured channel; an incomplete one raises a ConfigurationError naming the variable."""
    found = []
    if settings.slack_webhook_url:
        found.append(_slack(settings.slack_webhook_url.get_secret_value()))
    if settings.alert_smtp_host:
        found.append(_email(settings))
    if settings.alert_webhook_url:
        found.append(_webhook(settings))
    return found


def _url_endpoint(url: str, variable: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{variable} is not an http(s) URL; set it to the URL the service gave you")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _slack(url: str) -> Channel:
    host, port = _url_endpoint(url, "SLACK_WEBHOOK_URL")

    def block() -> NotificationBlock:
        from prefect.blocks.notifications import SlackWebhook

        return SlackWebhook(url=url)

    return Channel("slack", SLACK_BLOCK, "SLACK_WEBHOOK_URL", host, port, host, block, (url,))


def _email(settings: Settings) -> Channel:
    host = settings.alert_smtp_host or ""
    recipients = [address.strip() for address in (settings.alert_email_to or "").split(",") if address.strip()]
    if not recipients:
        raise ConfigurationError(
            "ELT_ALERT_EMAIL_TO is empty: set the recipients of email alerts (comma-separated), or unset ELT_ALERT_SMTP_HOST"
        )
    if not settings.alert_email_from:
        raise ConfigurationError("ELT_ALERT_EMAIL_FROM is not set: email alerts need a sender address")
    password = settings.alert_smtp_password.get_secret_value() if settings.alert_smtp_password else ""
    if password and not settings.alert_smtp_user:
        raise ConfigurationError("ELT_ALERT_SMTP_PASSWORD is set but ELT_ALERT_SMTP_USER is not: set the login too")
    url = apprise_email_url(settings, recipients)

    def block() -> NotificationBlock:
        # Prefect has no SMTP notification block; its SlackWebhook hands any URL that is not a
        # Slack webhook to Apprise unchanged (SlackWebhook.block_initialization), and Apprise's
        # mailto:// and mailtos:// are SMTP. The block keeps the URL, password included, secret.
        from prefect.blocks.notifications import SlackWebhook

        return SlackWebhook(url=url)

    where = f"smtp {host}:{settings.alert_smtp_port} to {', '.join(recipients)}"
    port = settings.alert_smtp_port
    implicit_tls = settings.alert_smtp_tls is SmtpTls.ssl
    return Channel("email", EMAIL_BLOCK, "ELT_ALERT_SMTP_HOST", host, port, where, block, (password, url), implicit_tls)


def apprise_email_url(settings: Settings, recipients: list[str]) -> str:
    """Apprise's URL for SMTP (https://github.com/caronc/apprise/wiki/Notify_email)."""
    tls = settings.alert_smtp_tls
    login = ""
    if settings.alert_smtp_user:
        password = settings.alert_smtp_password.get_secret_value() if settings.alert_smtp_password else ""
        login = quote(settings.alert_smtp_user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
    mode = {SmtpTls.starttls: "starttls", SmtpTls.ssl: "ssl", SmtpTls.none: "insecure"}[tls]
    query = urlencode(
        {
            "smtp": settings.alert_smtp_host,
            "from": settings.alert_email_from,
            "to": ",".join(recipients),
            "mode": mode,
            "format": "text",  # plain text: the lines as written, the link as is
        }
    )
    scheme = "mailto" if tls is SmtpTls.none else "mailtos"
    return f"{scheme}://{login}{settings.alert_smtp_host}:{settings.alert_smtp_port}/?{query}"


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _webhook(settings: Settings) -> Channel:
    url = settings.alert_webhook_url.get_secret_value() if settings.alert_webhook_url else ""
    host, port = _url_endpoint(url, "ELT_ALERT_WEBHOOK_URL")
    header = settings.alert_webhook_header
    secret = settings.alert_webhook_secret.get_secret_value() if settings.alert_webhook_secret else ""
    if bool(header) != bool(secret):
        raise ConfigurationError(
            "ELT_ALERT_WEBHOOK_HEADER and ELT_ALERT_WEBHOOK_SECRET go together: set both (the header's name and value) or neither"
        )
    if header and not _HEADER_NAME.match(header):
        raise ConfigurationError(f"ELT_ALERT_WEBHOOK_HEADER={header!r} is not an HTTP header name (letters, digits, '-')")

    def block() -> NotificationBlock:
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        # The URL and the header's value are secrets of the block, filled in when it sends.
        return CustomWebhookNotificationBlock(
            name=WEBHOOK_BLOCK,
            url="{{url}}",
            json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
            headers={header: "{{header_value}}"} if header else None,
            secrets={"url": url, **({"header_value": secret} if header else {})},
        )

    return Channel("webhook", WEBHOOK_BLOCK, "ELT_ALERT_WEBHOOK_URL", host, port, host, block, (url, secret))


# --- what is sent ---------------------------------------------------------------------------
def _first_line(expression: str) -> str:
    """Jinja: the first line of `expression`, without Prefect's prefix, cut to CAUSE_CHARS."""
    return (
        "{{ ((" + expression + ") or 'no message given')"
        ".replace('Flow run encountered an exception: ', '').strip().split('\\n')[0]"
        f" | truncate({CAUSE_CHARS}, True, '…', 0) }}}}"
    )


# Which stage of all-etl raised, from the exception's type (Prefect's message starts "Type: ").
STAGE_OF_ERROR_PREFIX = {
    "extract-load": (
        "ExtractFailed",
        "UnknownConnections",
        "Connector",
        "Embedded",
        "ConnectionNotInFile",
        "UnknownStream",
        "ConnectionsFileError",
        "Airbyte",
    ),
    "update-code": ("Git",),
    "transform": ("Dbt", "WarehouseUnreachable", "Snowflake"),
}


def _stage(expression: str) -> str:
    """Jinja: the stage named by the exception type that starts `expression` (a state message)."""
    cause = f"(({expression}) or '').replace('Flow run encountered an exception: ', '')"
    branches = "".join(
        f"{'{% if' if index == 0 else '{% elif'} {cause}.startswith({prefixes!r}) %}}{stage}"
        for index, (stage, prefixes) in enumerate(STAGE_OF_ERROR_PREFIX.items())
    )
    joint = f"{{% elif 'connections failed to sync' in {cause} %}}extract-load, and a later stage"
    return branches + joint + "{% else %}not named by the cause (the run's child flow runs show it){% endif %}"


_COMMIT = (
    "Commit: {{ flow_run.labels.get('" + COMMIT_LABEL + "') or (deployment.version if deployment else '') "
    "or 'unknown (not pulled yet)' }}"
)
_LINK = "Run: {{ flow_run|ui_url }}"


@dataclass(frozen=True)
class Message:
    subject: str
    body: str


MESSAGES = {
    FAILED: Message(
        "all-etl {{ flow_run.state.name }}: {{ flow_run.name }}",
        "all-etl run {{ flow_run.name }} is {{ flow_run.state.name }}.\n"
        f"Stage: {_stage('flow_run.state.message')}\n"
        f"Cause: {_first_line('flow_run.state.message')}\n{_COMMIT}\n{_LINK}",
    ),
    RUNNING_LONG: Message(
        "all-etl still running: {{ flow_run.name }}",
        "all-etl run {{ flow_run.name }} has been Running for more than {seconds} s "
        "(since {{ flow_run.start_time }}).\n"
        "Cause: no end yet; a sync or a dbt query may be stuck (see the run's logs).\n"
        f"{_COMMIT}\n{_LINK}",
    ),
    LATE: Message(
        "all-etl Late: {{ flow_run.name }}",
        "Scheduled all-etl run {{ flow_run.name }} is Late: it was due at {{ flow_run.expected_start_time }} and has not started.\n"
        "Cause: no worker picked it up (is the prefect-worker service up? `docker compose ps`).\n"
        f"{_COMMIT}\n{_LINK}",
    ),
    WARNINGS: Message(
        "dbt warning: {{ event.resource.name }}",
        "dbt {{ event.resource['dbt.resource_type'] }} {{ event.resource.name }} ended in warn.\n"
        f"Cause: {_first_line('event.payload.message')}\n{_COMMIT}\n{_LINK}",
    ),
}

TERMINAL = ["Completed", "Failed", "Cancelled", "Crashed"]
_ALL_ETL = {"prefect.resource.role": "flow", "prefect.resource.name": FLOW}


def automations(settings: Settings, block_ids: list[Any]) -> dict[str, Automation | None]:
    """The alert automations, each sending to every block in `block_ids`; None: it should not exist."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification

    def automation(name: str, description: str, trigger: EventTrigger, **template: Any) -> Automation | None:
        if not block_ids:
            return None
        message = MESSAGES[name]
        return Automation(
            name=name,
            description=description,
            enabled=True,
            trigger=trigger,
            actions=[
                SendNotification(
                    block_document_id=block_id,
                    subject=message.subject,
                    body=message.body.replace("{seconds}", str(template.get("seconds", ""))),
                )
                for block_id in block_ids
            ],
        )

    runs = {"prefect.resource.id": ["prefect.flow-run.*"]}
    wanted = {
        FAILED: automation(
            FAILED,
            "A message on each alert channel when an all-etl run fails or crashes.",
            EventTrigger(
                posture=Posture.Reactive,
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match=runs,
                match_related=_ALL_ETL,
                for_each={"prefect.resource.id"},
                threshold=1,
                within=timedelta(0),
            ),
        ),
        RUNNING_LONG: automation(
            RUNNING_LONG,
            f"A message when an all-etl run is still Running after {settings.alert_running_seconds} s.",
            EventTrigger(
                posture=Posture.Proactive,
                after={"prefect.flow-run.Running"},
                expect={f"prefect.flow-run.{state}" for state in TERMINAL},
                match=runs,
                match_related=_ALL_ETL,
                for_each={"prefect.resource.id"},
                threshold=1,
                within=timedelta(seconds=settings.alert_running_seconds),
            ),
            seconds=settings.alert_running_seconds,
        ),
        LATE: automation(
            LATE,
            "A message when a scheduled all-etl run is Late (no worker started it).",
            EventTrigger(
                posture=Posture.Reactive,
                expect={"prefect.flow-run.Late"},
                match=runs,
                match_related=_ALL_ETL,
                for_each={"prefect.resource.id"},
                threshold=1,
                within=timedelta(0),
            ),
        ),
        WARNINGS: None,
    }
    if settings.alert_warnings is not AlertWarnings.off:
        daily = settings.alert_warnings is AlertWarnings.daily
        wanted[WARNINGS] = automation(
            WARNINGS,
            "A message at most once a day when a dbt node ends in warn."
            if daily
            else "A message for each dbt node that ends in warn (test warnings, stale sources).",
            EventTrigger(
                posture=Posture.Reactive,
                expect={"dbt.node.warn"},
                match={"prefect.resource.id": ["dbt.node.*"]},
                # daily: one bucket for all nodes; a reactive trigger fires on its first event and
                # then waits out the rest of its `within`.
                for_each=set() if daily else {"prefect.resource.id"},
                threshold=1,
                within=timedelta(days=1) if daily else timedelta(0),
            ),
        )
    return wanted


def label_run_with_commit(sha: str | None = None) -> None:
    """Label the running flow run with the commit it deploys, which the alerts name: `sha` once
    update-code pulled it; without `sha`, the label of the parent flow run (all-etl), if any."""
    from prefect.runtime import flow_run

    from prefect import get_client, get_run_logger

    if not flow_run.id:
        return
    try:
        with get_client(sync_client=True) as client:
            if not sha and flow_run.parent_flow_run_id:
                label = client.read_flow_run(flow_run.parent_flow_run_id).labels.get(COMMIT_LABEL)
                sha = str(label) if label else None
            if sha:
                client.update_flow_run_labels(flow_run.id, {COMMIT_LABEL: sha})
    except Exception as exc:  # noqa: BLE001 - observability only: the alerts then say the commit is unknown
        get_run_logger().warning("Could not label the run with its commit: %s", first_line(exc))


# --- elt alert test, elt doctor ---------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    channel: Channel
    ok: bool
    detail: str

    @property
    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.channel.kind} ({self.channel.where}): {self.detail}"


def send_test(channel: Channel) -> Answer:
    """Send one test message through the channel's block, as the automations would."""
    from prefect.blocks.abstract import NotificationError

    subject = "elt alert test"
    body = f"A test message from `elt alert test` to the {channel.kind} channel: alerts of all-etl arrive here."
    try:
        block = channel.make_block()
        notify: Any = block.notify  # sync here: Prefect's async_dispatch runs it in this thread
        with block.raise_on_failure():
            notify(body, subject)
    except NotificationError as exc:
        said = [re.sub(r"^\[[A-Z]+\]:\s*", "", line.strip()) for line in exc.log.splitlines() if line.strip()]  # Apprise's log
        return Answer(channel, False, channel.scrub(said[-1] if said else "not delivered"))
    except Exception as exc:  # noqa: BLE001 - any failure to send is this channel's answer
        return Answer(channel, False, channel.scrub(_http_answer(exc) or f"{type(exc).__name__}: {first_line(exc)}"))
    return Answer(channel, True, "accepted the test message")


def _http_answer(exc: Exception) -> str | None:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"answered HTTP {exc.response.status_code} {exc.response.reason_phrase}"
    return None


def check_reachable(channel: Channel) -> str:
    """Connect to the channel's server without sending a message; EltError naming the variable if it can't."""
    try:
        if channel.kind == "email":
            return _smtp_greeting(channel)
        with socket.create_connection((channel.host, channel.port), timeout=REACH_TIMEOUT_SECONDS):
            return f"{channel.kind} {channel.host}:{channel.port} reachable"
    except (OSError, smtplib.SMTPException) as exc:
        reason = channel.scrub(first_line(exc) or type(exc).__name__)
        raise EltError(
            f"{channel.kind}: {channel.host}:{channel.port} is not reachable ({reason}); check {channel.variable}"
            + (" and ELT_ALERT_SMTP_PORT" if channel.kind == "email" else "")
        ) from None


def _smtp_greeting(channel: Channel) -> str:
    """The server's 220 greeting, then QUIT: no login, no message."""
    smtp_class = smtplib.SMTP_SSL if channel.implicit_tls else smtplib.SMTP
    with smtp_class(channel.host, channel.port, timeout=REACH_TIMEOUT_SECONDS) as server:
        code, _ = server.noop()
    return f"email {channel.host}:{channel.port} answers SMTP ({code})"


def doctor_check(settings: Settings) -> str:
    found = channels(settings)
    if not found:
        return f"{NO_CHANNEL}: failures show only in the Prefect UI"
    problems = []
    reached = []
    for channel in found:
        try:
            reached.append(check_reachable(channel))
        except EltError as exc:
            problems.append(str(exc))
    if problems:
        raise EltError("; ".join(problems))
    return "; ".join(reached)
