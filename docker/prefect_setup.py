"""Idempotent Prefect setup for the appliance, run by setup.sh inside the server's container
(before the worker starts, so the first install creates the work pool):

- the `elt` process work pool;
- a Slack webhook block + the automation "notify-failed-all-etl" (failed or crashed flow
  runs) when SLACK_WEBHOOK_URL is set (in the environment, or on the first line of stdin
  with --slack-webhook-url-from-stdin, so it never appears on a command line);
- the automation "crash-zombie-flow-runs": a proactive trigger that marks a flow run
  Crashed when its heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the worker) has been
  missing for ELT_ZOMBIE_SECONDS (a worker or VM that died mid-run).

Each object is created when missing and updated when it differs; prints one line per object
saying "created", "updated" or "unchanged". Never prints secrets.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture, SendNotification
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from prefect import get_client

POOL = "elt"
SLACK_BLOCK = "elt-alerts"
NOTIFY = "notify-failed-all-etl"
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


def slack_block(url: str) -> tuple[str, object]:
    from prefect.blocks.notifications import SlackWebhook

    try:
        block = SlackWebhook.load(SLACK_BLOCK)
        if block.url.get_secret_value() == url:
            return "unchanged", block
        status = "updated"
    except ValueError:
        status = "created"
    block = SlackWebhook(url=url)
    block.save(SLACK_BLOCK, overwrite=True)
    return status, SlackWebhook.load(SLACK_BLOCK)


def ensure_automation(wanted: Automation) -> str:
    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:
        existing = None
    if existing is None:
        wanted.create()
        return "created"
    keys = {"name", "description", "enabled", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"}
    if comparable(existing.model_dump(include=keys, mode="json")) == comparable(wanted.model_dump(include=keys, mode="json")):
        return "unchanged"
    wanted.id = existing.id
    wanted.update()
    return "updated"


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


def notify_automation(block_id) -> Automation:
    return Automation(
        name=NOTIFY,
        description="Slack message when a flow run fails or crashes.",
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Reactive,
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="Prefect flow run {{ flow_run.name }} is {{ flow_run.state.name }}",
                body=(
                    "Flow run {{ flow.name }}/{{ flow_run.name }} entered {{ flow_run.state.name }}: "
                    "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}"
                ),
            )
        ],
    )


def main() -> None:
    print(f"work pool {POOL}: {asyncio.run(work_pool())}")
    from elt.settings import load_settings

    seconds = load_settings().zombie_seconds
    print(f"automation {ZOMBIE}: {ensure_automation(zombie_automation(seconds))}")
    url = os.environ.get("SLACK_WEBHOOK_URL")
    if not url and "--slack-webhook-url-from-stdin" in sys.argv[1:]:
        url = sys.stdin.readline().strip()
    if url:
        status, block = slack_block(url)
        print(f"slack webhook block {SLACK_BLOCK}: {status}")
        print(f"automation {NOTIFY}: {ensure_automation(notify_automation(block._block_document_id))}")
    else:
        print(f"automation {NOTIFY}: skipped (SLACK_WEBHOOK_URL is not set)")


if __name__ == "__main__":
    main()
