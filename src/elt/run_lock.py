"""One all-etl run per warehouse at a time, and no run left Running after its process died.

The lock is a file beside the warehouse (the DuckDB file; for Snowflake, one per
account/database/schema under the data folder) held with `flock`, which the kernel releases
when the holder exits, `kill -9` included. It holds JSON naming the holder, so a second run
can say which run is in its way. A run that ends normally empties the file; a file still
naming a run when the lock is free therefore means that run's process died, and the next run
marks that flow run Crashed in Prefect (a local run has no zombie automation to do it).

The deployment's concurrency limit keeps the appliance's own runs apart; this covers `elt run`
from a shell and overlapping deployments.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from elt import processes
from elt.errors import TerminalError, first_line
from elt.settings import Settings
from elt.warehouse import warehouse_for

logger = logging.getLogger(__name__)

# A dead run's watchdog may still be stopping its children (dbt holding DuckDB's lock).
WATCHDOG_WAIT_SECONDS = 15.0
_UNFINISHED_STATES = frozenset({"SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED"})


class WarehouseInUse(TerminalError):
    pass


@dataclass(frozen=True)
class Holder:
    flow_run_id: str | None  # None: a maintenance task (`task`), not a run
    pid: int
    started: str
    watchdog_pid: int | None = None
    task: str | None = None

    def __str__(self) -> str:
        if self.task:
            return f"the {self.task} (PID {self.pid})"
        return f"another all-etl run (flow run {self.flow_run_id}, PID {self.pid})"


def warehouse_name(settings: Settings) -> str:
    return warehouse_for(settings).location


def lock_path(settings: Settings) -> Path:
    return warehouse_for(settings).lock_path


@contextmanager
def hold(settings: Settings, flow_run_id: str) -> Iterator[Holder]:
    """Hold the warehouse's run lock for this flow run; raise WarehouseInUse naming the holder."""
    with _lock_file(settings) as descriptor:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _who_holds(descriptor, settings, wait_seconds=2.0)
            raise WarehouseInUse(f"{who} is using {warehouse_name(settings)}; wait for it or cancel it") from None
        stale = _read_holder(descriptor)
        if stale is not None and stale.flow_run_id is not None:
            _clean_up_after(stale, flow_run_id)
        guard = processes.active_guard()
        if guard is not None:
            guard.flow_run_id = flow_run_id
        holder = Holder(
            flow_run_id, os.getpid(), datetime.now(UTC).isoformat(timespec="seconds"), guard.watchdog_pid if guard else None
        )
        _write(descriptor, json.dumps(asdict(holder)))
        try:
            yield holder
        finally:
            _write(descriptor, "")


@contextmanager
def hold_for_task(settings: Settings, task: str, wait_seconds: float) -> Iterator[None]:
    """Hold the warehouse's run lock for a maintenance task (a backup, a restore): wait up to
    `wait_seconds` for a running all-etl to finish; a run that starts meanwhile is refused,
    naming the task."""
    with _lock_file(settings) as descriptor:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    who = _who_holds(descriptor, settings)
                    raise WarehouseInUse(
                        f"{who} still holds {warehouse_name(settings)} after {wait_seconds:.0f} s; "
                        f"the {task} did not start: run it again when that ends"
                    ) from None
                time.sleep(0.5)
        stale = _read_holder(descriptor)
        if stale is not None and stale.flow_run_id is not None:
            logger.warning(
                "The last all-etl run (flow run %s) ended without finishing; the next run marks it Crashed", stale.flow_run_id
            )
        holder = Holder(None, os.getpid(), datetime.now(UTC).isoformat(timespec="seconds"), task=task)
        _write(descriptor, json.dumps(asdict(holder)))
        try:
            yield
        finally:
            # A dead run's record stays for the next run to mark Crashed; the task's own goes.
            _write(descriptor, json.dumps(asdict(stale)) if stale is not None and stale.flow_run_id else "")


@contextmanager
def _lock_file(settings: Settings) -> Iterator[int]:
    """The warehouse's lock file, open; closing it releases a flock taken on it."""
    path = lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _who_holds(descriptor: int, settings: Settings, wait_seconds: float = 0.0) -> str:
    holder = _read_holder(descriptor, wait_seconds=wait_seconds)
    return str(holder) if holder else f"another all-etl run (see {lock_path(settings)})"


def _write(descriptor: int, text: str) -> None:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, text.encode(), 0)
    os.fsync(descriptor)


def _read_holder(descriptor: int, wait_seconds: float = 0.0) -> Holder | None:
    """The holder recorded in the file; the holder writes it just after taking the lock, so wait for it."""
    deadline = time.monotonic() + wait_seconds
    while True:
        text = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
        if text:
            try:
                return Holder(**json.loads(text))
            except (ValueError, TypeError):
                logger.warning("Ignoring an unreadable run lock: %r", text[:200])
                return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _clean_up_after(dead: Holder, flow_run_id: str) -> None:
    """The previous holder died holding the lock: let its watchdog finish, then mark its run Crashed."""
    assert dead.flow_run_id is not None  # a task's record is never left for cleanup
    logger.warning("The previous all-etl run (flow run %s, PID %s) ended without finishing", dead.flow_run_id, dead.pid)
    if dead.watchdog_pid:
        deadline = time.monotonic() + WATCHDOG_WAIT_SECONDS
        while _is_watchdog(dead.watchdog_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    message = (
        f"The process running this flow run (PID {dead.pid}) died without finishing it; "
        f"marked Crashed by the next all-etl run, flow run {flow_run_id}"
    )
    try:
        mark_crashed(dead.flow_run_id, message)
    except Exception as exc:  # noqa: BLE001 - the dead run's record is history; this run goes on
        logger.warning("Could not mark flow run %s Crashed: %s", dead.flow_run_id, first_line(exc))


def mark_crashed(flow_run_id: str, message: str) -> list[str]:
    """Set the flow run, and its child flow runs, Crashed if Prefect still has them unfinished."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    marked: list[str] = []
    with get_client(sync_client=True) as client:
        try:
            runs = [client.read_flow_run(UUID(flow_run_id))]
        except ObjectNotFound:
            logger.warning("Flow run %s is not on this Prefect server; nothing to mark", flow_run_id)
            return marked
        runs += client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(flow_run_id)]))
        )
        for run in runs:
            if run.state is not None and run.state.type.value in _UNFINISHED_STATES:
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked.append(str(run.id))
            else:
                logger.warning("Flow run %s is already %s; leaving it so", run.id, run.state.name if run.state else "stateless")
    if marked:
        logger.warning("Marked flow run(s) %s Crashed", ", ".join(marked))
    return marked


def _is_watchdog(pid: int) -> bool:
    try:
        return b"elt.processes" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
