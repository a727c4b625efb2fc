"""The worker container's command: mark the runs a previous worker left behind Crashed, then
become `prefect worker start` (the arguments after the script).

The appliance has one process worker, and its flow runs are processes inside its container: when
the container starts (a restart, `docker compose up` after a kill, the VM rebooting), every run of
the pool still Pending or Running in Prefect has lost its process. Left alone, such a run stays
Running until the "crash-zombie-flow-runs" automation notices the missing heartbeat
(ELT_ZOMBIE_SECONDS), and it holds the deployment's one concurrency slot meanwhile, so the next
scheduled run waits that long. Marking it Crashed here, with the cause, frees the slot at once.

At boot the server may still be starting (restart policies ignore depends_on): the API is awaited
for up to API_WAIT_SECONDS, then the worker starts regardless.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import httpx
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from prefect import get_client

POOL = "elt"
API_WAIT_SECONDS = 300
MESSAGE = (
    "The worker restarted during this run (its container or the machine restarted), so the run's "
    "process is gone; marked Crashed by the worker on its start."
)


async def api_ready(deadline: float) -> bool:
    async with get_client() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.hello()).status_code == 200:
                    return True
            except (httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(2)
    return False


async def crash_orphaned_runs() -> list[str]:
    async with get_client() as client:
        orphans = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL])),
        )
        for run in orphans:
            await client.set_flow_run_state(run.id, Crashed(message=MESSAGE))
        return [str(run.id) for run in orphans]


def main() -> None:
    if asyncio.run(api_ready(time.monotonic() + API_WAIT_SECONDS)):
        for run_id in asyncio.run(crash_orphaned_runs()):
            print(
                f"worker_start: flow run {run_id} was left Pending or Running by the previous worker; marked Crashed", flush=True
            )
    else:
        print(
            f"worker_start: the Prefect API did not answer within {API_WAIT_SECONDS} s; starting the worker without checking for orphaned runs",
            flush=True,
        )
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
