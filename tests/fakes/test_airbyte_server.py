"""Self-tests of FakeAirbyte: it behaves like Airbyte's public API and its contract checks bite."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.airbyte_server import (
    SPEC_DIR,
    FakeAirbyte,
    java_duration,
    java_offset_datetime,
    load_contract,
    tag_id,
)
from tests.fakes.clock import FakeClock

TERMINAL = {"succeeded", "failed", "cancelled"}
ISO_DURATION = re.compile(r"^PT(\d+H)?(\d+M)?(\d+S)?$")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeAirbyte]:
    with FakeAirbyte(clock=clock) as server:
        yield server


def token_request(fake: FakeAirbyte, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "grant-type": "client_credentials",
    }
    body.update(overrides)
    return body


def get_token(fake: FakeAirbyte) -> str:
    response = httpx.post(f"{fake.base_url}/applications/token", json=token_request(fake))
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.fixture
def api(fake: FakeAirbyte) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {get_token(fake)}"}
    with httpx.Client(base_url=fake.base_url, headers=headers, timeout=10) as client:
        yield client


def poll_until_terminal(
    api: httpx.Client, clock: FakeClock, job_id: int, step: float = 0.02, max_polls: int = 1000
) -> list[dict[str, Any]]:
    """Poll the job, moving the fake's clock `step` seconds between polls; fail after `max_polls`."""
    seen = []
    for _ in range(max_polls):
        response = api.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if seen[-1]["status"] in TERMINAL:
            return seen
        clock.advance(step)
    raise AssertionError(f"job {job_id} not finished after {max_polls} polls: {seen[-1]}")


def distinct(statuses: list[str]) -> list[str]:
    return [status for index, status in enumerate(statuses) if index == 0 or statuses[index - 1] != status]


# --------------------------------------------------------------------------- the contract itself


def test_vendored_spec_is_the_pinned_release() -> None:
    """The spec is vendored inside the repo (nothing outside the checkout is read) and unedited."""
    repo_root = Path(__file__).resolve().parents[2]
    assert SPEC_DIR.is_relative_to(repo_root)
    digests = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in SPEC_DIR.glob("*.yaml")}
    assert digests == {
        "public-api-v2.0.0.yaml": "fe7d88e24fa7947424c8891a209c631acbc395dd9d3b95e484c7293d2c769ec7",
        "api-problems-v2.0.0.yaml": "b18b0b9352c65a5eb6ad83dd3e87dff9dc61d309bd2dfcc69f07f932e62c95ed",
    }
    provenance = (SPEC_DIR / "README.md").read_text()
    assert "airbytehq/airbyte-platform" in provenance and "`v2.0.0`" in provenance
    assert "airbyte-api/server-api/src/main/openapi/api.yaml" in provenance
    assert "airbyte-api/problems-api/src/main/openapi/api-problems.yaml" in provenance


def test_dangling_refs_are_the_documented_ones() -> None:
    contract = load_contract()
    assert set(contract.dangling_refs) == {
        "#/components/schemas/DataplaneCreateResponseBody",
        "#/components/responses/ForbiddenResponse",
    }
    assert "/jobs" not in contract.dropped_paths and "/connections" not in contract.dropped_paths


def test_java_style_formats() -> None:
    assert java_duration(0) == "PT0S"
    assert java_duration(65) == "PT1M5S"
    assert java_duration(8 * 3600 + 6 * 60 + 12) == "PT8H6M12S"
    assert java_offset_datetime(1_700_000_000) == "2023-11-14T22:13:20Z"
    assert java_offset_datetime(1_699_999_980) == "2023-11-14T22:13Z"  # Java drops ":00" seconds


# --------------------------------------------------------------------------- auth


def test_token_exchange_and_bearer_auth(fake: FakeAirbyte) -> None:
    fake.add_connection("orders")
    response = httpx.post(f"{fake.base_url}/applications/token", json=token_request(fake))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 180

    authed = httpx.get(f"{fake.base_url}/connections", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert authed.status_code == 200 and len(authed.json()["data"]) == 1

    anonymous = httpx.get(f"{fake.base_url}/connections")
    assert anonymous.status_code == 401
    assert anonymous.json()["title"] == "invalid-api-key"

    wrong = httpx.post(f"{fake.base_url}/applications/token", json=token_request(fake, client_secret="nope"))
    assert wrong.status_code == 400 and wrong.json()["title"] == "bad-request"

    form = httpx.post(f"{fake.base_url}/applications/token", data=token_request(fake))
    assert form.status_code == 200  # the spec also allows application/x-www-form-urlencoded

    assert httpx.get(f"{fake.base_url}/health").status_code == 200
    fake.assert_no_violations()


def test_expired_and_revoked_tokens_get_401(clock: FakeClock) -> None:
    with FakeAirbyte(clock=clock, token_ttl_seconds=180) as fake:
        headers = {"Authorization": f"Bearer {get_token(fake)}"}
        clock.advance(179.9)
        assert httpx.get(f"{fake.base_url}/jobs", headers=headers).status_code == 200
        clock.advance(0.2)
        expired = httpx.get(f"{fake.base_url}/jobs", headers=headers)
        assert expired.status_code == 401 and expired.json()["status"] == 401

        headers = {"Authorization": f"Bearer {get_token(fake)}"}
        assert httpx.get(f"{fake.base_url}/jobs", headers=headers).status_code == 200
        fake.expire_all_tokens()
        assert httpx.get(f"{fake.base_url}/jobs", headers=headers).status_code == 401
        fake.assert_no_violations()


def test_auth_can_be_disabled() -> None:
    with FakeAirbyte(auth=False) as fake:
        fake.add_connection("orders")
        assert httpx.get(f"{fake.base_url}/connections").status_code == 200
        fake.assert_no_violations()


def test_grant_type_with_underscore_is_a_violation(fake: FakeAirbyte) -> None:
    body = {"client_id": fake.client_id, "client_secret": fake.client_secret, "grant_type": "client_credentials"}
    response = httpx.post(f"{fake.base_url}/applications/token", json=body)
    assert response.status_code == 400
    assert any("grant-type" in violation for violation in fake.violations)


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize(("next_on_every_page", "requests_needed"), [(True, 4), (False, 3)])
def test_pagination_follows_next(next_on_every_page: bool, requests_needed: int) -> None:
    with FakeAirbyte(next_on_every_page=next_on_every_page) as fake:
        ids = {fake.add_connection(f"conn-{index:02d}") for index in range(25)}
        headers = {"Authorization": f"Bearer {get_token(fake)}"}
        url: str = f"{fake.base_url}/connections?limit=10"
        pages = []
        while url:
            response = httpx.get(url, headers=headers)
            assert response.status_code == 200, response.text
            pages.append(response.json())
            url = pages[-1]["next"]  # "" (not absent) when there is no next page
        assert len(pages) == requests_needed
        assert [len(page["data"]) for page in pages][:3] == [10, 10, 5]
        assert {connection["connectionId"] for page in pages for connection in page["data"]} == ids
        assert pages[0]["previous"] == ""
        assert pages[1]["previous"].startswith(f"{fake.base_url}/connections?") and "offset=0" in pages[1]["previous"]
        fake.assert_no_violations()


def test_connection_shape_and_filters(fake: FakeAirbyte, api: httpx.Client) -> None:
    other_workspace = "0b1c2d3e-0000-4000-8000-000000000001"
    nightly = fake.add_connection("nightly", tags=["elt", "nightly"])
    fake.add_connection("adhoc", tags=["adhoc"])
    fake.add_connection("elsewhere", tags=["elt"], workspace_id=other_workspace)
    fake.add_connection("gone", status="deprecated")

    everything = api.get("/connections").json()["data"]
    assert {connection["name"] for connection in everything} == {"nightly", "adhoc", "elsewhere"}
    first = next(connection for connection in everything if connection["connectionId"] == nightly)
    assert first["tags"][0] == {
        "tagId": tag_id("elt"),
        "workspaceId": fake.workspace_id,
        "name": "elt",
        "color": first["tags"][0]["color"],
    }
    assert fake.tag_id("elt") == tag_id("elt")

    by_tag = api.get("/connections", params={"tagIds": [tag_id("elt")]}).json()["data"]
    assert {connection["name"] for connection in by_tag} == {"nightly", "elsewhere"}
    by_workspace = api.get("/connections", params={"workspaceIds": [other_workspace]}).json()["data"]
    assert [connection["name"] for connection in by_workspace] == ["elsewhere"]
    with_deleted = api.get("/connections", params={"includeDeleted": "true"}).json()["data"]
    assert len(with_deleted) == 4

    assert api.get(f"/connections/{nightly}").json()["name"] == "nightly"
    missing = api.get("/connections/6f0c8a8e-0000-4000-8000-000000000000")
    assert missing.status_code == 404 and missing.json()["title"] == "resource-not-found"
    fake.assert_no_violations()


# --------------------------------------------------------------------------- jobs


def test_job_goes_pending_running_succeeded(fake: FakeAirbyte, api: httpx.Client, clock: FakeClock) -> None:
    connection_id = fake.add_connection("orders", sync_seconds=0.3, rows=1234, bytes_=5678)
    created = api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"})
    assert created.status_code == 200
    job = created.json()
    assert job["status"] == "pending" and job["jobType"] == "sync" and job["connectionId"] == connection_id
    assert isinstance(job["jobId"], int) and "duration" not in job

    seen = poll_until_terminal(api, clock, job["jobId"])
    assert distinct(["pending"] + [snapshot["status"] for snapshot in seen]) == ["pending", "running", "succeeded"]
    final = seen[-1]
    assert final["rowsSynced"] == 1234 and final["bytesSynced"] == 5678
    assert ISO_DURATION.match(final["duration"]) and "lastUpdatedAt" in final
    running = next(snapshot for snapshot in seen if snapshot["status"] == "running")
    assert "lastUpdatedAt" not in running and "duration" in running
    assert fake.jobs_for(connection_id)[0]["status"] == "succeeded"
    fake.assert_no_violations()


def test_failed_outcome_and_other_job_types(fake: FakeAirbyte, api: httpx.Client, clock: FakeClock) -> None:
    failing = fake.add_connection("flaky", sync_seconds=0.1, outcome="failed")
    job = api.post("/jobs", json={"connectionId": failing, "jobType": "sync"}).json()
    assert poll_until_terminal(api, clock, job["jobId"])[-1]["status"] == "failed"

    clear = api.post("/jobs", json={"connectionId": failing, "jobType": "clear"})
    assert clear.status_code == 200 and clear.json()["jobType"] == "clear"

    refresh = api.post("/jobs", json={"connectionId": failing, "jobType": "refresh"})
    assert refresh.status_code == 422 and refresh.json()["title"] == "unprocessable-entity"

    unknown = api.post("/jobs", json={"connectionId": "6f0c8a8e-0000-4000-8000-000000000000", "jobType": "sync"})
    assert unknown.status_code == 404 and unknown.json()["data"]["resourceId"].startswith("6f0c8a8e")
    assert api.get("/jobs/999999").status_code == 404
    fake.assert_no_violations()


def test_never_ending_job_runs_until_cancelled(fake: FakeAirbyte, api: httpx.Client, clock: FakeClock) -> None:
    connection_id = fake.add_connection("stuck", sync_seconds=0.05, outcome="never")
    job_id = api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"}).json()["jobId"]
    clock.advance(170)  # long past sync_seconds (and within the token's 180 s)
    assert api.get(f"/jobs/{job_id}").json()["status"] == "running"
    cancelled = api.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    fake.assert_no_violations()


def test_failed_attempts_report_incomplete_then_run_again(fake: FakeAirbyte, api: httpx.Client, clock: FakeClock) -> None:
    """Airbyte's JobStatus: an attempt that fails leaves the job `incomplete` (not terminal) until the next one runs."""
    connection_id = fake.add_connection("flaky", sync_seconds=0.3, failed_attempts=2, retry_seconds=0.2, rows=7)
    job = api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"}).json()
    seen = poll_until_terminal(api, clock, job["jobId"])
    assert distinct(["pending"] + [snapshot["status"] for snapshot in seen]) == [
        "pending",
        "running",
        "incomplete",
        "running",
        "incomplete",
        "running",
        "succeeded",
    ]
    incomplete = next(snapshot for snapshot in seen if snapshot["status"] == "incomplete")
    assert "lastUpdatedAt" not in incomplete and "rowsSynced" not in incomplete
    assert seen[-1]["rowsSynced"] == 7 and seen[-1]["duration"] == "PT1S"  # 0.3 + 2 x (0.2 + 0.3) s
    fake.assert_no_violations()


def test_job_between_attempts_conflicts_and_is_listed_as_incomplete(
    fake: FakeAirbyte, api: httpx.Client, clock: FakeClock
) -> None:
    connection_id = fake.add_connection("flaky", sync_seconds=1.0, failed_attempts=1, retry_seconds=5)
    job_id = fake.start_running_job(connection_id)
    clock.advance(2)
    assert api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"}).status_code == 409
    listed = api.get("/jobs", params={"connectionId": connection_id, "status": "incomplete"}).json()["data"]
    assert [job["jobId"] for job in listed] == [job_id]
    fake.assert_no_violations()


def test_second_sync_conflicts_and_running_job_can_be_found(fake: FakeAirbyte, api: httpx.Client) -> None:
    connection_id = fake.add_connection("orders", sync_seconds=5)
    running_id = fake.start_running_job(connection_id)

    conflict = api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"})
    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/json"
    problem = conflict.json()
    assert problem["type"] == "https://reference.airbyte.com/reference/errors#try-again-later"
    assert problem["title"] == "try-again-later" and problem["status"] == 409
    assert connection_id in problem["data"]["message"]

    found = api.get("/jobs", params={"connectionId": connection_id, "status": "running", "jobType": "sync"})
    assert found.status_code == 200
    assert [job["jobId"] for job in found.json()["data"]] == [running_id]
    newest_first = api.get("/jobs", params={"connectionId": connection_id, "orderBy": "createdAt|DESC"})
    assert newest_first.status_code == 200
    assert api.get("/jobs", params={"orderBy": "color|DESC"}).status_code == 400
    fake.assert_no_violations()


def test_unknown_status_reported_while_pending_is_tolerated_only_as_configured(clock: FakeClock) -> None:
    with FakeAirbyte(clock=clock, report_unknown_status="queued", pending_seconds=1.0) as fake:
        headers = {"Authorization": f"Bearer {get_token(fake)}"}
        connection_id = fake.add_connection("orders")
        job = httpx.post(f"{fake.base_url}/jobs", headers=headers, json={"connectionId": connection_id, "jobType": "sync"})
        assert job.json()["status"] == "queued"
        assert httpx.get(f"{fake.base_url}/jobs/{job.json()['jobId']}", headers=headers).json()["status"] == "queued"
        fake.assert_no_violations()

        fake.corrupt_next_response(lambda body: body.update(status="exploded"))
        httpx.get(f"{fake.base_url}/jobs/{job.json()['jobId']}", headers=headers)
        assert len(fake.violations) == 1 and "'exploded' is not one of" in fake.violations[0]

        httpx.get(f"{fake.base_url}/jobs", headers=headers, params={"status": "queued"})  # requests stay strict
        assert len(fake.violations) == 2 and "request GET /jobs" in fake.violations[1]


def test_many_jobs_polled_concurrently(fake: FakeAirbyte, api: httpx.Client, clock: FakeClock) -> None:
    connection_ids = [fake.add_connection(f"conn-{index}", sync_seconds=0.3) for index in range(40)]

    def run(connection_id: str) -> str:
        job = api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"}).json()
        return str(poll_until_terminal(api, clock, job["jobId"])[-1]["status"])

    with ThreadPoolExecutor(max_workers=40) as pool:
        assert set(pool.map(run, connection_ids)) == {"succeeded"}
    assert fake.count("POST", "/jobs") == 40
    fake.assert_no_violations()


# --------------------------------------------------------------------------- faults and quirks


def test_fail_next_then_recover(fake: FakeAirbyte, api: httpx.Client) -> None:
    fake.fail_next(2, path_prefix="/jobs")
    for _ in range(2):
        failed = api.get("/jobs")
        assert failed.status_code == 503 and failed.json()["title"] == "service-unavailable"
    assert api.get("/jobs").status_code == 200

    fake.fail_next(1, 429, method="GET", retry_after=2)
    limited = api.get("/connections")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    assert limited.json()["status"] == 429

    fake.fail_next(1, 502)
    assert api.get("/connections").status_code == 502
    assert api.get("/connections").status_code == 200
    assert fake.count("GET", "/jobs") == 3
    assert [status for method, path, status in fake.requests if path == "/connections"] == [429, 502, 200]
    fake.assert_no_violations()

    fake.fail_next(1, 500)
    assert api.get("/connections", params={"limit": "0"}).status_code == 500
    assert fake.clear_violations() == ["request GET /connections: query parameter 'limit': 0 is less than the minimum of 1"]


def test_delay_responses_outlast_a_client_timeout(fake: FakeAirbyte) -> None:
    fake.delay_responses(2.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{fake.base_url}/health", timeout=0.2)
    fake.delay_responses(0)
    assert httpx.get(f"{fake.base_url}/health", timeout=5).status_code == 200


def test_retry_after_as_seconds_or_an_http_date(fake: FakeAirbyte, api: httpx.Client) -> None:
    fake.fail_next(1, 503, retry_after=1.2)
    assert api.get("/connections").headers["Retry-After"] == "2"
    fake.fail_next(1, 429, retry_after=datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC))
    limited = api.get("/connections")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "Sun, 01 Mar 2026 12:30:05 GMT"
    assert "Retry-After" not in api.get("/connections").headers
    fake.assert_no_violations()


def test_wrong_base_path_answers_html_to_any_method(fake: FakeAirbyte) -> None:
    """ELT_AIRBYTE_URL with a wrong path: even the token exchange gets the UI's HTML with 200."""
    wrong = f"{fake.ui_url}/airbyte/api/public/v1"
    token = httpx.post(f"{wrong}/applications/token", json=token_request(fake))
    assert token.status_code == 200 and token.headers["content-type"].startswith("text/html")
    assert "<!doctype html>" in token.text
    assert httpx.get(f"{wrong}/connections").headers["content-type"].startswith("text/html")
    assert fake.count("POST", "/airbyte/api/public/v1/applications/token") == 1
    fake.assert_no_violations()  # outside /api/public/v1 it is just the UI, as on the real server


def test_unknown_path_answers_html_like_the_real_server(fake: FakeAirbyte, api: httpx.Client) -> None:
    response = api.get("/connectionz")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert fake.clear_violations() == [
        "request GET /connectionz: no such path in the public API spec (real server: 200 + web UI HTML)"
    ]
    assert httpx.get(f"{fake.ui_url}/workspaces/abc").headers["content-type"].startswith("text/html")
    fake.assert_no_violations()  # outside /api/public/v1 it is just the UI


# --------------------------------------------------------------------------- the validator catches violations


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"connectionId": "00000000-0000-4000-8000-000000000000", "jobType": "explode"}, "'explode' is not one of"),
        ({"jobType": "sync"}, "'connectionId' is a required property"),
    ],
)
def test_bad_job_request_is_a_violation_and_gets_400(
    fake: FakeAirbyte, api: httpx.Client, body: dict[str, Any], expected: str
) -> None:
    response = api.post("/jobs", json=body)
    assert response.status_code == 400
    problem = response.json()
    assert problem["title"] == "bad-request" and expected in problem["data"]["message"]
    assert len(fake.violations) == 1
    assert fake.violations[0].startswith("request POST /jobs: request body") and expected in fake.violations[0]
    with pytest.raises(AssertionError, match="1 Airbyte API contract violation"):
        fake.assert_no_violations()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"limit": "500"}, "500 is greater than the maximum of 100"),
        ({"limit": "ten"}, "'ten' is not an integer"),
        ({"includeDeleted": "yes"}, "'yes' is not a boolean"),
        ({"workspaceIds": "not-a-uuid"}, "'not-a-uuid' is not a 'uuid'"),
        ({"connection_id": "x"}, "query parameter 'connection_id' is not defined"),
    ],
)
def test_bad_query_is_a_violation(fake: FakeAirbyte, api: httpx.Client, params: dict[str, str], expected: str) -> None:
    response = api.get("/connections", params=params)
    assert response.status_code == 400
    assert len(fake.violations) == 1 and expected in fake.violations[0]
    assert fake.violations[0].startswith("request GET /connections:")


def test_malformed_response_is_recorded(fake: FakeAirbyte, api: httpx.Client) -> None:
    fake.add_connection("orders", tags=["elt"])
    fake.corrupt_next_response(lambda body: body["data"][0].pop("tags"), path_prefix="/connections")
    response = api.get("/connections")
    assert response.status_code == 200 and "tags" not in response.json()["data"][0]
    assert len(fake.violations) == 1
    assert fake.violations[0].startswith("response 200 to GET /connections: response body at $.data[0]")
    assert "'tags' is a required property" in fake.violations[0]

    fake.corrupt_next_response(lambda body: body["data"][0]["tags"][0].update(tagId=7))
    api.get("/connections")
    assert "7 is not of type 'string'" in fake.violations[1]


def test_malformed_problem_body_is_recorded(fake: FakeAirbyte, api: httpx.Client) -> None:
    connection_id = fake.add_connection("orders", sync_seconds=5)
    fake.start_running_job(connection_id)
    fake.corrupt_next_response(lambda body: body.pop("title"))
    assert api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"}).status_code == 409
    fake.corrupt_next_response(lambda body: body.update(status=500))
    api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"})
    fake.corrupt_next_response(lambda body: body["data"].pop("message"))
    api.post("/jobs", json={"connectionId": connection_id, "jobType": "sync"})
    assert len(fake.violations) == 3
    assert "'title' is a required property" in fake.violations[0]
    assert "status 500 differs from the HTTP status 409" in fake.violations[1]
    assert "TryAgainLaterConflictProblemResponse" in fake.violations[2] and "'message'" in fake.violations[2]


def test_unsimulated_operation_is_a_violation(fake: FakeAirbyte, api: httpx.Client) -> None:
    response = api.get("/sources")
    assert response.status_code == 501
    assert fake.violations == ["request GET /sources: FakeAirbyte does not simulate listSources"]
