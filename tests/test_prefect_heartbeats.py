"""Flow-run heartbeats (src/elt/prefect_heartbeats.py): still sent, and no flow run waits for them.

The fast tests drive the context manager with a stand-in for Prefect's flow engine (the four
members it reads); the slow one runs a real flow against a real Prefect server and reads the
heartbeat back from the server's events.
"""

from __future__ import annotations

import threading
import time
import types
import uuid
from typing import Any

import pytest

from elt import prefect_heartbeats


class FakeState:
    def __init__(self) -> None:
        self.final = False

    def is_final(self) -> bool:
        return self.final


class FakeEngine:
    """The members of Prefect's FlowRunEngine that `_send_heartbeats` uses."""

    def __init__(self, heartbeat_seconds: int | None = 30) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.flow_run = types.SimpleNamespace(state=FakeState())
        self.logger = types.SimpleNamespace(debug=lambda *args, **kwargs: None)
        self.emitted: list[tuple[Any, Any]] = []
        self.first_heartbeat = threading.Event()

    def _build_heartbeat_event_template(self) -> tuple[dict, list]:
        return {"prefect.resource.id": "prefect.flow-run.x"}, ["related"]

    def _emit_flow_run_heartbeat(self, resource: dict, related: list) -> None:
        self.emitted.append((resource, related))
        self.first_heartbeat.set()


def _heartbeat_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "elt-flow-run-heartbeat"]


def test_the_locked_prefect_runs_its_flows_with_these_heartbeats() -> None:
    import elt.flows  # noqa: F401 - installs them
    from prefect import flow_engine

    assert flow_engine._send_heartbeats is prefect_heartbeats.send_heartbeats
    assert prefect_heartbeats.install() is True  # a second install keeps them


def test_a_heartbeat_goes_out_when_the_flow_run_starts_and_the_thread_has_ended_when_it_ends() -> None:
    engine = FakeEngine()
    with prefect_heartbeats.send_heartbeats(engine):
        assert engine.first_heartbeat.wait(30), "no heartbeat within 30 s of the flow run's start"
        assert len(_heartbeat_threads()) == 1
    # The join returned: the thread no longer waits out its interval (Prefect's sleeps 1 s steps).
    assert _heartbeat_threads() == []
    assert engine.emitted == [({"prefect.resource.id": "prefect.flow-run.x"}, ["related"])]


def test_heartbeats_repeat_at_the_interval_until_the_flow_run_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow_engine

    monkeypatch.setattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL", 0)  # Prefect's floor is 30 s
    engine = FakeEngine(heartbeat_seconds=0.01)  # type: ignore[arg-type]
    three = threading.Event()
    emit = engine._emit_flow_run_heartbeat

    def counting(resource: dict, related: list) -> None:
        emit(resource, related)
        if len(engine.emitted) == 3:
            three.set()
            engine.flow_run.state.final = True  # the loop stops on its own, before the flow run ends

    engine._emit_flow_run_heartbeat = counting
    with prefect_heartbeats.send_heartbeats(engine):
        assert three.wait(30), f"{len(engine.emitted)} heartbeats in 30 s at a 0.01 s interval"
        for thread in _heartbeat_threads():
            thread.join(30)
        assert _heartbeat_threads() == [], "a final flow run still had its heartbeat thread"
    assert len(engine.emitted) == 3


def test_no_heartbeat_for_a_flow_run_already_final_nor_with_heartbeats_off() -> None:
    final = FakeEngine()
    final.flow_run.state.final = True
    with prefect_heartbeats.send_heartbeats(final):
        pass
    off = FakeEngine(heartbeat_seconds=None)
    with prefect_heartbeats.send_heartbeats(off):
        assert _heartbeat_threads() == []
    assert final.emitted == [] and off.emitted == []


def test_a_failing_heartbeat_is_logged_and_the_flow_run_goes_on() -> None:
    engine = FakeEngine()
    logged = threading.Event()
    engine.logger = types.SimpleNamespace(debug=lambda message, **kwargs: logged.set() if "heartbeat" in message else None)

    def broken(resource: dict, related: list) -> None:
        raise ConnectionError("events websocket closed")

    engine._emit_flow_run_heartbeat = broken
    with prefect_heartbeats.send_heartbeats(engine):
        assert logged.wait(30), "the failed heartbeat was not logged"
    assert _heartbeat_threads() == []


def test_another_prefect_keeps_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect
    from prefect import flow_engine

    own = object()
    monkeypatch.setattr(flow_engine, "_send_heartbeats", own)
    monkeypatch.setattr(prefect, "__version__", "3.9.0")
    assert prefect_heartbeats.install() is False
    assert flow_engine._send_heartbeats is own


class _SleepForever:
    """`time` for prefect.flow_engine whose sleep blocks until released: Prefect's own heartbeat
    loop (1 s sleeps) would then hold the flow run's end for its join's 2 s timeout and stay alive."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.slept = threading.Event()

    def sleep(self, seconds: float) -> None:
        self.slept.set()
        self.released.wait(60)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.slow
def test_a_real_flow_run_sends_its_heartbeat_to_the_server_and_ends_without_waiting_for_it(
    prefect_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real flow against the real server, with PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30."""
    from prefect.events.worker import EventsWorker
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    import elt.flows  # noqa: F401 - installs the heartbeats
    from prefect import flow, flow_engine

    fake_time = _SleepForever()
    monkeypatch.setattr(flow_engine, "time", fake_time)
    emitted = threading.Event()
    original_emit = flow_engine.FlowRunEngine._emit_flow_run_heartbeat

    def emit(self, *args: Any, **kwargs: Any) -> None:
        original_emit(self, *args, **kwargs)
        emitted.set()

    monkeypatch.setattr(flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", emit)
    marker = uuid.uuid4().hex

    @flow(name=f"heartbeat-{marker}")
    def beating() -> str:
        assert emitted.wait(30), "no heartbeat within 30 s of the flow run's start"
        return str(flow_run.id)

    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
            run_id = beating()
        assert _heartbeat_threads() == [], "the heartbeat thread outlived its flow run"
        assert not fake_time.slept.is_set(), "the heartbeat thread slept: the flow run's end waited for it"
    finally:
        fake_time.released.set()
    EventsWorker.drain_all(timeout=30)

    deadline = time.monotonic() + 30
    while True:
        response = prefect_server.post(
            "/events/filter",
            {
                "filter": {
                    "event": {"name": ["prefect.flow-run.heartbeat"]},
                    "any_resource": {"id": [f"prefect.flow-run.{run_id}"]},
                }
            },
        )
        response.raise_for_status()
        heartbeats = response.json()["events"]
        if heartbeats:
            break
        assert time.monotonic() < deadline, "the server holds no heartbeat of the flow run 30 s after it ended"
        time.sleep(0.5)
    assert len(heartbeats) == 1, heartbeats
    assert heartbeats[0]["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
