"""The server backend against a fake Airbyte that enforces the pinned public API spec.

Airbyte's server can't run here (abctl needs a Kubernetes-in-Docker install and images from a
registry), so these tests use tests/fakes/airbyte_server.py: a real HTTP server that validates
every request it receives and every response it sends against public-api-v2.0.0.yaml (errors
against api-problems-v2.0.0.yaml). The `fake_airbyte` fixture fails a test on any violation.
What only a real server would show: real job durations, real failure reasons in its job logs.
"""

from __future__ import annotations

import time

import pytest

from elt.errors import ConfigurationError
from elt.extract.server import (
    AirbyteAuthFailed,
    AirbyteClient,
    AirbyteJobFailed,
    AirbyteJobTimedOut,
    AirbyteRequestRejected,
    AirbyteUnavailable,
    ServerBackend,
)
from elt.settings import load_settings
from tests.fakes.airbyte_server import FakeAirbyte


def _client(fake: FakeAirbyte, **options) -> AirbyteClient:
    defaults = dict(client_id="fake-client-id", client_secret="fake-client-secret", backoff_seconds=0.01)
    return AirbyteClient(fake.base_url, **(defaults | options))


def _backend(fake: FakeAirbyte, client: AirbyteClient | None = None, **settings) -> ServerBackend:
    values = dict(airbyte_backend="server", airbyte_url=fake.ui_url, airbyte_poll_seconds=0.1) | settings
    return ServerBackend(load_settings(**values), client or _client(fake))


def test_lists_every_active_connection_across_pages(fake_airbyte: FakeAirbyte) -> None:
    for index in range(25):
        fake_airbyte.add_connection(f"conn-{index:02d}")
    fake_airbyte.add_connection("paused", status="inactive")
    backend = _backend(fake_airbyte, _client(fake_airbyte, page_size=10))
    assert sorted(backend.connection_names()) == [f"conn-{index:02d}" for index in range(25)]
    assert fake_airbyte.count("GET", "/connections") >= 3


def test_tag_selects_connections(fake_airbyte: FakeAirbyte) -> None:
    fake_airbyte.add_connection("stripe", tags=["nightly"])
    fake_airbyte.add_connection("hubspot", tags=["hourly"])
    assert _backend(fake_airbyte, airbyte_connection_tag="nightly").connection_names() == ["stripe"]


def test_sync_reports_rows_bytes_and_a_link_to_the_job(fake_airbyte: FakeAirbyte) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.3, rows=1234, bytes_=5678)
    result = _backend(fake_airbyte).sync("stripe", full_refresh=False)
    assert (result.rows, result.bytes_synced) == (1234, 5678)
    assert result.job_url.startswith(f"{fake_airbyte.ui_url}/workspaces/")
    assert f"/connections/{connection_id}/job-history#{result.job_id}" in result.job_url


def test_token_expiring_mid_poll_is_refreshed(fake_airbyte: FakeAirbyte) -> None:
    fake_airbyte.add_connection("slow", sync_seconds=1.0)
    backend = _backend(fake_airbyte)
    expire = __import__("threading").Timer(0.4, fake_airbyte.expire_all_tokens)
    expire.start()
    result = backend.sync("slow", full_refresh=False)
    expire.join()
    assert result.rows == 1000
    assert fake_airbyte.count("POST", "/applications/token") == 2
    assert any(status == 401 for _, _, status in fake_airbyte.requests)


def test_conflict_attaches_to_the_running_job(fake_airbyte: FakeAirbyte) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.5)
    running = fake_airbyte.start_running_job(connection_id)
    result = _backend(fake_airbyte).sync("stripe", full_refresh=False)
    assert result.job_id == str(running)
    assert len(fake_airbyte.jobs_for(connection_id)) == 1
    assert any(method == "POST" and path == "/jobs" and status == 409 for method, path, status in fake_airbyte.requests)


def test_burst_of_server_errors_is_retried(fake_airbyte: FakeAirbyte) -> None:
    fake_airbyte.add_connection("stripe", sync_seconds=0.2)
    backend = _backend(fake_airbyte)
    fake_airbyte.fail_next(3, 503, path_prefix="/jobs")
    assert backend.sync("stripe", full_refresh=False).rows == 1000
    fake_airbyte.fail_next(2, 429, path_prefix="/jobs")
    assert backend.sync("stripe", full_refresh=False).rows == 1000


def test_server_errors_beyond_the_retries_are_transient_failures(fake_airbyte: FakeAirbyte) -> None:
    fake_airbyte.add_connection("stripe")
    backend = _backend(fake_airbyte, _client(fake_airbyte, attempts=3))
    backend.connection_names()
    fake_airbyte.fail_next(3, 502, method="POST", path_prefix="/jobs")
    with pytest.raises(AirbyteUnavailable, match=r"POST /jobs: .* answered 502 3 times") as error:
        backend.sync("stripe", full_refresh=False)
    assert error.value.transient


def test_client_errors_fail_at_once_with_the_problem_detail(fake_airbyte: FakeAirbyte) -> None:
    client = _client(fake_airbyte)
    with pytest.raises(AirbyteRequestRejected, match=r"POST /jobs: Airbyte answered 404: .*") as error:
        client.start_job("9f0cbb52-0000-4000-8000-000000000000", "sync")
    assert not error.value.transient
    assert fake_airbyte.count("POST", "/jobs") == 1


def test_wrong_credentials_name_the_variables(fake_airbyte: FakeAirbyte) -> None:
    fake_airbyte.add_connection("stripe")
    client = _client(fake_airbyte, client_secret="wrong")
    with pytest.raises(AirbyteAuthFailed, match="ELT_AIRBYTE_CLIENT_SECRET") as error:
        client.list_connections()
    assert "wrong" not in str(error.value)


@pytest.mark.parametrize(("outcome", "ended"), [("failed", "failed"), ("cancelled", "cancelled")])
def test_failed_and_cancelled_jobs_fail_the_sync(fake_airbyte: FakeAirbyte, outcome: str, ended: str) -> None:
    fake_airbyte.add_connection("stripe", sync_seconds=0.2, outcome=outcome)
    with pytest.raises(AirbyteJobFailed, match=rf"connection 'stripe': sync job \d+ ended {ended} \(http"):
        _backend(fake_airbyte).sync("stripe", full_refresh=False)


def test_job_that_never_ends_is_cancelled_at_the_timeout(fake_airbyte: FakeAirbyte) -> None:
    connection_id = fake_airbyte.add_connection("stuck", outcome="never")
    started = time.monotonic()
    with pytest.raises(AirbyteJobTimedOut, match="ELT_AIRBYTE_SYNC_TIMEOUT_SECONDS=1"):
        _backend(fake_airbyte, airbyte_sync_timeout_seconds=1).sync("stuck", full_refresh=False)
    assert time.monotonic() - started < 5
    assert fake_airbyte.count("DELETE", "/jobs/") == 1
    assert fake_airbyte.jobs_for(connection_id)[0]["status"] == "cancelled"


def test_full_refresh_clears_before_syncing(fake_airbyte: FakeAirbyte) -> None:
    connection_id = fake_airbyte.add_connection("stripe", sync_seconds=0.2)
    _backend(fake_airbyte).sync("stripe", full_refresh=True)
    assert [job["jobType"] for job in fake_airbyte.jobs_for(connection_id)] == ["clear", "sync"]


def test_cancel_started_jobs_cancels_only_what_this_run_started(fake_airbyte: FakeAirbyte) -> None:
    ours = fake_airbyte.add_connection("ours", outcome="never")
    theirs = fake_airbyte.add_connection("theirs", outcome="never")
    fake_airbyte.start_running_job(theirs)
    backend = _backend(fake_airbyte)
    threads = [__import__("threading").Thread(target=_swallow, args=(backend.sync, name)) for name in ("ours", "theirs")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while fake_airbyte.count("GET", "/jobs/") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    backend.cancel_started_jobs()
    for thread in threads:
        thread.join(timeout=5)
    assert fake_airbyte.jobs_for(ours)[-1]["status"] == "cancelled"
    assert fake_airbyte.jobs_for(theirs)[-1]["status"] == "running"


def _swallow(sync, name: str) -> None:
    try:
        sync(name, full_refresh=False)
    except AirbyteJobFailed:
        pass


def test_unknown_job_status_counts_as_still_running() -> None:
    """Newer servers report 'queued'; airbyte-api 0.53 does not know it. The sync keeps waiting."""
    with FakeAirbyte(report_unknown_status="queued", pending_seconds=0.5) as fake:
        fake.add_connection("stripe", sync_seconds=0.8)
        assert _backend(fake).sync("stripe", full_refresh=False).rows == 1000
        fake.assert_no_violations()


def test_no_auth_server() -> None:
    """Airbyte installed with `abctl local install --disable-auth`: no token exchange at all."""
    with FakeAirbyte(auth=False) as fake:
        fake.add_connection("stripe", sync_seconds=0.1)
        backend = _backend(fake, AirbyteClient(fake.base_url, backoff_seconds=0.01))
        assert backend.sync("stripe", full_refresh=False).rows == 1000
        assert fake.count("POST", "/applications/token") == 0
        fake.assert_no_violations()


def test_web_page_instead_of_the_api_names_the_url_setting(fake_airbyte: FakeAirbyte) -> None:
    client = AirbyteClient(fake_airbyte.ui_url + "/airbyte", backoff_seconds=0.01)
    with pytest.raises(ConfigurationError, match="ELT_AIRBYTE_URL"):
        client.list_connections()
    fake_airbyte.clear_violations()  # the wrong URL is the point of this test
