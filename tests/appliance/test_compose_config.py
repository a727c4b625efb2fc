"""What docker/compose.sh gives each service, read from `docker-compose config` (the real
compose binary renders the merged files and env files; no engine needed, so this is fast)
and the Prefect setup's automation comparison under different hash seeds.

The same promises are checked on the running stack in test_stack.py (container environments
through `docker inspect`); these catch a regression in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.appliance.conftest import OVERRIDE_EXAMPLE
from tests.conftest import REPO_ROOT

SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-8c1f",
    "PREFECT_SERVER_API_AUTH_STRING": "admin:api-secret-77aa",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.example/secret-3b2e",
    "ELT_ALERT_SMTP_PASSWORD": "smtp-secret-51d0",
    "ELT_ALERT_WEBHOOK_URL": "https://alerts.example/secret-9e41",
    "ELT_ALERT_WEBHOOK_SECRET": "webhook-secret-0c7b",
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("docker-compose") is None and shutil.which("docker") is None:
        pytest.skip("needs docker-compose (tests/appliance/install_docker.sh installs it)")
    checkout = tmp_path / "elt"
    shutil.copytree(REPO_ROOT / "docker", checkout / "docker", ignore=shutil.ignore_patterns(".*", "*.override.yml"))
    (checkout / ".env").write_text(
        "".join(f"{name}={value}\n" for name, value in SECRETS.items())
        + "SNOWFLAKE_PASSWORD=sf-run-secret\nMY_CONNECTOR_TOKEN=connector-run-secret\nELT_ZOMBIE_SECONDS=90\n"
    )
    return checkout


def compose_config(checkout: Path, **env: str) -> dict:
    completed = subprocess.run(
        [str(checkout / "docker" / "compose.sh"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert completed.returncode == 0, completed.stderr
    return yaml.safe_load(completed.stdout)["services"]


def environment(service: dict) -> dict[str, str]:
    values = service.get("environment") or {}
    if isinstance(values, list):
        values = dict(item.split("=", 1) for item in values)
    return {key: str(value) for key, value in values.items()}


def test_each_service_gets_only_the_secrets_it_needs(checkout: Path) -> None:
    services = compose_config(checkout)

    def holders(secret: str) -> set[str]:
        return {name for name, service in services.items() if any(secret in value for value in environment(service).values())}

    assert holders(SECRETS["POSTGRES_PASSWORD"]) == {"postgres", "prefect-server"}
    assert holders(SECRETS["PREFECT_SERVER_API_AUTH_STRING"]) == {"prefect-server", "prefect-worker", "dbt-docs"}
    for alert_secret in ("SLACK_WEBHOOK_URL", "ELT_ALERT_SMTP_PASSWORD", "ELT_ALERT_WEBHOOK_URL", "ELT_ALERT_WEBHOOK_SECRET"):
        assert holders(SECRETS[alert_secret]) == set(), alert_secret  # setup.sh pipes them to prefect_setup.py
    # What flow runs need still reaches the worker: Snowflake settings, connector secrets.
    worker = environment(services["prefect-worker"])
    assert worker["SNOWFLAKE_PASSWORD"] == "sf-run-secret"
    assert worker["MY_CONNECTOR_TOKEN"] == "connector-run-secret"
    assert "PREFECT_SERVER_API_AUTH_STRING" not in worker
    for client in ("prefect-worker", "dbt-docs"):
        assert "/dev/null:/opt/elt/.env:ro" in [
            volume if isinstance(volume, str) else f"{volume['source']}:{volume['target']}:ro"
            for volume in services[client]["volumes"]
        ]
    assert (checkout / ".run.env").stat().st_mode & 0o077 == 0


def test_the_override_file_and_the_listed_overrides_apply(checkout: Path) -> None:
    (checkout / "docker" / "docker-compose.override.yml").write_text(OVERRIDE_EXAMPLE)
    extra = checkout / "docker" / "extra.yml"
    extra.write_text('version: "2.4"\nservices:\n  dbt-docs:\n    environment:\n      EXTRA_SETTING: "on"\n')
    services = compose_config(checkout, ELT_COMPOSE_OVERRIDE="docker/docker-compose.ci.yml:docker/extra.yml")
    assert environment(services["prefect-worker"])["TZ"] == "Europe/Berlin"
    assert "TZ" not in environment(services["dbt-docs"])
    assert environment(services["dbt-docs"])["EXTRA_SETTING"] == "on"
    assert services["postgres"]["image"] == "elt-base:bookworm"  # from docker-compose.ci.yml


def test_a_missing_listed_override_is_named(checkout: Path) -> None:
    completed = subprocess.run(
        [str(checkout / "docker" / "compose.sh"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ELT_COMPOSE_OVERRIDE": "docker/nope.yml"},
    )
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"compose.sh: ELT_COMPOSE_OVERRIDE names {checkout}/docker/nope.yml, which does not exist"
    )


def test_every_service_rotates_its_container_logs(checkout: Path) -> None:
    """Docker's json-file logs grow without end unless each service caps them."""
    services = compose_config(checkout)
    assert set(services) == {"postgres", "prefect-server", "prefect-worker", "dbt-docs"}
    for name, service in services.items():
        assert service.get("logging") == {"driver": "json-file", "options": {"max-size": "10m", "max-file": "5"}}, name


@pytest.mark.parametrize(("in_env", "seconds"), [(None, "2592000"), ("7", "604800")])
def test_the_server_deletes_runs_that_ended_more_than_the_retention_days_ago(
    checkout: Path, in_env: str | None, seconds: str
) -> None:
    """ELT_RETENTION_DAYS in .env (default 30) turns on Prefect's own flow-run vacuum with that
    period; only the server gets it."""
    if in_env:
        with (checkout / ".env").open("a") as env_file:
            env_file.write(f"ELT_RETENTION_DAYS={in_env}\n")
    services = compose_config(checkout)
    server = environment(services["prefect-server"])
    assert server["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] == "events,flow_runs"
    assert server["PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"] == seconds
    assert server["PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS"] == "3600"
    assert "ELT_RETENTION_DAYS" not in (checkout / ".run.env").read_text()


@pytest.mark.parametrize("value", ["30d", "0", "-1"])
def test_a_retention_that_is_not_whole_days_is_refused_naming_the_variable(checkout: Path, value: str) -> None:
    with (checkout / ".env").open("a") as env_file:
        env_file.write(f"ELT_RETENTION_DAYS={value}\n")
    completed = subprocess.run([str(checkout / "docker" / "compose.sh"), "config"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"compose.sh: ELT_RETENTION_DAYS={value} in {checkout}/.env: give a whole number of days, 1 or more"
    )


DUMP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import prefect_setup
automation = prefect_setup.zombie_automation(90).model_dump(mode="json")
print(json.dumps({"raw": automation, "comparable": prefect_setup.comparable(automation)}))
"""


def test_the_automation_comparison_does_not_depend_on_the_hash_seed() -> None:
    """setup.sh said `updated` about one rerun in eight: the trigger's sets dump in hash order."""
    dumps = []
    for seed in ("0", "1", "2", "3", "4"):
        completed = subprocess.run(
            [sys.executable, "-c", DUMP, str(REPO_ROOT / "docker")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert completed.returncode == 0, completed.stderr
        dumps.append(json.loads(completed.stdout))
    assert len({json.dumps(dump["raw"]) for dump in dumps}) > 1  # the orders do differ between seeds
    assert len({json.dumps(dump["comparable"]) for dump in dumps}) == 1
