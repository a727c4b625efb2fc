"""The server backend: a self-hosted Airbyte (abctl) driven through its public API with airbyte-api.

`AirbyteClient` makes the calls — token exchange, list connections, start, poll and cancel
jobs — and owns auth, retries and error messages. `ServerBackend` runs one connection's
sync to its end on top of it. `prefect-airbyte` is not used: it does not import on Prefect 3.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse, urlsplit, urlunsplit

import requests
from airbyte_api import AirbyteAPI, api, errors, models
from airbyte_api._hooks.types import AfterSuccessContext, AfterSuccessHook

from elt.errors import ConfigurationError, TerminalError, TransientError
from elt.extract.base import SyncResult
from elt.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Airbyte's JobStatus: only these are terminal. `incomplete` means an attempt failed and the job
# goes back to pending/running for its next attempt; unknown statuses (`queued`) are not finished.
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# A Retry-After longer than this is cut to it: a run waits, but not for whatever a proxy says.
MAX_RETRY_AFTER_SECONDS = 120.0
# Statuses whose answers are retried: 429 and 503 may say when to come back (Retry-After).
RETRY_AFTER_STATUSES = frozenset({429, 503})
KNOWN_CONNECTION_STATUSES = frozenset({"active", "inactive", "deprecated", "locked"})
_BREAKING_CHANGE = re.compile(r"(?<![\w-])(?<!non )breaking", re.IGNORECASE)  # not "non-breaking"


class AirbyteUnavailable(TransientError):
    """Connection errors, 5xx or 429 outlasted every retry."""


class AirbyteRequestRejected(TerminalError):
    """A 4xx other than an expired token: retrying the same request cannot help."""


class AirbyteAuthFailed(ConfigurationError):
    pass


class AirbyteJobFailed(TerminalError):
    pass


class AirbyteNotTheApi(ConfigurationError):
    """ELT_AIRBYTE_URL points at a web page (Airbyte's UI answers 200 with HTML for any unknown path)."""


class AirbyteBadResponse(TerminalError):
    """Airbyte answered, but with a body the client cannot read."""


class AirbyteConnectionNotRunnable(TerminalError):
    """The connection is not in a state to sync (inactive, locked, a breaking schema change...)."""


class AirbyteJobTimedOut(TerminalError):
    pass


@dataclass(frozen=True)
class Connection:
    id: str
    name: str
    workspace_id: str
    status: str
    tags: tuple[str, ...]
    status_reason: str | None = None

    def not_runnable_because(self) -> str | None:
        """Why this connection must not be synced now, or None if it may be.

        Airbyte's public API v2.0.0 knows active, inactive and deprecated; anything else (a newer
        server's `locked`, say) is not runnable either. A status reason is not part of v2.0.0:
        when a server sends one that reports a breaking schema change, the connection waits for it.
        """
        reason = f" ({self.status_reason})" if self.status_reason else ""
        if self.status == "active":
            if self.status_reason and _BREAKING_CHANGE.search(self.status_reason):
                return f"reports a pending breaking schema change{reason}"
            return None
        if self.status in KNOWN_CONNECTION_STATUSES:
            return f"marks it {self.status}{reason}"
        return f"reports status '{self.status}', which the appliance does not know{reason}"


@dataclass(frozen=True)
class Job:
    id: int
    connection_id: str
    status: str
    rows: int | None = None
    bytes_synced: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


class AirbyteClient:
    """The public API calls the appliance needs, each retried on transient failures."""

    def __init__(
        self,
        api_url: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        attempts: int = 6,
        timeout_seconds: float = 30.0,
        backoff_seconds: float = 1.0,
        page_size: int = 100,
        max_retry_after_seconds: float = MAX_RETRY_AFTER_SECONDS,
        configured_url: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        # What the user set (ELT_AIRBYTE_URL), for messages: api_url has /api/public/v1 appended.
        self.configured_url = configured_url or self.api_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._attempts = attempts
        self._backoff_seconds = backoff_seconds
        self._page_size = page_size
        self._max_retry_after_seconds = max_retry_after_seconds
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self._session = _TimeoutSession(timeout_seconds)
        self._token: str | None = None
        self._token_expires_at = 0.0
        self._token_lock = threading.Lock()
        self._sdk = AirbyteAPI(server_url=self.api_url, security=self._security, client=self._session)
        hooks = self._sdk.sdk_configuration.get_hooks()
        hooks.register_after_success_hook(_HtmlIsNotTheApi())
        hooks.register_after_success_hook(_UnknownJobStatusIsRunning())
        self._connection_status_hook = _ConnectionStatusAsSent()
        hooks.register_after_success_hook(self._connection_status_hook)

    @classmethod
    def from_settings(cls, settings: Settings) -> AirbyteClient:
        if bool(settings.airbyte_client_id) != bool(settings.airbyte_client_secret):
            raise ConfigurationError(
                "set both ELT_AIRBYTE_CLIENT_ID and ELT_AIRBYTE_CLIENT_SECRET (from `abctl local credentials`), or neither for --disable-auth"
            )
        return cls(
            settings.airbyte_api_url,
            settings.airbyte_client_id,
            settings.airbyte_client_secret.get_secret_value() if settings.airbyte_client_secret else None,
            attempts=settings.airbyte_request_attempts,
            timeout_seconds=settings.airbyte_request_timeout_seconds,
            configured_url=settings.airbyte_url,
        )

    # -- auth ---------------------------------------------------------------------------------

    def _security(self) -> models.Security:
        if not self._client_id:
            return models.Security()
        with self._token_lock:
            # Refresh a minute early: tokens live 3 to 15 minutes and a poll may straddle expiry.
            if self._token is None or self._clock() > self._token_expires_at - 60:
                self._refresh_token()
            return models.Security(bearer_auth=self._token)

    def _refresh_token(self) -> None:
        # Airbyte's spec names the field `grant-type`; airbyte-api's own token hook posts a form
        # with `grant_type` to a URL without /api/public/v1, so the exchange is made here
        # (https://github.com/airbytehq/airbyte-api-python-sdk/issues/112, .../issues/126).
        description = "POST /applications/token"
        url = f"{self.api_url}/applications/token"
        body = {"client_id": self._client_id, "client_secret": self._client_secret, "grant-type": "client_credentials"}
        try:
            response = self._with_retries(description, lambda: self._checked(self._session.post(url, json=body)))
        except errors.SDKError as exc:
            if _is_html(exc.raw_response):
                raise self._not_the_api(description) from None
            raise AirbyteAuthFailed(
                f"{description}: Airbyte refused the client credentials ({exc.status_code} {_problem(exc)}); "
                "check ELT_AIRBYTE_CLIENT_ID and ELT_AIRBYTE_CLIENT_SECRET (`abctl local credentials`)"
            ) from None
        if _is_html(response):
            raise self._not_the_api(description)
        try:
            payload = response.json()
            token = str(payload["access_token"])
            expires_in = float(payload.get("expires_in") or 180)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._unreadable(description, exc) from None
        self._token = token
        self._token_expires_at = self._clock() + expires_in

    def _forget_token(self) -> None:
        with self._token_lock:
            self._token = None

    def _checked(self, response: requests.Response) -> requests.Response:
        if response.status_code >= 400:
            raise errors.SDKError("API error occurred", response.status_code, response.text, response)
        return response

    # -- calls --------------------------------------------------------------------------------

    def health(self) -> None:
        self._call("GET /health", lambda: self._sdk.health.get_health_check())

    def list_connections(self, workspace_id: str | None = None) -> list[Connection]:
        """Every non-deleted connection, across all pages."""
        connections: list[Connection] = []
        offset = 0
        while True:
            request = api.ListConnectionsRequest(
                limit=self._page_size, offset=offset, workspace_ids=[workspace_id] if workspace_id else None
            )
            page = self._call("GET /connections", functools.partial(self._sdk.connections.list_connections, request))
            body = page.connections_response
            connections += [
                Connection(
                    id=item.connection_id,
                    name=item.name,
                    workspace_id=item.workspace_id,
                    status=status,
                    tags=tuple(tag.name for tag in item.tags or ()),
                    status_reason=reason,
                )
                for item in body.data
                for status, reason in [self._connection_status_hook.as_sent(item)]
            ]
            # A short page is the last one: newer servers give `next` on every non-empty page.
            if not body.next or len(body.data) < self._page_size:
                return connections
            offset = int(parse_qs(urlparse(body.next).query).get("offset", [offset + len(body.data)])[0])

    def start_job(self, connection_id: str, job_type: str) -> tuple[Job, bool]:
        """Start a job; on 409 (one is already running) attach to it. Returns the job and whether it is new."""
        request = models.JobCreateRequest(connection_id=connection_id, job_type=models.JobTypeEnum(job_type))
        try:
            response = self._call("POST /jobs", lambda: self._sdk.jobs.create_job(request), conflict_is_error=False)
        except _Conflict:
            running = self.running_job(connection_id)
            if running is None:
                raise AirbyteRequestRejected(
                    f"POST /jobs for connection {connection_id}: Airbyte says a job is running, but none is listed"
                ) from None
            logger.info("Connection %s already has job %s running; attaching to it", connection_id, running.id)
            return running, False
        return _job(response.job_response), True

    def running_job(self, connection_id: str) -> Job | None:
        # An incomplete job is between attempts: it is still the connection's current job.
        for status in (models.JobStatusEnum.RUNNING, models.JobStatusEnum.PENDING, models.JobStatusEnum.INCOMPLETE):
            request = api.ListJobsRequest(connection_id=connection_id, status=status, limit=5, order_by="createdAt|DESC")
            jobs = self._call("GET /jobs", functools.partial(self._sdk.jobs.list_jobs, request)).jobs_response.data
            if jobs:
                return _job(jobs[0])
        return None

    def get_job(self, job_id: int) -> Job:
        response = self._call(f"GET /jobs/{job_id}", lambda: self._sdk.jobs.get_job(api.GetJobRequest(job_id=job_id)))
        return _job(response.job_response)

    def cancel_job(self, job_id: int) -> None:
        self._call(f"DELETE /jobs/{job_id}", lambda: self._sdk.jobs.cancel_job(api.CancelJobRequest(job_id=job_id)))

    # -- retries ------------------------------------------------------------------------------

    def _call(self, description: str, call: Callable[[], T], conflict_is_error: bool = True) -> T:
        refreshed = False
        while True:
            try:
                return self._with_retries(description, call)
            except _HtmlAnswer:
                raise self._not_the_api(description) from None
            except requests.RequestException:
                raise  # InvalidURL and friends are ValueErrors too, but not unreadable answers
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # airbyte-api parses bodies with json/dataclasses-json; their errors name no endpoint.
                raise self._unreadable(description, exc) from None
            except errors.SDKError as exc:
                if exc.status_code == 401 and self._client_id and not refreshed:
                    logger.info("%s: token rejected (401); fetching a new one", description)
                    self._forget_token()
                    refreshed = True
                    continue
                if exc.status_code == 409 and not conflict_is_error:
                    raise _Conflict() from None
                raise self._rejected(description, exc) from None

    def _with_retries(self, description: str, call: Callable[[], T]) -> T:
        delay = self._backoff_seconds
        for attempt in range(1, self._attempts + 1):
            wait = delay
            try:
                return call()
            except errors.SDKError as exc:
                if not (exc.status_code == 429 or exc.status_code >= 500) or attempt == self._attempts:
                    if exc.status_code == 429 or exc.status_code >= 500:
                        raise AirbyteUnavailable(
                            f"{description}: Airbyte at {self.api_url} answered {exc.status_code} {attempt} times: {_problem(exc)}"
                        ) from None
                    raise
                reason = f"{exc.status_code} {_problem(exc)}"
                if exc.status_code in RETRY_AFTER_STATUSES:
                    wait = self._retry_after(exc.raw_response, default=delay)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self._attempts:
                    raise AirbyteUnavailable(
                        f"{description}: Airbyte at {self.api_url} unreachable after {attempt} attempts: {type(exc).__name__}"
                    ) from None
                reason = type(exc).__name__
            logger.warning("%s: %s; retry %d of %d in %.1fs", description, reason, attempt, self._attempts - 1, wait)
            self._sleep(wait)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _retry_after(self, response: requests.Response | None, *, default: float) -> float:
        """The wait a 429/503 asks for (RFC 9110: seconds, or an HTTP date), at most the maximum."""
        header = (response.headers.get("Retry-After") if response is not None else None) or ""
        header = header.strip()
        if not header:
            return default
        if header.isdigit():
            asked = float(header)
        else:
            try:
                moment = parsedate_to_datetime(header)
            except (TypeError, ValueError):
                logger.info("Ignoring a Retry-After that is neither seconds nor an HTTP date: %r", header[:60])
                return default
            asked = max(0.0, moment.timestamp() - self._wall_clock())
        if asked > self._max_retry_after_seconds:
            logger.warning(
                "Airbyte asks to retry after %.0fs; waiting the maximum of %.0fs", asked, self._max_retry_after_seconds
            )
        return min(asked, self._max_retry_after_seconds)

    def _not_the_api(self, description: str) -> AirbyteNotTheApi:
        return AirbyteNotTheApi(
            f"ELT_AIRBYTE_URL={_without_userinfo(self.configured_url)} is not the Airbyte API ({description} answered HTML); "
            "set it to the Airbyte web address, e.g. http://host.docker.internal:8000"
        )

    def _unreadable(self, description: str, exc: Exception) -> AirbyteBadResponse:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        return AirbyteBadResponse(
            f"{description}: Airbyte at {self.api_url} sent a response the client cannot read "
            f"({type(exc).__name__}{': ' + detail if detail else ''})"
        )

    def _rejected(self, description: str, exc: errors.SDKError) -> Exception:
        if _is_html(exc.raw_response) and exc.status_code < 500:
            return self._not_the_api(description)
        if exc.status_code < 300:
            content_type = exc.raw_response.headers.get("Content-Type") if exc.raw_response is not None else None
            return AirbyteBadResponse(
                f"{description}: Airbyte at {self.api_url} answered {exc.status_code} with "
                f"Content-Type {content_type or '(none)'}, not JSON"
            )
        if exc.status_code in (401, 403):
            return AirbyteAuthFailed(
                f"{description}: Airbyte refused the credentials ({exc.status_code} {_problem(exc)}); "
                "check ELT_AIRBYTE_CLIENT_ID and ELT_AIRBYTE_CLIENT_SECRET (`abctl local credentials`)"
            )
        return AirbyteRequestRejected(f"{description}: Airbyte answered {exc.status_code}: {_problem(exc)}")


class _HtmlAnswer(Exception):
    pass


class _HtmlIsNotTheApi(AfterSuccessHook):
    """A 2xx with a web page: airbyte-api passes it for endpoints without a body (GET /health)."""

    def after_success(self, hook_ctx: AfterSuccessContext, response: requests.Response) -> requests.Response:
        if _is_html(response):
            raise _HtmlAnswer()
        return response


def _without_userinfo(url: str) -> str:
    """The URL without any `user:password@` written into it: messages never carry a secret."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=f"***@{netloc}"))


def _is_html(response: requests.Response | None) -> bool:
    if response is None:
        return False
    content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    return content_type in ("text/html", "application/xhtml+xml")


class _ConnectionStatusAsSent(AfterSuccessHook):
    """Keeps each listed connection's status and statusReason as the server sent them.

    airbyte-api 0.53 refuses to parse a connection status newer than its enum (the whole page
    would fail) and drops fields it does not know: the hook records both, then hands the SDK a
    status it can parse.
    """

    _known = frozenset(status.value for status in models.ConnectionStatusEnum)

    def __init__(self) -> None:
        self._sent: dict[str, tuple[str, str | None]] = {}
        self._lock = threading.Lock()

    def after_success(self, hook_ctx: AfterSuccessContext, response: requests.Response) -> requests.Response:
        if hook_ctx.operation_id not in ("listConnections", "getConnection"):
            return response
        body, items = _body_and_items(response)
        if body is None:
            return response
        changed = False
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("connectionId"), str):
                continue
            status, reason = item.get("status"), item.get("statusReason")
            with self._lock:
                self._sent[item["connectionId"]] = (str(status), reason if isinstance(reason, str) else None)
            if status not in self._known:
                item["status"] = models.ConnectionStatusEnum.INACTIVE.value
                changed = True
        if changed:
            response._content = json.dumps(body).encode()  # requests keeps the parsed body here
        return response

    def as_sent(self, item: models.ConnectionResponse) -> tuple[str, str | None]:
        with self._lock:
            sent = self._sent.get(item.connection_id)
        return sent or (getattr(item.status, "value", str(item.status)), None)


def _body_and_items(response: requests.Response) -> tuple[Any, list[Any]]:
    """The parsed body (None when it is not JSON) and its items: `data` of a list page, else the body."""
    try:
        body = response.json()
    except ValueError:
        return None, []
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return body, body["data"]
    return body, [body]


class _UnknownJobStatusIsRunning(AfterSuccessHook):
    """airbyte-api 0.53 (the release PyAirbyte allows) fails to parse job statuses newer than its
    enum, such as 'queued'. An unknown status means the job has not finished: read it as running."""

    _known = frozenset(status.value for status in models.JobStatusEnum)

    def after_success(self, hook_ctx: AfterSuccessContext, response: requests.Response) -> requests.Response:
        if hook_ctx.operation_id not in ("createJob", "getJob", "listJobs", "cancelJob"):
            return response
        body, jobs = _body_and_items(response)
        if body is None:
            return response
        unknown = [job for job in jobs if isinstance(job, dict) and job.get("status") not in self._known]
        for job in unknown:
            logger.info("Job %s reports status '%s'; treating it as running", job.get("jobId"), job.get("status"))
            job["status"] = models.JobStatusEnum.RUNNING.value
        if unknown:
            response._content = json.dumps(body).encode()  # requests keeps the parsed body here
        return response


class _Conflict(Exception):
    pass


class _TimeoutSession(requests.Session):
    def __init__(self, timeout_seconds: float) -> None:
        super().__init__()
        self._timeout_seconds = timeout_seconds

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = kwargs.get("timeout") or self._timeout_seconds
        return super().send(request, **kwargs)


def _job(response: models.JobResponse) -> Job:
    return Job(
        id=int(response.job_id),
        connection_id=response.connection_id,
        status=getattr(response.status, "value", str(response.status)),
        rows=response.rows_synced,
        bytes_synced=response.bytes_synced,
    )


def _problem(exc: errors.SDKError) -> str:
    """Airbyte's problem detail (title and detail), or the start of the body."""
    try:
        body = json.loads(exc.body)
    except (TypeError, ValueError):
        return (exc.body or "").strip()[:200] or "no body"
    if not isinstance(body, dict):
        return str(body)[:200]
    parts = [str(body[key]) for key in ("title", "detail") if body.get(key)]
    return ": ".join(parts) or str(body)[:200]


class ServerBackend:
    """Runs each connection's sync on an Airbyte server until it ends."""

    def __init__(
        self,
        settings: Settings,
        client: AirbyteClient | None = None,
        tag: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
    ) -> None:
        """`clock` and `wait` (an `Event.wait` that returns True once the event is set) let tests
        run polls and timeouts on a fake clock."""
        self.settings = settings
        self._clock = clock
        self._wait = wait
        self.client = client or AirbyteClient.from_settings(settings)
        self.tag = tag or settings.airbyte_connection_tag
        self._connections: dict[str, Connection] | None = None
        self._started: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def ui_url(self) -> str:
        return self.client.api_url.removesuffix("/api/public/v1")

    def connections(self) -> dict[str, Connection]:
        if self._connections is None:
            # Every connection Airbyte lists (it leaves deleted ones out), whatever its status: one
            # that is inactive (Airbyte also disables failing connections by itself) or locked
            # fails its sync below, so dbt never rebuilds its models on data that stopped coming.
            listed = self.client.list_connections(self.settings.airbyte_workspace_id)
            if self.tag:
                listed = [connection for connection in listed if self.tag in connection.tags]
            self._connections = {connection.name: connection for connection in listed}
        return self._connections

    def connection_names(self) -> list[str]:
        return list(self.connections())

    def not_runnable(self) -> dict[str, str]:
        """Connections a run would report as failed without syncing, each with the reason."""
        return {
            name: because
            for name, connection in self.connections().items()
            if (because := connection.not_runnable_because()) is not None
        }

    def connection_url(self, connection: Connection) -> str:
        return f"{self.ui_url}/workspaces/{connection.workspace_id}/connections/{connection.id}"

    def job_url(self, connection: Connection, job_id: int) -> str:
        return f"{self.ui_url}/workspaces/{connection.workspace_id}/connections/{connection.id}/job-history#{job_id}::0"

    def sync(self, connection: str, *, full_refresh: bool) -> SyncResult:
        target = self.connections()[connection]
        because = target.not_runnable_because()
        if because is not None:
            raise AirbyteConnectionNotRunnable(
                f"connection '{connection}' was not synced: Airbyte {because}; enable or fix it in the "
                f"Airbyte UI ({self.connection_url(target)}), or leave it out of the run "
                "(elt run -c, or ELT_AIRBYTE_CONNECTION_TAG)"
            )
        started = self._clock()
        if full_refresh:
            self._run_job(target, "clear", started)
        job = self._run_job(target, "sync", started)
        return SyncResult(
            connection=connection,
            rows=job.rows or 0,
            seconds=self._clock() - started,
            bytes_synced=job.bytes_synced,
            job_id=str(job.id),
            job_url=self.job_url(target, job.id),
        )

    def _run_job(self, connection: Connection, job_type: str, started: float) -> Job:
        job, is_new = self.client.start_job(connection.id, job_type)
        if is_new:
            with self._lock:
                self._started[job.id] = connection.name
        logger.info("%s: %s job %s %s", connection.name, job_type, job.id, "started" if is_new else "attached")
        try:
            while not job.finished:
                if self._wait(self._stopping, self.settings.airbyte_poll_seconds):
                    raise AirbyteJobFailed(f"connection '{connection.name}': stopped while job {job.id} ran")
                if self._clock() - started > self.settings.airbyte_sync_timeout_seconds:
                    self.client.cancel_job(job.id)
                    raise AirbyteJobTimedOut(
                        f"connection '{connection.name}': {job_type} job {job.id} ran over "
                        f"ELT_AIRBYTE_SYNC_TIMEOUT_SECONDS={self.settings.airbyte_sync_timeout_seconds:g} and was cancelled "
                        f"({self.job_url(connection, job.id)})"
                    )
                previous, job = job.status, self.client.get_job(job.id)
                if job.status == "incomplete" and previous != "incomplete":
                    logger.info(
                        "%s: %s job %s incomplete (an attempt failed; Airbyte retries it)", connection.name, job_type, job.id
                    )
        finally:
            with self._lock:
                self._started.pop(job.id, None)
        if job.status != "succeeded":
            raise AirbyteJobFailed(
                f"connection '{connection.name}': {job_type} job {job.id} ended {job.status} ({self.job_url(connection, job.id)})"
            )
        return job

    def cancel_started_jobs(self) -> None:
        with self._lock:
            started = dict(self._started)
        self._stopping.set()
        for job_id, name in started.items():
            try:
                self.client.cancel_job(job_id)
                logger.warning("Cancelled Airbyte job %s of connection '%s'", job_id, name)
            except Exception as exc:  # noqa: BLE001 - best effort: the flow run is already going down
                logger.error("Could not cancel Airbyte job %s of connection '%s': %s", job_id, name, exc)
