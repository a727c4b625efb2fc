"""Prefect's flow-run heartbeats, without the second each flow run waits for them at its end.

Prefect 3.8's engine (`prefect/flow_engine.py`, `_send_heartbeats`) emits a flow run's heartbeats
from a daemon thread that sleeps in 1 s steps, and a sync flow run joins that thread when it ends:
every flow run ends up to 1 s after its function returned (measured here: 1.0 s for a subflow
whose function took 0.01 s; all-etl runs four flow runs, a transform stage one). `install()`
replaces it with the same context manager whose thread waits on the stop event instead, so the
join returns as soon as the flow run ends. The heartbeats are unchanged: the first one when the
flow run starts, then one every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, none after the flow
run is final (the crash-zombie-flow-runs automation relies on them: docker/prefect_setup.py).

Installed only on the Prefect versions it was written against (`PATCHED_VERSIONS`), where the
engine still looks `_send_heartbeats` up by name; any other Prefect keeps its own.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PATCHED_VERSIONS = ("3.8.",)


def install() -> bool:
    """Replace Prefect's `_send_heartbeats` where this module knows its engine; True if it did."""
    import prefect
    from prefect import flow_engine

    if not prefect.__version__.startswith(PATCHED_VERSIONS):
        return False
    flow_engine._send_heartbeats = send_heartbeats
    return True


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Prefect 3.8.8's `_send_heartbeats`, its 1 s sleeps replaced by a wait on the stop event."""
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    heartbeat_seconds = engine.heartbeat_seconds
    if heartbeat_seconds is None:
        yield
        return
    heartbeat_seconds = max(heartbeat_seconds, MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop_event = threading.Event()

    def heartbeat_loop() -> None:
        while not stop_event.is_set():
            if engine.flow_run and engine.flow_run.state and engine.flow_run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop_event.wait(heartbeat_seconds)

    # As Prefect does: the thread sees the caller's settings (PREFECT_API_URL above all).
    heartbeat_context = contextvars.copy_context()
    thread = threading.Thread(target=heartbeat_context.run, args=(heartbeat_loop,), name="elt-flow-run-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop_event.set()
        if join_on_exit:
            thread.join(timeout=2)
