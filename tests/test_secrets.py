"""No secret setting leaks: not into output, logs, artifacts, flow-run parameters or files left behind.

The secret settings are found by introspection (every `SecretStr` field of `Settings`), so a new
secret is covered the day it is added: the test fails until the scenarios below give it a value.
Each scenario is a real `elt run` and `elt doctor` through the CLI, against the session's real
Prefect server: the embedded backend into Snowflake with a password, dbt on Snowflake with an
encrypted key pair, and the server backend. Snowflake is fakesnow and the Airbyte server is the
contract-checked fake (tests/fakes/airbyte_server.py): both accept any credentials, so this shows
where the appliance puts secrets, not that a real service would accept them.

A leak is any substring of 8 or more characters of a secret: enough to rule out a partly masked or
truncated secret, short enough that chance matches in the collected text are negligible (the
secrets are random URL-safe strings, not hex, which UUIDs in the logs would match).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from elt.settings import Settings
from tests.conftest import BIN, FakesnowServer, GitRemote, PrefectServer, make_remote
from tests.fakes.airbyte_server import FakeAirbyte

LEAK_WINDOW = 8


def secret_fields() -> list[str]:
    return [
        name
        for name, info in Settings.model_fields.items()
        if info.annotation is SecretStr or SecretStr in typing.get_args(info.annotation)
    ]


def variable_of(field_name: str) -> str:
    alias = Settings.model_fields[field_name].validation_alias
    if alias is not None:
        return alias.choices[0] if hasattr(alias, "choices") else str(alias)
    return f"ELT_{field_name.upper()}"


def _random_secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_urlsafe(24)}"


@dataclass
class Haystack:
    """Everything a person or another process could read after the runs."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str) -> None:
        self.texts[where] = self.texts.get(where, "") + "\n" + text

    def add_files(self, root: Path) -> None:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    self.add(str(path), path.read_bytes().decode("utf-8", "replace"))
                except OSError:
                    continue

    def leaks(self, secret: str) -> list[str]:
        """Where any LEAK_WINDOW-character piece of `secret` (per line, for multi-line secrets) appears."""
        windows = {
            line[i : i + LEAK_WINDOW]
            for line in secret.splitlines()
            if not line.startswith("-----")  # a PEM's BEGIN/END lines are public
            for i in range(len(line) - LEAK_WINDOW + 1)
        }
        return sorted({where for where, text in self.texts.items() for window in windows if window in text})


def _pem(passphrase: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()


@dataclass
class Scenario:
    name: str
    env: dict[str, str]
    commands: list[list[str]]


@pytest.fixture(scope="module")
def leak_search(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: PrefectServer, fakesnow_server: FakesnowServer
) -> Iterator[tuple[dict[str, str], Haystack]]:
    """Runs every scenario once; yields the secret values by field and everything they left readable."""
    root = tmp_path_factory.mktemp("secrets")
    (root / "remote").mkdir()
    remote: GitRemote = make_remote(root / "remote", Path(__file__).resolve().parents[1] / "dbt")
    connections = root / "connections.yaml"
    connections.write_text(
        (Path(__file__).resolve().parents[1] / "airbyte" / "connections.yaml").read_text().replace("count: 1000", "count: 200")
    )
    passphrase = _random_secret("pp-")
    values = {
        "airbyte_client_secret": _random_secret("cs-"),
        "git_token": _random_secret("ghp_"),
        "snowflake_password": _random_secret("pw@:/#%!"),
        "snowflake_private_key": _pem(passphrase),
        "snowflake_private_key_passphrase": passphrase,
        "slack_webhook_url": _random_secret("sl-"),
        "alert_smtp_password": _random_secret("smtp-"),
        "alert_webhook_url": _random_secret("wh-"),
        "alert_webhook_secret": _random_secret("hdr-"),
    }
    # Every alert channel set, each unreachable from here (port 9 is closed; no DNS for Slack):
    # `elt doctor` and `elt alert test` report on each and must name none of their secrets. A
    # webhook URL's scheme and host are named on purpose (the doctor says which host to fix), so
    # for the two URL settings the secret searched for is the token in the URL's path.
    alerts = {
        "SLACK_WEBHOOK_URL": f"https://hooks.slack.com/services/T000/B000/{values['slack_webhook_url']}",
        "ELT_ALERT_SMTP_HOST": "127.0.0.1",
        "ELT_ALERT_SMTP_PORT": "9",
        "ELT_ALERT_SMTP_USER": "alerts",
        "ELT_ALERT_SMTP_PASSWORD": values["alert_smtp_password"],
        "ELT_ALERT_EMAIL_FROM": "elt@example.invalid",
        "ELT_ALERT_EMAIL_TO": "team@example.invalid",
        "ELT_ALERT_WEBHOOK_URL": f"http://127.0.0.1:9/hooks/{values['alert_webhook_url']}",
        "ELT_ALERT_WEBHOOK_HEADER": "X-Token",
        "ELT_ALERT_WEBHOOK_SECRET": values["alert_webhook_secret"],
    }
    snowflake = {k: v for k, v in fakesnow_server.env().items() if k not in ("SNOWFLAKE_PASSWORD",)}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ELT_", "SNOWFLAKE_"))} | {
        "PREFECT_API_URL": prefect_server.api_url,
        "ELT_CONNECTORS_DIR": str(Path(__file__).resolve().parents[1] / ".venv-connectors"),
        "ELT_AIRBYTE_CONNECTIONS_FILE": str(connections),
        "ELT_GIT_REPO": str(remote.bare),
        "ELT_GIT_TOKEN": values["git_token"],
    }
    haystack = Haystack()
    with FakeAirbyte(client_secret=values["airbyte_client_secret"]) as airbyte:
        airbyte.add_connection("faker", sync_seconds=0.2)
        scenarios = [
            Scenario(
                "embedded into snowflake, password, every alert channel",
                snowflake
                | alerts
                | {
                    "SNOWFLAKE_PASSWORD": values["snowflake_password"],
                    "ELT_AIRBYTE_CLIENT_SECRET": values["airbyte_client_secret"],
                },
                [["run"], ["doctor"], ["alert", "test"]],
            ),
            Scenario(
                "dbt on snowflake, encrypted key pair",
                snowflake
                | {
                    "SNOWFLAKE_PRIVATE_KEY": values["snowflake_private_key"],
                    "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE": values["snowflake_private_key_passphrase"],
                },
                [["run", "--skip-extract"], ["doctor"]],
            ),
            Scenario(
                "server backend",
                {
                    "ELT_AIRBYTE_BACKEND": "server",
                    "ELT_AIRBYTE_URL": airbyte.ui_url,
                    "ELT_AIRBYTE_CLIENT_ID": "fake-client-id",
                    "ELT_AIRBYTE_CLIENT_SECRET": values["airbyte_client_secret"],
                    "ELT_AIRBYTE_POLL_SECONDS": "0.2",
                },
                [["run", "--skip-transform"], ["doctor"]],
            ),
        ]
        for index, scenario in enumerate(scenarios):
            home = root / f"home-{index}"
            temp = root / f"tmp-{index}"
            home.mkdir()
            temp.mkdir()
            env = base | scenario.env | {"ELT_HOME": str(home), "TMPDIR": str(temp)}
            for command in scenario.commands:
                completed = subprocess.run(
                    [str(BIN / "elt"), *command], env=env, cwd=home, capture_output=True, text=True, timeout=600
                )
                haystack.add(f"{scenario.name}: elt {' '.join(command)}", completed.stdout + completed.stderr)
                if command[0] == "run":
                    assert completed.returncode == 0, f"{scenario.name}: {completed.stdout[-2000:]}{completed.stderr[-2000:]}"
            haystack.add_files(home)
            haystack.add_files(temp)
        airbyte.assert_no_violations()

    haystack.add("prefect logs", str(_all(prefect_server, "/logs/filter")))
    haystack.add("prefect artifacts", str(_all(prefect_server, "/artifacts/filter")))
    haystack.add("flow-run parameters", str([run["parameters"] for run in _all(prefect_server, "/flow_runs/filter")]))
    yield values, haystack


def _all(server: PrefectServer, path: str) -> list[dict]:
    rows: list[dict] = []
    while True:
        page = server.post(path, {"limit": 200, "offset": len(rows)})
        page.raise_for_status()
        rows += page.json()
        if len(page.json()) < 200:
            return rows


@pytest.mark.slow
@pytest.mark.parametrize("field_name", secret_fields())
def test_secret_setting_never_leaks(field_name: str, leak_search: tuple[dict[str, str], Haystack]) -> None:
    values, haystack = leak_search
    assert field_name in values, f"{variable_of(field_name)} is a new secret: give it a value in a scenario above"
    assert haystack.texts, "the scenarios collected nothing to search"
    assert haystack.leaks(values[field_name]) == [], f"{variable_of(field_name)} leaked"


def test_the_leak_search_finds_a_partial_secret() -> None:
    """The search itself bites: 8 characters of a secret, cut from its end, are found."""
    secret = _random_secret("x-")
    haystack = Haystack()
    haystack.add("log", f"connecting with ...{secret[-LEAK_WINDOW:]} failed")
    assert haystack.leaks(secret) == ["log"]
    haystack = Haystack()
    haystack.add("log", f"connecting with ...{secret[-LEAK_WINDOW + 1 :]} failed")
    assert haystack.leaks(secret) == []


def test_every_secret_looking_setting_has_a_secret_type() -> None:
    """A setting named like a credential is a SecretStr, so `repr`, `str` and the scenarios above
    hide and cover it; turning one into a plain `str` fails here, not in production."""
    credential_words = ("secret", "token", "password", "passphrase", "private_key")
    named_like_secrets = {name for name in Settings.model_fields if any(word in name for word in credential_words)}
    assert named_like_secrets, "no credential settings found: the name list above is stale"
    assert named_like_secrets <= set(secret_fields()), named_like_secrets - set(secret_fields())


def test_no_secret_setting_shows_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {name: _random_secret(f"{name[:4]}-") for name in secret_fields()}
    for name, value in values.items():
        monkeypatch.setenv(variable_of(name), value)
    settings = Settings()
    shown = repr(settings) + str(settings) + str(settings.model_dump())
    for name, value in values.items():
        assert getattr(settings, name).get_secret_value() == value
        assert value[:LEAK_WINDOW] not in shown and value[-LEAK_WINDOW:] not in shown, variable_of(name)
