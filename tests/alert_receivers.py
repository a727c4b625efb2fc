"""Receivers for alert tests: an HTTP server standing in for Slack's incoming webhook and for the
generic webhook, and an SMTP server (aiosmtpd) for email, each recording what it received.

Used by tests/test_alerts.py (a Prefect server on this machine, receivers on 127.0.0.1) and by
the compose stack's tests (the stack's Prefect server sends to receivers on the Docker bridge).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest

from tests.conftest import _free_port

SLACK_URL = "https://hooks.slack.com/services/T0ALERTS/B0ALERTS/slacktokenXYZ123"
SMTP_USER = "elt-alerts"
SMTP_PASSWORD = "smtp-Pa55word-never-in-a-message"
WEBHOOK_SECRET = "webhook-header-value-never-in-a-message"
SITECUSTOMIZE = """
import os

if os.environ.get("TEST_SLACK_WEBHOOK_BASE"):
    from apprise.plugins.slack import NotifySlack

    NotifySlack.webhook_url = os.environ["TEST_SLACK_WEBHOOK_BASE"]
"""


T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90) -> T:
    """Poll `probe` until it returns something truthy; fail the test naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


# --- receivers --------------------------------------------------------------------------------
@dataclass
class Received:
    channel: str  # slack, webhook or email
    subject: str
    text: str  # what a person reads
    raw: bytes  # the whole request body or email, to look for secrets in
    headers: dict[str, str]


def slack_text(payload: dict[str, Any]) -> tuple[str, str]:
    """(title, text) of a message in the shape Slack documents for incoming webhooks
    (https://api.slack.com/messaging/webhooks): a JSON object with `text`, `blocks` or
    `attachments` (each attachment with `text` or `blocks`); fails the test otherwise."""
    assert isinstance(payload, dict), payload
    assert {"text", "blocks", "attachments"} & payload.keys(), payload
    parts: list[str] = [payload["text"]] if isinstance(payload.get("text"), str) else []
    title = ""
    for attachment in payload.get("attachments", []):
        assert isinstance(attachment, dict) and ({"text", "blocks"} & attachment.keys()), attachment
        title = attachment.get("title", title)
        parts.append(attachment.get("text", ""))
    for block in payload.get("blocks", []):
        assert block.get("type") in {"section", "header", "context", "divider"}, block
    return title, "\n".join(parts)


class HttpReceiver:
    """Slack's and the generic webhook's stand-in: records each POST; answers `status`."""

    def __init__(self, host: str = "127.0.0.1", seen_as: str | None = None) -> None:
        self.received: list[Received] = []
        self.status = 200
        self.seen_as = seen_as or host
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(raw)
                if self.path.startswith("/services/"):
                    assert self.headers["Content-Type"].startswith("application/json")
                    subject, text = slack_text(payload)
                    channel = "slack"
                else:
                    subject, text, channel = payload["subject"], payload["body"], "webhook"
                    assert payload["text"] == f"{subject}\n{text}", payload
                receiver.received.append(Received(channel, subject, text, raw, dict(self.headers)))
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def slack_base(self) -> str:
        return f"http://{self.seen_as}:{self.port}/services"

    @property
    def webhook_url(self) -> str:
        return f"http://{self.seen_as}:{self.port}/hooks/elt"


class SmtpReceiver:
    """An SMTP server (aiosmtpd) that takes only SMTP_USER/SMTP_PASSWORD logins and records each email."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.received: list[Received] = []
        self.logins: list[str] = []
        receiver = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                email: Message = message_from_bytes(envelope.content)
                body = (
                    email.get_payload(decode=True)
                    if not email.is_multipart()
                    else email.get_payload()[0].get_payload(decode=True)
                )
                text = body.decode() if isinstance(body, bytes) else str(body)
                headers = {"To": ", ".join(envelope.rcpt_tos), "From": envelope.mail_from}
                # Apprise sends one email per recipient: the channel is "email to <recipient>".
                channel = f"email to {', '.join(envelope.rcpt_tos)}"
                receiver.received.append(Received(channel, str(email["Subject"]), text, envelope.content, headers))
                return "250 OK"

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = data.login.decode() == SMTP_USER and data.password.decode() == SMTP_PASSWORD
            receiver.logins.append(data.login.decode())
            return AuthResult(success=ok)

        self.port = _free_port()
        self.controller = Controller(Handler(), hostname=host, port=self.port, authenticator=authenticate, auth_require_tls=False)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


@dataclass
class Receivers:
    http: HttpReceiver
    smtp: SmtpReceiver

    def all(self) -> list[Received]:
        return self.http.received + self.smtp.received

    def clear(self) -> None:
        self.http.received.clear()
        self.smtp.received.clear()


def messages_about(receivers: Receivers, run_id: str, subject_starts: str) -> list[Received]:
    return [message for message in receivers.all() if run_id in message.text and message.subject.startswith(subject_starts)]


CHANNELS = ["email to data@example.com", "email to oncall@example.com", "slack", "webhook"]


def one_per_channel(receivers: Receivers, run_id: str, subject_starts: str) -> dict[str, Received]:
    """Waits until each channel (each email recipient) got a message about the run; its message.

    Prefect's actions service delivers at least once: an action whose success it could not record
    (a busy SQLite, as on a loaded CI machine) runs again. So a channel may get the same message
    twice, never a different one."""
    wait_for(
        f"a '{subject_starts}' message about flow run {run_id} on {', '.join(CHANNELS)}",
        lambda: {m.channel for m in messages_about(receivers, run_id, subject_starts)} == set(CHANNELS),
    )
    messages = messages_about(receivers, run_id, subject_starts)
    first = {}
    for message in messages:
        first.setdefault(message.channel, message)
        assert message.text == first[message.channel].text, (message.channel, message.text, first[message.channel].text)
    assert sorted(first) == CHANNELS, [(m.channel, m.subject) for m in messages]
    return first


def assert_no_secret(messages: list[Received]) -> None:
    for message in messages:
        for secret in (SMTP_PASSWORD, WEBHOOK_SECRET, "slacktokenXYZ123"):
            assert secret.encode() not in message.raw, (message.channel, secret)


def channel_settings(receivers: Receivers, smtp_host: str = "127.0.0.1") -> dict[str, str]:
    """All three channels pointed at the receivers, as a user would set them in .env."""
    return {
        "SLACK_WEBHOOK_URL": SLACK_URL,
        "ELT_ALERT_SMTP_HOST": smtp_host,
        "ELT_ALERT_SMTP_PORT": str(receivers.smtp.port),
        "ELT_ALERT_SMTP_TLS": "none",
        "ELT_ALERT_SMTP_USER": SMTP_USER,
        "ELT_ALERT_SMTP_PASSWORD": SMTP_PASSWORD,
        "ELT_ALERT_EMAIL_FROM": "elt@example.com",
        "ELT_ALERT_EMAIL_TO": "oncall@example.com, data@example.com",
        "ELT_ALERT_WEBHOOK_URL": receivers.http.webhook_url,
        "ELT_ALERT_WEBHOOK_HEADER": "X-Alert-Token",
        "ELT_ALERT_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def start_receivers(host: str = "127.0.0.1", seen_as: str | None = None) -> Receivers:
    """Both receivers listening on `host`; `seen_as` is the name senders reach it by."""
    return Receivers(HttpReceiver(host, seen_as), SmtpReceiver(host))


def stop_receivers(receivers: Receivers) -> None:
    receivers.http.server.shutdown()
    receivers.smtp.stop()
