"""The server backend against a fake Airbyte that enforces the pinned public API spec.

Airbyte's server can't run here (abctl needs a Kubernetes-in-Docker install and images from a
registry), so these tests use tests/fakes/airbyte_server.py: a real HTTP server that validates
every request it receives and every response it sends against public-api-v2.0.0.yaml (errors
against api-problems-v2.0.0.yaml, both vendored in tests/fakes/airbyte_spec/). The
`fake_airbyte` fixture fails a test on any violation. Jobs, tokens, polls, backoff and timeouts
run on one shared `FakeClock`, so no test waits real seconds or races real time.
What only a real server would show: real job durations, real failure reasons in its job logs.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from airbyte_api import errors

from elt.errors import ConfigurationError
from elt.extract.server import (
    AirbyteAuthFailed,
    AirbyteBadResponse,
    AirbyteClient,
    AirbyteConnectionNotRunnable,
    AirbyteJobFailed,
    AirbyteJobTimedOut,
    AirbyteNotTheApi,
    AirbyteRequestRejected,
    AirbyteUnavailable,
    ServerBackend,
)
from elt.settings import load_settings
from tests.fakes.airbyte_server import FakeAirbyte
from tests.fakes.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_airbyte(clock: FakeClock) -> Iterator[FakeAirbyte]:
    """The fake on the test's clock; any contract violation fails the test."""
    with FakeAirbyte(clock=clock) as fake:
        yield fake
        fake.assert_no_violations()


def _client(fake: FakeAirbyte, clock: FakeClock, **options) -> AirbyteClient:
    defaults = dict(
        client_id="fake-client-id",
        client_secret="fake-client-secret",
        backoff_seconds=1.0,
        sleep=clock.sleep,
        clock=clock.monotonic,
        wall_clock=clock.time,
    )
    return AirbyteClient(fake.base_url, **(defaults | options))


def _backend(fake: FakeAirbyte, clock: FakeClock, client: AirbyteClient | None = None, **settings) -> ServerBackend:
    values = dict(airbyte_backend="server", airbyte_url=fake.ui_url, airbyte_poll_seconds=0.1) | settings
    return ServerBackend(load_settings(**values), client or _client(fake, clock), clock=clock.monotonic, wait=clock.wait)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` (real time: other threads must act); fail the test if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- listing


# With "paused" the fake lists one more: 26 -> 10+10+6; 20 -> 10+10, then an empty page if the
# server gives `next` on every page (a full page can't say it is the last); 9 -> one short page.
@pytest.mark.parametrize(
    ("connections", "next_on_every_page", "pages"),
    [(25, True, 3), (25, False, 3), (19, True, 3), (19, False, 2), (8, True, 1), (8, False, 1)],
)
def test_lists_every_connection_and_stops_at_a_short_page(
    clock: FakeClock, connections: int, next_on_every_page: bool, pages: int
) -> None:
    """A page shorter than the limit is the last: no extra request for an empty page."""
    with FakeAirbyte(clock=clock, next_on_every_page=next_on_every_page) as fake:
        for index in range(connections):
            fake.add_connection(f"conn-{index:02d}")
        fake.add_connection("paused", status="inactive")  # listed too: its sync fails (see below)
        fake.add_connection("gone", status="deprecated")  # deleted: Airbyte does not list it
        backend = _backend(fake, clock, _client(fake, clock, page_size=10))
        assert sorted(backend.connection_names()) == [f"conn-{index:02d}" for index in range(connections)] + ["paused"]
        assert fake.count("GET", "/connections") == pages
        fake.assert_no_violations()


def test_tag_selects_connections(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe", tags=["nightly"])
    fake_airbyte.add_connection("hubspot", tags=["hourly"])
    assert _backend(fake_airbyte, clock, airbyte_connection_tag="nightly").connection_names() == ["stripe"]


# --------------------------------------------------------------------------- connection status


@pytest.mark.parametrize(
    ("status", "status_reason", "because"),
    [
        ("inactive", None, "Airbyte marks it inactive"),
        ("locked", "Billing: payment overdue", "Airbyte marks it locked (Billing: payment overdue)"),
        (
            "active",
            "Breaking schema change detected: field id was removed",
            "Airbyte reports a pending breaking schema change (Breaking schema change detected: field id was removed)",
        ),
        ("paused_by_admin", None, "Airbyte reports status 'paused_by_admin', which the appliance does not know"),
    ],
)
def test_connection_that_cannot_run_is_not_synced_and_fails_with_the_reason(
    clock: FakeClock, status: str, status_reason: str | None, because: str
) -> None:
    """`locked`, an unknown status and a status reason are not in the v2.0.0 spec: the fake sends
    them as a newer server might (`extra_connection_statuses`, an additional `statusReason`)."""
    with FakeAirbyte(clock=clock, extra_connection_statuses=["locked", "paused_by_admin"]) as fake:
        blocked_id = fake.add_connection("crm", status=status, status_reason=status_reason)
        fake.add_connection("shop")
        backend = _backend(fake, clock)
        assert sorted(backend.connection_names()) == ["crm", "shop"]  # the page parsed despite the status
        with pytest.raises(AirbyteConnectionNotRunnable) as error:
            backend.sync("crm", full_refresh=False)
        assert str(error.value) == (
            f"connection 'crm' was not synced: {because}; enable or fix it in the Airbyte UI "
            f"({fake.ui_url}/workspaces/{fake.workspace_id}/connections/{blocked_id}), "
            "or leave it out of the run (elt run -c, or ELT_AIRBYTE_CONNECTION_TAG)"
        )
        assert backend.not_runnable() == {"crm": because.removeprefix("Airbyte ")}
        assert fake.jobs_for(blocked_id) == []
        assert backend.sync("shop", full_refresh=False).rows == 1000
        fake.assert_no_violations()


def test_a_status_reason_that_is_not_a_breaking_change_does_not_block(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("shop", status_reason="Non-breaking schema change propagated")
    backend = _backend(fake_airbyte, clock)
    assert backend.not_runnable() == {}
    assert backend.sync("shop", full_refresh=False).rows == 1000


# --------------------------------------------------------------------------- syncs


def test_sync_reports_rows_bytes_and_a_link_to_the_job(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.3, rows=1234, bytes_=5678)
    with caplog.at_level(logging.INFO, logger="elt.extract.server"):
        result = _backend(fake_airbyte, clock).sync("stripe", full_refresh=False)
    assert caplog.messages == [f"stripe: sync job {result.job_id} started"]
    assert (result.connection, result.rows, result.bytes_synced) == ("stripe", 1234, 5678)
    assert result.job_url == (
        f"{fake_airbyte.ui_url}/workspaces/{fake_airbyte.workspace_id}/connections/{connection_id}/job-history#{result.job_id}::0"
    )
    assert result.seconds == pytest.approx(0.3, abs=0.1 + 1e-9)


def test_token_expiring_mid_poll_is_refreshed_once(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("slow", sync_seconds=1.0)
    clock.on_sleep(lambda polls: polls == 3 and fake_airbyte.expire_all_tokens())
    result = _backend(fake_airbyte, clock).sync("slow", full_refresh=False)
    assert result.rows == 1000
    assert fake_airbyte.count("POST", "/applications/token") == 2
    assert [(method, status) for method, path, status in fake_airbyte.requests if status == 401] == [("GET", 401)]


@pytest.mark.parametrize(("lifetime", "exchanges"), [(180, 3), (900, 1)])
def test_token_is_renewed_before_it_expires(clock: FakeClock, lifetime: int, exchanges: int) -> None:
    """The client renews a token a minute before the expires_in Airbyte gave it: a 5-minute sync
    sees no 401, and a token that lives 15 minutes is not renewed at all."""
    with FakeAirbyte(clock=clock, token_ttl_seconds=lifetime) as fake:
        fake.add_connection("long", sync_seconds=300)
        result = _backend(fake, clock, airbyte_poll_seconds=5).sync("long", full_refresh=False)
        assert result.rows == 1000
        assert fake.count("POST", "/applications/token") == exchanges  # 180 s: at 0 s, ~125 s, ~250 s
        assert not [status for _, _, status in fake.requests if status == 401]
        fake.assert_no_violations()


def test_conflict_attaches_to_the_running_job(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.5)
    running = fake_airbyte.start_running_job(connection_id)
    with caplog.at_level(logging.INFO, logger="elt.extract.server"):
        result = _backend(fake_airbyte, clock).sync("stripe", full_refresh=False)
    assert caplog.messages == [
        f"Connection {connection_id} already has job {running} running; attaching to it",
        f"stripe: sync job {running} attached",
    ]
    assert result.job_id == str(running)
    assert len(fake_airbyte.jobs_for(connection_id)) == 1
    assert [status for method, path, status in fake_airbyte.requests if (method, path) == ("POST", "/jobs")] == [409]


def test_incomplete_job_is_polled_until_its_next_attempt_succeeds(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Airbyte reports `incomplete` between attempts; the job is not finished until it says so."""
    connection_id = fake_airbyte.add_connection("flaky", sync_seconds=1.0, failed_attempts=1, retry_seconds=0.5)
    caplog.set_level(logging.INFO, logger="elt.extract.server")
    result = _backend(fake_airbyte, clock).sync("flaky", full_refresh=False)
    assert result.rows == 1000
    assert fake_airbyte.jobs_for(connection_id)[0]["status"] == "succeeded"
    assert caplog.messages == [  # one line per incomplete stretch, however often it is polled
        f"flaky: sync job {result.job_id} started",
        f"flaky: sync job {result.job_id} incomplete (an attempt failed; Airbyte retries it)",
    ]
    assert result.seconds >= 2.5  # first attempt 1 s, 0.5 s incomplete, second attempt 1 s


def test_incomplete_job_whose_last_attempt_fails_fails_the_sync(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("flaky", sync_seconds=0.5, failed_attempts=2, outcome="failed")
    with pytest.raises(AirbyteJobFailed, match=r"^connection 'flaky': sync job 1 ended failed \(http://"):
        _backend(fake_airbyte, clock).sync("flaky", full_refresh=False)


def test_conflict_with_a_job_between_attempts_attaches_to_it(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    connection_id = fake_airbyte.add_connection("flaky", sync_seconds=1.0, failed_attempts=1, retry_seconds=10)
    running = fake_airbyte.start_running_job(connection_id)
    clock.advance(1.5)
    assert fake_airbyte.jobs_for(connection_id)[0]["status"] == "incomplete"
    result = _backend(fake_airbyte, clock, airbyte_poll_seconds=1).sync("flaky", full_refresh=False)
    assert result.job_id == str(running)
    assert len(fake_airbyte.jobs_for(connection_id)) == 1


def test_full_refresh_clears_before_syncing(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.2)
    _backend(fake_airbyte, clock).sync("stripe", full_refresh=True)
    assert [job["jobType"] for job in fake_airbyte.jobs_for(connection_id)] == ["clear", "sync"]


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_failed_and_cancelled_jobs_fail_the_sync(fake_airbyte: FakeAirbyte, clock: FakeClock, outcome: str) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.2, outcome=outcome)
    link = f"{fake_airbyte.ui_url}/workspaces/{fake_airbyte.workspace_id}/connections/{connection_id}/job-history#1::0"
    with pytest.raises(AirbyteJobFailed) as error:
        _backend(fake_airbyte, clock).sync("stripe", full_refresh=False)
    assert str(error.value) == f"connection 'stripe': sync job 1 ended {outcome} ({link})"


def test_job_that_never_ends_is_cancelled_at_the_timeout(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    connection_id = fake_airbyte.add_connection("stuck", outcome="never")
    started = clock.monotonic()
    with pytest.raises(AirbyteJobTimedOut) as error:
        _backend(fake_airbyte, clock, airbyte_sync_timeout_seconds=1).sync("stuck", full_refresh=False)
    link = f"{fake_airbyte.ui_url}/workspaces/{fake_airbyte.workspace_id}/connections/{connection_id}/job-history#1::0"
    assert str(error.value) == (
        f"connection 'stuck': sync job 1 ran over ELT_AIRBYTE_SYNC_TIMEOUT_SECONDS=1 and was cancelled ({link})"
    )
    assert 1.0 < clock.monotonic() - started <= 1.2  # cancelled at the first poll past the timeout
    assert fake_airbyte.count("DELETE", "/jobs/") == 1
    assert fake_airbyte.jobs_for(connection_id)[0]["status"] == "cancelled"


def test_cancel_started_jobs_cancels_only_what_this_run_started() -> None:
    """Two real sync threads on real time (the cancel comes from another thread, as in a flow run)."""
    with FakeAirbyte() as fake:
        ours = fake.add_connection("ours", outcome="never")
        theirs = fake.add_connection("theirs", outcome="never")
        their_job = fake.start_running_job(theirs)
        settings = load_settings(airbyte_backend="server", airbyte_url=fake.ui_url, airbyte_poll_seconds=0.05)
        backend = ServerBackend(settings, AirbyteClient(fake.base_url, "fake-client-id", "fake-client-secret"))
        errors: dict[str, str] = {}

        def sync(name: str) -> None:
            try:
                backend.sync(name, full_refresh=False)
            except AirbyteJobFailed as exc:
                errors[name] = str(exc)

        threads = [threading.Thread(target=sync, args=(name,)) for name in ("ours", "theirs")]
        for thread in threads:
            thread.start()

        def both_polled() -> bool:
            our_jobs = fake.jobs_for(ours)
            return bool(our_jobs) and all(
                fake.count("GET", f"/jobs/{job_id}") > 0 for job_id in (our_jobs[0]["jobId"], their_job)
            )

        _wait_until(both_polled, "both syncs to poll their jobs")
        backend.cancel_started_jobs()
        for thread in threads:
            thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in threads), "a sync kept running after cancel_started_jobs"
        our_job = fake.jobs_for(ours)[0]["jobId"]
        assert fake.jobs_for(ours)[0]["status"] == "cancelled"
        assert fake.jobs_for(theirs)[0]["status"] == "running"
        assert errors == {
            "ours": f"connection 'ours': stopped while job {our_job} ran",
            "theirs": f"connection 'theirs': stopped while job {their_job} ran",
        }
        fake.assert_no_violations()


def test_unknown_job_status_counts_as_still_running(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Newer servers report 'queued'; airbyte-api 0.53 does not know it. The sync keeps waiting."""
    with FakeAirbyte(clock=clock, report_unknown_status="queued", pending_seconds=0.5) as fake:
        fake.add_connection("stripe", sync_seconds=0.8)
        with caplog.at_level(logging.INFO, logger="elt.extract.server"):
            assert _backend(fake, clock).sync("stripe", full_refresh=False).rows == 1000
        assert "Job 1 reports status 'queued'; treating it as running" in caplog.messages
        assert fake.count("GET", "/jobs/") >= 8  # polled through the 'queued' half second and on
        fake.assert_no_violations()


def test_no_auth_server(clock: FakeClock) -> None:
    """Airbyte installed with `abctl local install --disable-auth`: no token exchange at all."""
    with FakeAirbyte(clock=clock, auth=False) as fake:
        fake.add_connection("stripe", sync_seconds=0.1)
        backend = _backend(fake, clock, _client(fake, clock, client_id=None, client_secret=None))
        assert backend.sync("stripe", full_refresh=False).rows == 1000
        assert fake.count("POST", "/applications/token") == 0
        fake.assert_no_violations()


# --------------------------------------------------------------------------- retries


def test_burst_of_server_errors_is_retried_with_backoff(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe", sync_seconds=0.2)
    backend = _backend(fake_airbyte, clock)
    backend.connection_names()
    fake_airbyte.fail_next(3, 503, method="POST", path_prefix="/jobs")
    assert backend.sync("stripe", full_refresh=False).rows == 1000
    assert clock.sleeps[:3] == [1.0, 2.0, 4.0]
    assert [status for method, path, status in fake_airbyte.requests if (method, path) == ("POST", "/jobs")] == [
        503,
        503,
        503,
        200,
    ]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds_is_honoured(fake_airbyte: FakeAirbyte, clock: FakeClock, status: int) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock)
    client.list_connections()
    fake_airbyte.fail_next(2, status, path_prefix="/connections", retry_after=7)
    assert [connection.name for connection in client.list_connections()] == ["stripe"]
    assert clock.sleeps == [7.0, 7.0]


def test_retry_after_as_an_http_date_is_honoured(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock)
    client.list_connections()
    come_back = datetime.fromtimestamp(clock.time() + 42, tz=UTC)
    fake_airbyte.fail_next(1, 429, path_prefix="/connections", retry_after=come_back)
    assert [connection.name for connection in client.list_connections()] == ["stripe"]
    assert clock.sleeps == [pytest.approx(42, abs=1)]


def test_retry_after_is_bounded_by_the_maximum(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock, max_retry_after_seconds=120)
    client.list_connections()
    fake_airbyte.fail_next(1, 503, path_prefix="/connections", retry_after=3600)
    assert [connection.name for connection in client.list_connections()] == ["stripe"]
    assert clock.sleeps == [120.0]


def test_server_errors_beyond_the_retries_are_transient_failures(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe")
    backend = _backend(fake_airbyte, clock, _client(fake_airbyte, clock, attempts=3))
    backend.connection_names()
    fake_airbyte.fail_next(3, 502, method="POST", path_prefix="/jobs")
    with pytest.raises(AirbyteUnavailable) as error:
        backend.sync("stripe", full_refresh=False)
    assert str(error.value) == (
        f"POST /jobs: Airbyte at {fake_airbyte.base_url} answered 502 3 times: unexpected-problem: Injected failure (502)."
    )
    assert error.value.transient


def test_client_errors_fail_at_once_with_the_problem_detail(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    client = _client(fake_airbyte, clock)
    with pytest.raises(AirbyteRequestRejected) as error:
        client.start_job("9f0cbb52-0000-4000-8000-000000000000", "sync")
    assert str(error.value) == (
        "POST /jobs: Airbyte answered 404: resource-not-found: The requested connection could not be found."
    )
    assert not error.value.transient
    assert fake_airbyte.count("POST", "/jobs") == 1


def test_wrong_credentials_name_the_variables(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock, client_secret="wrong-secret-value")
    with pytest.raises(AirbyteAuthFailed) as error:
        client.list_connections()
    assert str(error.value) == (
        "POST /applications/token: Airbyte refused the client credentials (400 bad-request: Invalid client id or token); "
        "check ELT_AIRBYTE_CLIENT_ID and ELT_AIRBYTE_CLIENT_SECRET (`abctl local credentials`)"
    )


# --------------------------------------------------------------------------- wrong URL and unreadable answers


@pytest.mark.parametrize(
    ("credentials", "call", "endpoint"),
    [
        (True, "list_connections", "POST /applications/token"),
        (False, "list_connections", "GET /connections"),
        (False, "health", "GET /health"),
    ],
)
def test_wrong_url_answering_html_names_the_setting(
    fake_airbyte: FakeAirbyte, clock: FakeClock, credentials: bool, call: str, endpoint: str
) -> None:
    """Self-hosted Airbyte answers 200 with its web UI for any wrong path: that is not the API."""
    wrong_url = f"{fake_airbyte.ui_url}/airbyte"
    settings = load_settings(
        airbyte_backend="server",
        airbyte_url=wrong_url,
        airbyte_client_id="fake-client-id" if credentials else None,
        airbyte_client_secret="fake-client-secret" if credentials else None,
    )
    client = AirbyteClient.from_settings(settings)
    with pytest.raises(AirbyteNotTheApi) as error:
        getattr(client, call)()
    assert str(error.value) == (
        f"ELT_AIRBYTE_URL={wrong_url} is not the Airbyte API ({endpoint} answered HTML); "
        "set it to the Airbyte web address, e.g. http://host.docker.internal:8000"
    )
    assert fake_airbyte.count(path_prefix="/airbyte/api/public/v1/") == 1  # not retried


def test_wrong_url_message_never_shows_credentials_written_into_it(fake_airbyte: FakeAirbyte) -> None:
    wrong_url = fake_airbyte.ui_url.replace("http://", "http://admin:hunter2-secret@") + "/airbyte"
    client = AirbyteClient.from_settings(load_settings(airbyte_backend="server", airbyte_url=wrong_url))
    with pytest.raises(AirbyteNotTheApi) as error:
        client.health()
    assert str(error.value).startswith(f"ELT_AIRBYTE_URL=http://***@127.0.0.1:{fake_airbyte.port}/airbyte is not the Airbyte API")
    assert "hunter2" not in str(error.value) and "admin" not in str(error.value)


def test_unreadable_job_is_named_by_its_endpoint(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    connection_id = fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock)
    job, _ = client.start_job(connection_id, "sync")
    fake_airbyte.corrupt_next_response(lambda body: body.update(jobId="abc"), path_prefix="/jobs/")
    with pytest.raises(AirbyteBadResponse) as error:
        client.get_job(job.id)
    assert str(error.value) == (
        f"GET /jobs/{job.id}: Airbyte at {fake_airbyte.base_url} sent a response the client cannot read "
        "(ValueError: invalid literal for int() with base 10: 'abc')"
    )
    assert fake_airbyte.clear_violations() == [
        f"response 200 to GET /jobs/{job.id}: response body at $.jobId: 'abc' is not of type 'integer'"
    ]


def test_unreadable_token_answer_is_named_by_its_endpoint(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.corrupt_next_response(lambda body: body.pop("access_token"), path_prefix="/applications/token")
    with pytest.raises(AirbyteBadResponse) as error:
        _client(fake_airbyte, clock).list_connections()
    assert str(error.value) == (
        f"POST /applications/token: Airbyte at {fake_airbyte.base_url} sent a response the client cannot read "
        "(KeyError: 'access_token')"
    )
    assert fake_airbyte.clear_violations() == [
        "response 200 to POST /applications/token: response body: 'access_token' is a required property"
    ]


# --------------------------------------------------------------------------- messages from Airbyte's answers


def _answer(status: int, body: str, content_type: str | None = "application/problem+json", **headers: str) -> errors.SDKError:
    """An error as airbyte-api raises it for a real HTTP answer."""
    response = requests.Response()
    response.status_code = status
    response._content = body.encode()
    if content_type:
        response.headers["Content-Type"] = content_type
    response.headers.update(headers)
    return errors.SDKError("API error occurred", status, body, response)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"title": "bad-request", "detail": "The body is invalid"}', "bad-request: The body is invalid"),
        ('{"detail": "only a detail"}', "only a detail"),
        ('{"title": "", "message": "no title or detail"}', "{'title': '', 'message': 'no title or detail'}"),
        ('["a", "list"]', "['a', 'list']"),
        ("  upstream connect error  ", "upstream connect error"),
        ("", "no body"),
        ("x" * 300, "x" * 200),
        ('["' + "y" * 300 + '"]', ("['" + "y" * 300)[:200]),
        ('{"message": "' + "z" * 300 + '"}', ("{'message': '" + "z" * 300)[:200]),
    ],
)
def test_problem_detail_of_an_answer(body: str, problem: str) -> None:
    client = AirbyteClient("http://airbyte.test/api/public/v1")
    assert str(client._rejected("GET /connections", _answer(422, body))) == f"GET /connections: Airbyte answered 422: {problem}"


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_on_an_api_call_name_the_variables(status: int) -> None:
    client = AirbyteClient("http://airbyte.test/api/public/v1", "id", "secret")
    refused = client._rejected("GET /connections", _answer(status, '{"title": "forbidden"}'))
    assert isinstance(refused, AirbyteAuthFailed)
    assert str(refused) == (
        f"GET /connections: Airbyte refused the credentials ({status} forbidden); "
        "check ELT_AIRBYTE_CLIENT_ID and ELT_AIRBYTE_CLIENT_SECRET (`abctl local credentials`)"
    )


def test_success_that_is_not_json_is_a_bad_response() -> None:
    client = AirbyteClient("http://airbyte.test/api/public/v1")
    for content_type, shown in (("text/plain", "text/plain"), (None, "(none)")):
        answer = client._rejected("GET /jobs/7", _answer(200, "ok", content_type))
        assert isinstance(answer, AirbyteBadResponse)
        assert (
            str(answer)
            == f"GET /jobs/7: Airbyte at http://airbyte.test/api/public/v1 answered 200 with Content-Type {shown}, not JSON"
        )
    html = client._rejected("GET /jobs/7", _answer(404, "<html></html>", "text/html; charset=utf-8"))
    assert isinstance(html, AirbyteNotTheApi)
    for server_error in (500, 502):  # a web page for a server error is Airbyte's proxy failing, not a wrong URL
        assert isinstance(
            client._rejected("GET /jobs/7", _answer(server_error, "<html></html>", "text/html")), AirbyteRequestRejected
        )
    assert str(client._rejected("GET /jobs/7", _answer(300, "{}", "application/json"))) == "GET /jobs/7: Airbyte answered 300: {}"
    no_answer = errors.SDKError("API error occurred", 200, "ok", None)
    assert str(client._rejected("GET /jobs/7", no_answer)) == (
        "GET /jobs/7: Airbyte at http://airbyte.test/api/public/v1 answered 200 with Content-Type (none), not JSON"
    )


def test_retry_after_that_is_neither_seconds_nor_a_date_waits_the_backoff(caplog: pytest.LogCaptureFixture) -> None:
    client = AirbyteClient("http://airbyte.test/api/public/v1", wall_clock=lambda: 1_750_000_000.0, max_retry_after_seconds=120)
    with caplog.at_level(logging.INFO, logger="elt.extract.server"):
        assert client._retry_after(_answer(503, "", **{"Retry-After": "soon"}).raw_response, default=4.0) == 4.0
    assert caplog.messages == ["Ignoring a Retry-After that is neither seconds nor an HTTP date: 'soon'"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="elt.extract.server"):
        assert client._retry_after(_answer(503, "", **{"Retry-After": " "}).raw_response, default=4.0) == 4.0
        assert client._retry_after(_answer(503, "").raw_response, default=3.0) == 3.0
        assert client._retry_after(None, default=2.0) == 2.0
        assert client._retry_after(_answer(503, "", **{"Retry-After": "120"}).raw_response, default=4.0) == 120.0
        assert caplog.messages == []  # no header, or exactly the maximum: nothing to say
        long = "later, " * 20
        assert client._retry_after(_answer(503, "", **{"Retry-After": long}).raw_response, default=4.0) == 4.0
    assert caplog.messages == [f"Ignoring a Retry-After that is neither seconds nor an HTTP date: {long.strip()[:60]!r}"]
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert client._retry_after(_answer(503, "", **{"Retry-After": past}).raw_response, default=4.0) == 0.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="elt.extract.server"):
        assert client._retry_after(_answer(503, "", **{"Retry-After": "121"}).raw_response, default=4.0) == 120.0
    assert caplog.messages == ["Airbyte asks to retry after 121s; waiting the maximum of 120s"]


def test_only_one_of_client_id_and_secret_is_refused() -> None:
    for credentials in ({"airbyte_client_id": "id"}, {"airbyte_client_secret": "secret"}):
        with pytest.raises(ConfigurationError) as error:
            AirbyteClient.from_settings(load_settings(airbyte_backend="server", **credentials))
        assert str(error.value) == (
            "set both ELT_AIRBYTE_CLIENT_ID and ELT_AIRBYTE_CLIENT_SECRET (from `abctl local credentials`), or neither for --disable-auth"
        )


def test_client_from_settings_uses_the_request_settings(fake_airbyte: FakeAirbyte) -> None:
    """ELT_AIRBYTE_REQUEST_ATTEMPTS: that many tries of a failing request, then a transient failure."""
    fake_airbyte.add_connection("stripe")
    settings = load_settings(
        airbyte_backend="server",
        airbyte_url=fake_airbyte.ui_url,
        airbyte_client_id="fake-client-id",
        airbyte_client_secret="fake-client-secret",
        airbyte_request_attempts=2,
        airbyte_request_timeout_seconds=7,
    )
    client = AirbyteClient.from_settings(settings)
    sleeps: list[float] = []
    client._sleep = sleeps.append  # the backoff: recorded, no real wait
    client.list_connections()
    fake_airbyte.fail_next(2, 503, path_prefix="/connections")
    with pytest.raises(AirbyteUnavailable, match=r"^GET /connections: .* answered 503 2 times: "):
        client.list_connections()
    assert sleeps == [1.0]  # the first backoff is a second
    assert client._session._timeout_seconds == 7


def test_conflict_attaches_to_this_connections_job_not_anothers(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    """Another connection's job, started later, is newer: the sync still attaches to its own."""
    ours = fake_airbyte.add_connection("stripe", sync_seconds=0.5)
    theirs = fake_airbyte.add_connection("hubspot", sync_seconds=100)
    our_job = fake_airbyte.start_running_job(ours)
    their_job = fake_airbyte.start_running_job(theirs)
    result = _backend(fake_airbyte, clock).sync("stripe", full_refresh=False)
    assert result.job_id == str(our_job) != str(their_job)
    assert fake_airbyte.jobs_for(theirs)[0]["status"] == "running"


def test_cancel_started_jobs_says_what_it_cancelled_and_what_it_could_not(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    stripe = fake_airbyte.add_connection("stripe", outcome="never")
    hubspot = fake_airbyte.add_connection("hubspot", outcome="never")
    backend = _backend(fake_airbyte, clock)
    stripe_job, hubspot_job = fake_airbyte.start_running_job(stripe), fake_airbyte.start_running_job(hubspot)
    backend._started.update({stripe_job: "stripe", hubspot_job: "hubspot"})  # as two syncs of this run record them
    fake_airbyte.fail_next(1, 404, method="DELETE", path_prefix=f"/jobs/{hubspot_job}")
    with caplog.at_level(logging.WARNING, logger="elt.extract.server"):
        backend.cancel_started_jobs()
    assert fake_airbyte.jobs_for(stripe)[0]["status"] == "cancelled"
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", f"Cancelled Airbyte job {stripe_job} of connection 'stripe'"),
        (
            "ERROR",
            f"Could not cancel Airbyte job {hubspot_job} of connection 'hubspot': "
            f"DELETE /jobs/{hubspot_job}: Airbyte answered 404: resource-not-found: Injected failure (404).",
        ),
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://admin:hunter2@airbyte.local:8000/airbyte", "http://***@airbyte.local:8000/airbyte"),
        ("http://admin@airbyte.local/airbyte", "http://***@airbyte.local/airbyte"),
        ("http://:hunter2@airbyte.local", "http://***@airbyte.local"),
        ("http://airbyte.local:8000", "http://airbyte.local:8000"),
    ],
)
def test_wrong_url_message_shows_no_user_or_password(url: str, shown: str) -> None:
    client = AirbyteClient(f"{url}/api/public/v1", configured_url=url)
    assert str(client._not_the_api("GET /health")).startswith(
        f"ELT_AIRBYTE_URL={shown} is not the Airbyte API (GET /health answered HTML)"
    )


def test_unreadable_answer_shows_the_first_line_of_the_cause() -> None:
    client = AirbyteClient("http://airbyte.test/api/public/v1")
    prefix = "GET /jobs/7: Airbyte at http://airbyte.test/api/public/v1 sent a response the client cannot read"
    assert str(client._unreadable("GET /jobs/7", ValueError())) == f"{prefix} (ValueError)"
    assert str(client._unreadable("GET /jobs/7", ValueError("first\nsecond"))) == f"{prefix} (ValueError: first)"
    assert str(client._unreadable("GET /jobs/7", TypeError("z" * 300))) == f"{prefix} (TypeError: {'z' * 200})"


# --------------------------------------------------------------------------- more of what the user reads


class _NotFoundPage(BaseHTTPRequestHandler):
    """A web server that is not Airbyte (a reverse proxy's default site): 404 with a page for every request."""

    content_type = "text/html; charset=utf-8"

    def _answer(self) -> None:
        body = b"<html><body><h1>404 Not Found</h1></body></html>"
        self.send_response(404)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("credentials", "endpoint", "content_type"),
    [
        (True, "POST /applications/token", "text/html; charset=utf-8"),
        (False, "GET /connections", "text/html; charset=utf-8"),
        (False, "GET /connections", "application/xhtml+xml"),
    ],
)
def test_a_web_server_answering_404_pages_is_not_the_api(credentials: bool, endpoint: str, content_type: str) -> None:
    page = type("Page", (_NotFoundPage,), {"content_type": content_type})
    server = ThreadingHTTPServer(("127.0.0.1", 0), page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    settings = load_settings(
        airbyte_backend="server",
        airbyte_url=url,
        airbyte_client_id="fake-client-id" if credentials else None,
        airbyte_client_secret="fake-client-secret" if credentials else None,
    )
    try:
        with pytest.raises(AirbyteNotTheApi) as error:
            AirbyteClient.from_settings(settings).list_connections()
    finally:
        server.shutdown()
    assert str(error.value) == (
        f"ELT_AIRBYTE_URL={url} is not the Airbyte API ({endpoint} answered HTML); "
        "set it to the Airbyte web address, e.g. http://host.docker.internal:8000"
    )


def test_token_exchange_failing_beyond_the_retries_is_a_transient_failure_naming_it(
    fake_airbyte: FakeAirbyte, clock: FakeClock
) -> None:
    fake_airbyte.fail_next(3, 503, path_prefix="/applications/token")
    with pytest.raises(AirbyteUnavailable) as error:
        _client(fake_airbyte, clock, attempts=3).list_connections()
    assert str(error.value) == (
        f"POST /applications/token: Airbyte at {fake_airbyte.base_url} answered 503 3 times: "
        "service-unavailable: Injected failure (503)."
    )


def test_conflict_without_a_listed_job_is_refused_naming_the_connection(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    """409 on POST /jobs, but no running, pending or incomplete job listed (it ended in between):
    the connection's earlier, finished job is not taken for the running one."""
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.2)
    backend = _backend(fake_airbyte, clock)
    backend.sync("stripe", full_refresh=False)
    fake_airbyte.fail_next(1, 409, method="POST", path_prefix="/jobs")
    with pytest.raises(AirbyteRequestRejected) as error:
        backend.sync("stripe", full_refresh=False)
    assert str(error.value) == (f"POST /jobs for connection {connection_id}: Airbyte says a job is running, but none is listed")


def test_a_failed_job_listing_while_attaching_names_the_listing(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.5)
    fake_airbyte.start_running_job(connection_id)
    backend = _backend(fake_airbyte, clock)
    backend.connection_names()
    fake_airbyte.fail_next(1, 403, method="GET", path_prefix="/jobs")
    with pytest.raises(AirbyteAuthFailed) as error:
        backend.sync("stripe", full_refresh=False)
    assert str(error.value).startswith("GET /jobs: Airbyte refused the credentials (403 ")


def test_a_sync_of_nothing_reports_zero_rows(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("quiet", sync_seconds=0.2, rows=0)
    result = _backend(fake_airbyte, clock).sync("quiet", full_refresh=False)
    assert (result.connection, result.rows) == ("quiet", 0)


def test_only_the_configured_workspace_is_listed(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("ours")
    fake_airbyte.add_connection("theirs", workspace_id="7d3c5f7e-0000-4000-8000-000000000000")
    backend = _backend(fake_airbyte, clock, airbyte_workspace_id=fake_airbyte.workspace_id)
    assert backend.connection_names() == ["ours"]
    assert sorted(_backend(fake_airbyte, clock).connection_names()) == ["ours", "theirs"]


def test_backend_builds_its_client_from_the_settings(fake_airbyte: FakeAirbyte) -> None:
    fake_airbyte.add_connection("stripe")
    settings = load_settings(
        airbyte_backend="server",
        airbyte_url=fake_airbyte.ui_url,
        airbyte_client_id="fake-client-id",
        airbyte_client_secret="fake-client-secret",
    )
    backend = ServerBackend(settings)
    assert backend.connection_names() == ["stripe"]
    assert backend.client.configured_url == fake_airbyte.ui_url


def test_job_ending_at_the_last_poll_before_the_timeout_is_not_cancelled(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    """Polls at 0.5 s, 1.0 s, 1.5 s; the job ends at 1.25 s; the timeout is 1.5 s: only a run
    *over* the timeout is cancelled."""
    fake_airbyte.add_connection("edge", sync_seconds=1.2)
    backend = _backend(fake_airbyte, clock, airbyte_poll_seconds=0.5, airbyte_sync_timeout_seconds=1.5)
    assert backend.sync("edge", full_refresh=False).rows == 1000
    assert fake_airbyte.count("DELETE", "/jobs/") == 0


def test_stopping_cancels_the_running_sync_by_name_and_leaves_finished_jobs_alone(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """On the fake clock: the run goes down (cancel_started_jobs) during the third poll of a sync
    that never ends; an earlier sync of this run that finished is not cancelled."""
    fake_airbyte.add_connection("done", sync_seconds=0.2)
    fake_airbyte.add_connection("stuck", outcome="never")
    backend = _backend(fake_airbyte, clock)
    backend.sync("done", full_refresh=False)
    polls_before = len(clock.sleeps)
    clock.on_sleep(lambda polls: polls == polls_before + 3 and backend.cancel_started_jobs())
    with caplog.at_level(logging.WARNING, logger="elt.extract.server"), pytest.raises(AirbyteJobFailed) as error:
        backend.sync("stuck", full_refresh=False)
    assert str(error.value) == "connection 'stuck': stopped while job 2 ran"
    assert caplog.messages == ["Cancelled Airbyte job 2 of connection 'stuck'"]
    assert fake_airbyte.count("DELETE", "/jobs/") == 1


def test_a_status_reason_that_is_not_text_is_ignored(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    """statusReason is outside the v2.0.0 spec: a newer server sending an object there neither
    blocks the connection nor breaks the listing."""
    fake_airbyte.add_connection("shop")
    fake_airbyte.corrupt_next_response(
        lambda body: body["data"][0].update(statusReason={"code": "schema_change"}), path_prefix="/connections"
    )
    backend = _backend(fake_airbyte, clock)
    assert backend.not_runnable() == {}
    assert backend.connections()["shop"].status_reason is None


def test_a_token_refused_twice_is_refreshed_once_then_named(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 gets one new token and one more try; a second 401 is a credentials error, not a loop."""
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock)
    fake_airbyte.fail_next(2, 401, path_prefix="/connections")
    with caplog.at_level(logging.INFO, logger="elt.extract.server"), pytest.raises(AirbyteAuthFailed) as error:
        client.list_connections()
    assert str(error.value).startswith("GET /connections: Airbyte refused the credentials (401 ")
    assert caplog.messages == ["GET /connections: token rejected (401); fetching a new one"]
    assert fake_airbyte.count("POST", "/applications/token") == 2


def test_a_conflict_on_a_listing_is_a_rejected_request(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    """Only POST /jobs attaches on 409; anywhere else it is an error naming the call."""
    fake_airbyte.fail_next(1, 409, method="GET", path_prefix="/connections")
    with pytest.raises(AirbyteRequestRejected) as error:
        _client(fake_airbyte, clock).list_connections()
    assert str(error.value).startswith("GET /connections: Airbyte answered 409: ")


def test_token_is_renewed_only_within_its_last_minute(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    client = _client(fake_airbyte, clock)
    client.list_connections()
    for advance, exchanges in ((119.5, 1), (0.5, 1), (0.5, 2)):  # 119.5 s, 120 s, 120.5 s of a 180 s token
        clock.advance(advance)
        client.list_connections()
        assert fake_airbyte.count("POST", "/applications/token") == exchanges


@pytest.mark.parametrize("status", [429, 500])
def test_429_and_500_are_retried_then_a_transient_failure(
    fake_airbyte: FakeAirbyte, clock: FakeClock, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock, attempts=3)
    client.list_connections()
    fake_airbyte.fail_next(3, status, path_prefix="/connections")
    with caplog.at_level(logging.WARNING, logger="elt.extract.server"), pytest.raises(AirbyteUnavailable) as error:
        client.list_connections()
    problem = {429: "too-many-requests", 500: "unexpected-problem"}[status]
    assert str(error.value) == (
        f"GET /connections: Airbyte at {fake_airbyte.base_url} answered {status} 3 times: {problem}: Injected failure ({status})."
    )
    assert caplog.messages == [
        f"GET /connections: {status} {problem}: Injected failure ({status}).; retry 1 of 2 in 1.0s",
        f"GET /connections: {status} {problem}: Injected failure ({status}).; retry 2 of 2 in 2.0s",
    ]
    assert fake_airbyte.count("GET", "/connections") == 1 + 3


def test_backoff_doubles_up_to_30_seconds(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, clock, attempts=7)
    client.list_connections()
    fake_airbyte.fail_next(6, 502, path_prefix="/connections")
    assert [connection.name for connection in client.list_connections()] == ["stripe"]
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_an_address_nothing_listens_on_is_unreachable_after_the_attempts(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = AirbyteClient(f"http://127.0.0.1:{port}/api/public/v1", attempts=2, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="elt.extract.server"), pytest.raises(AirbyteUnavailable) as error:
        client.health()
    assert str(error.value) == (
        f"GET /health: Airbyte at http://127.0.0.1:{port}/api/public/v1 unreachable after 2 attempts: ConnectionError"
    )
    assert caplog.messages == ["GET /health: ConnectionError; retry 1 of 1 in 1.0s"]


def test_a_server_that_never_answers_times_out_at_the_request_timeout(clock: FakeClock) -> None:
    """A socket that accepts connections and never replies (a hung proxy): each request gives up
    after ELT_AIRBYTE_REQUEST_TIMEOUT_SECONDS instead of waiting for ever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = AirbyteClient(f"http://127.0.0.1:{port}/api/public/v1", attempts=1, timeout_seconds=0.2, sleep=clock.sleep)
        with pytest.raises(AirbyteUnavailable) as error:
            client.health()
    assert str(error.value) == (
        f"GET /health: Airbyte at http://127.0.0.1:{port}/api/public/v1 unreachable after 1 attempts: ReadTimeout"
    )


def test_an_api_url_ending_in_a_slash_is_the_same_api(fake_airbyte: FakeAirbyte, clock: FakeClock) -> None:
    fake_airbyte.add_connection("stripe")
    client = AirbyteClient(
        fake_airbyte.base_url + "/", "fake-client-id", "fake-client-secret", sleep=clock.sleep, clock=clock.monotonic
    )
    assert client.api_url == fake_airbyte.base_url
    assert [connection.name for connection in client.list_connections()] == ["stripe"]
