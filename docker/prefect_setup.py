"""Idempotent Prefect setup for the appliance, run by setup.sh inside the server's container
(before the worker starts, so the first install creates the work pool):

- the `elt` process work pool;
- one notification block per alert channel set (src/elt/alerts.py: Slack `elt-alerts`, email
  `elt-alerts-email`, webhook `elt-alerts-webhook`) and the alert automations, each sending to
  every channel: notify-failed-all-etl, notify-long-running-all-etl, notify-late-all-etl,
  notify-dbt-warnings. The alert settings (SLACK_WEBHOOK_URL, ELT_ALERT_*) come from the
  environment, or as `.env` lines on stdin with --settings-from-stdin, so no secret is ever on
  a command line;
- the automation "crash-zombie-flow-runs": a proactive trigger that marks a flow run
  Crashed when its heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the worker) has been
  missing for ELT_ZOMBIE_SECONDS (a worker or VM that died mid-run).

Each object is created when missing and updated in place when it differs; prints one line per
object saying "created", "updated", "unchanged" or "deleted". Never prints secrets.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
from prefect.blocks.core import Block
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from prefect import get_client

if TYPE_CHECKING:
    from elt.settings import Settings

POOL = "elt"
ZOMBIE = "crash-zombie-flow-runs"
TERMINAL = ["Completed", "Failed", "Cancelled", "Crashed"]


async def work_pool() -> str:
    async with get_client() as client:
        try:
            await client.read_work_pool(POOL)
            return "unchanged"
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            return "created"


def ensure_block(name: str, wanted: Block) -> tuple[str, object]:
    """Save `wanted` as block `name` unless an equal one is saved; returns (status, block document id)."""
    try:
        existing = type(wanted).load(name)
    except ValueError:
        status = "created"
    else:
        if _revealed(existing) == _revealed(wanted):
            return "unchanged", existing._block_document_id
        status = "updated"
    wanted.save(name, overwrite=True)  # overwrite keeps the block document (and its id)
    return status, type(wanted).load(name)._block_document_id


def _revealed(block: Block) -> dict[str, object]:
    """The block's fields, secrets included; not the ids a loaded block carries (_block_document_id...)."""
    fields = block.model_dump(mode="json", context={"include_secrets": True})
    return {key: value for key, value in fields.items() if not key.startswith("_")}


def ensure_automation(wanted: Automation) -> str:
    existing = _read_automation(wanted.name)
    if existing is None:
        wanted.create()
        return "created"
    keys = {"name", "description", "enabled", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"}
    if comparable(existing.model_dump(include=keys, mode="json")) == comparable(wanted.model_dump(include=keys, mode="json")):
        return "unchanged"
    wanted.id = existing.id
    wanted.update()
    return "updated"


def _read_automation(name: str) -> Automation | None:
    try:
        return Automation.read(name=name)
    except ValueError:
        return None


def remove_automation(name: str) -> str:
    existing = _read_automation(name)
    if existing is None:
        return "absent"
    existing.delete()
    return "deleted"


def comparable(value: object) -> object:
    """`value` with every list of strings sorted: the trigger's `expect`/`after` are sets, whose
    JSON order depends on the hash seed (PYTHONHASHSEED) of the process that dumped them."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [comparable(item) for item in value]
        return sorted(items) if all(isinstance(item, str) for item in items) else items
    return value


def zombie_automation(seconds: int) -> Automation:
    return Automation(
        name=ZOMBIE,
        description=f"Marks a flow run Crashed when its heartbeat has been missing for {seconds} s.",
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in TERMINAL)},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {seconds} s: the worker or the machine stopped during the run.",
            )
        ],
    )


def settings_from_stdin() -> None:
    """`.env` lines on stdin (setup.sh pipes the alert settings) become this process's environment."""
    from dotenv import dotenv_values

    for name, value in dotenv_values(stream=sys.stdin).items():
        if value is not None:
            os.environ[name] = value


def alerts(settings: Settings) -> None:
    from elt import alerts

    block_ids = []
    for channel in alerts.channels(settings):
        status, block_id = ensure_block(channel.block_name, channel.make_block())
        print(f"{channel.kind} block {channel.block_name}: {status}")
        block_ids.append(block_id)
    for name, wanted in alerts.automations(settings, block_ids).items():
        if wanted is not None:
            print(f"automation {name}: {ensure_automation(wanted)}")
            continue
        status = remove_automation(name)
        why = alerts.NO_CHANNEL if not block_ids else "ELT_ALERT_WARNINGS=off"
        print(f"automation {name}: {'deleted' if status == 'deleted' else 'skipped'} ({why})")


def main() -> None:
    if "--settings-from-stdin" in sys.argv[1:]:
        settings_from_stdin()
    from elt.alerts import channels
    from elt.errors import ConfigurationError
    from elt.settings import load_settings

    try:
        settings = load_settings()
        channels(settings)  # an incomplete channel stops here, before anything is changed
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line naming the variable, for setup.sh to show
        sys.exit(2)
    print(f"work pool {POOL}: {asyncio.run(work_pool())}")
    print(f"automation {ZOMBIE}: {ensure_automation(zombie_automation(settings.zombie_seconds))}")
    alerts(settings)


if __name__ == "__main__":
    main()
