"""A fake self-hosted Airbyte server that speaks, and polices, Airbyte's public API contract.

`FakeAirbyte` runs a real HTTP server on 127.0.0.1 (ephemeral port) serving the public API under
`/api/public/v1`, as self-hosted Airbyte does. It is meant for testing the appliance's Airbyte
client against the pinned contract in `SPEC_DIR` (see its README.md):

- `public-api-v2.0.0.yaml` (OpenAPI 3.1): every request received is checked against it (path and
  method exist, path/query parameters' types, enums, minimum/maximum, unknown query parameters,
  JSON/form request bodies against the operation's requestBody schema) and every response sent is
  checked against the schema declared for its status code. Error responses whose status the
  operation does not declare with a body (401, 409, 429, 5xx...) are checked against the problem
  schemas of `api-problems-v2.0.0.yaml`: always `BaseProblemFields`, plus the named problem whose
  constant `type`/`title` the body carries, plus `status` equal to the HTTP status.
  Every finding goes to `fake.violations`; a bad request is answered 400 (BadRequestProblem).
  Formats: `uuid` (lowercase, a JSON Schema format) and OpenAPI's `int32`/`int64` ranges are
  checked; `format: UUID` (upper case), `date-time`, `url`, `set` are annotations only.

Faithful, from the spec and from airbyte-platform's public API code:
- Token exchange `POST /applications/token` (JSON or form body with client_id, client_secret,
  `grant-type`): `{"access_token", "token_type": "Bearer", "expires_in"}` (180 s like the real
  server). Wrong credentials -> 400 (the spec declares only 400/403 for this operation; the real
  simple-auth server throws BadRequestException). Endpoints whose spec operation says
  `security: []` (/health, /applications/token, /) need no token; all others need
  `Authorization: Bearer <token>` -> 401 InvalidApiKeyProblem otherwise.
- The spec's `ApplicationTokenRequestWithGrant` requires `grant_type` but names the property
  `grant-type`; the fake requires `grant-type` (the body the server documents and accepts).
- Problem bodies are sent as `application/json` (the real AbstractThrowableProblemHandler does so).
- Pagination like the real PaginationMapper: `next`/`previous` are full URLs, or "" (empty string,
  not absent) when there is none. By default `next` is given for every non-empty page, so a
  client following `next` ends with one empty page (newest server behaviour; set
  `next_on_every_page=False` for "only when more items exist"). `next` for /connections carries
  only includeDeleted and workspaceIds (comma-joined): tagIds are dropped, as on the real server.
  `next` for /jobs carries jobType and connectionId (or workspaceIds), not status/orderBy.
- Jobs: `startTime`/`lastUpdatedAt` are Java `OffsetDateTime.toString()` in UTC (seconds omitted
  when zero, e.g. `2024-01-01T10:00Z`); `lastUpdatedAt` only for terminal jobs; `duration`
  (Java `Duration.toString()`, e.g. `PT0S`, `PT1M5S`) for every non-pending job.
  A connection added with `failed_attempts=n` has jobs whose first n attempts fail: after each,
  the job reports `incomplete` (not terminal: Airbyte's JobStatus has failed, succeeded and
  cancelled as its only terminal statuses) and then `running` again for the next attempt.
  POST /jobs: unknown connection -> 404 ResourceNotFoundProblem; a job already pending/running for
  the connection -> 409 TryAgainLaterConflictProblem; jobType `refresh` -> 422
  UnprocessableEntityProblem ("Refreshes are not supported in the public API").
  GET /jobs orders by createdAt ASC unless `orderBy=<createdAt|updatedAt>|<ASC|DESC>`; a bad
  orderBy -> 400.
- A path unknown to the server answers 200 with the web UI's HTML (README quirk). Under
  /api/public/v1 that is also recorded as a violation (the client called a non-existent endpoint).

Not simulated: sources, destinations, workspaces, tags CRUD, streams, and every other operation
(a call to one is recorded as a violation and answered 501); created/updated date filters on
GET /jobs are accepted but ignored; attempt details, logs, schedules; permissions/roles (403);
the real server's exact 401 body (micronaut security may send none); rate limiting other than
via `fail_next(status=429, retry_after=...)`.

Time: jobs and token expiry follow `clock` (the `time` module by default). Tests that must not
race real time pass a `tests.fakes.clock.FakeClock` and share it with the code under test.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import re
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit

import yaml
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_DIR = Path(__file__).resolve().parent / "airbyte_spec"
PUBLIC_SPEC_FILE = "public-api-v2.0.0.yaml"
PROBLEMS_SPEC_FILE = "api-problems-v2.0.0.yaml"
API_PREFIX = "/api/public/v1"

PUBLIC_URI = "urn:airbyte:public-api"
PROBLEMS_URI = "urn:airbyte:api-problems"

JSON = "application/json"
HTML = "text/html; charset=utf-8"
PROBLEM_CONTENT_TYPES = frozenset({"application/json", "application/problem+json"})

DEFAULT_WORKSPACE_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "fake-airbyte/workspace/default"))
JOB_STATUSES = ("pending", "running", "incomplete", "failed", "succeeded", "cancelled")
TERMINAL_STATUSES = frozenset({"failed", "succeeded", "cancelled"})
OUTCOMES = frozenset({"succeeded", "failed", "cancelled", "never"})

UI_HTML = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Airbyte</title></head>'
    '<body><div id="root"></div><script src="/assets/index.js"></script></body></html>'
)
GENERIC_PROBLEM_TYPE = "https://reference.airbyte.com/reference/errors"
_PROBLEM_FOR_STATUS = {
    400: "BadRequestProblemResponse",
    401: "InvalidApiKeyProblemResponse",
    403: "ForbiddenProblemResponse",
    404: "ResourceNotFoundProblemResponse",
    408: "RequestTimeoutExceededProblemResponse",
    409: "TryAgainLaterConflictProblemResponse",
    422: "UnprocessableEntityProblemResponse",
    500: "UnexpectedProblemResponse",
    503: "ServiceUnavailableProblemResponse",
}
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_TAG_COLORS = ("FBECB1", "FEC9BA", "DDF6F8", "D6EBE3", "E9DDFA", "C4D2F9")
_MAX_MESSAGE = 400


# --------------------------------------------------------------------------- spec loading


@functools.lru_cache(maxsize=1)
def _read_specs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The two pristine spec documents (callers must copy before changing them)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    public = yaml.load((SPEC_DIR / PUBLIC_SPEC_FILE).read_text(), Loader=loader)
    problems = yaml.load((SPEC_DIR / PROBLEMS_SPEC_FILE).read_text(), Loader=loader)
    return public, problems


def _unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def _escape(segment: str | int) -> str:
    return str(segment).replace("~", "~0").replace("/", "~1")


def _pointer_uri(base: str, *segments: str | int) -> str:
    pointer = "/" + "/".join(_escape(segment) for segment in segments)
    return f"{base}#{quote(pointer, safe='/~')}"


def _pointer_exists(doc: Any, pointer: str) -> bool:
    node = doc
    for raw in pointer.lstrip("/").split("/"):
        segment = _unescape(raw)
        if isinstance(node, dict) and segment in node:
            node = node[segment]
        elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
            node = node[int(segment)]
        else:
            return False
    return True


def find_dangling_refs(doc: Mapping[str, Any]) -> dict[str, list[tuple[str | int, ...]]]:
    """Local `$ref`s that point nowhere, each with the locations that use it."""
    found: dict[str, list[tuple[str | int, ...]]] = {}

    def walk(node: Any, where: tuple[str | int, ...]) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and not _pointer_exists(doc, ref[1:]):
                found.setdefault(ref, []).append(where)
            for key, value in node.items():
                walk(value, (*where, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*where, index))

    walk(doc, ())
    return found


def _drop_paths_using(doc: dict[str, Any], dangling: Mapping[str, list[tuple[str | int, ...]]]) -> list[str]:
    dropped: set[str] = set()
    for ref, locations in dangling.items():
        for where in locations:
            if len(where) < 2 or where[0] != "paths":
                raise ValueError(f"dangling {ref} outside /paths at {where}: cannot drop it")
            dropped.add(str(where[1]))
    for template in dropped:
        doc["paths"].pop(template, None)
    return sorted(dropped)


def _patch_token_request(doc: dict[str, Any]) -> None:
    """Require `grant-type` (the property the schema defines), not the undefined `grant_type`."""
    schema = doc["components"]["schemas"]["ApplicationTokenRequestWithGrant"]
    schema["required"] = ["grant-type" if name == "grant_type" else name for name in schema["required"]]


def _problem_catalogue(problems: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Problem schema name -> the `default`s of status/type/title/detail (constants per problem type)."""
    catalogue: dict[str, dict[str, Any]] = {}
    for name, schema in problems["components"]["schemas"].items():
        if "x-implements" not in schema:
            continue
        defaults: dict[str, Any] = {}
        for part in schema.get("allOf", []):
            for prop, prop_schema in part.get("properties", {}).items():
                if "default" in prop_schema:
                    defaults[prop] = prop_schema["default"]
        catalogue[name] = defaults
    return catalogue


def _format_checker() -> FormatChecker:
    checker = FormatChecker(formats=["uuid"])

    @checker.checks("int32")
    def _int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    return checker


def _registry(public: dict[str, Any], problems: dict[str, Any]) -> Registry:
    return Registry().with_resources(
        [
            (PUBLIC_URI, Resource.from_contents(public, default_specification=DRAFT202012)),
            (PROBLEMS_URI, Resource.from_contents(problems, default_specification=DRAFT202012)),
        ]
    )


# --------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class Parameter:
    name: str
    location: str
    required: bool
    schema: dict[str, Any]
    schema_uri: str


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    spec: dict[str, Any]
    parameters: tuple[Parameter, ...]

    @property
    def operation_id(self) -> str:
        return str(self.spec.get("operationId", f"{self.method} {self.template}"))

    @property
    def anonymous(self) -> bool:
        return self.spec.get("security") == []


@dataclass
class ParsedRequest:
    """A request after contract checking: coerced parameters (with spec defaults) and body."""

    path: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    body: Any = None
    errors: list[str] = field(default_factory=list)


class _CoercionError(ValueError):
    pass


@dataclass(frozen=True)
class _PathItem:
    template: str
    pattern: re.Pattern[str]
    operations: dict[str, Operation]


class ApiContract:
    """The pinned public API + problems specs, as validators for requests, responses and problems."""

    def __init__(self, *, extra_job_statuses: Iterable[str] = (), extra_connection_statuses: Iterable[str] = ()) -> None:
        pristine_public, pristine_problems = _read_specs()
        public = copy.deepcopy(pristine_public)
        self.dangling_refs = find_dangling_refs(public)
        self.dropped_paths = _drop_paths_using(public, self.dangling_refs)
        _patch_token_request(public)
        problems = copy.deepcopy(pristine_problems)
        if find_dangling_refs(problems):
            raise ValueError(f"dangling refs in {PROBLEMS_SPEC_FILE}: {find_dangling_refs(problems)}")
        self.extra_job_statuses = tuple(extra_job_statuses)
        for_responses = copy.deepcopy(public)
        for_responses["components"]["schemas"]["JobStatusEnum"]["enum"].extend(self.extra_job_statuses)
        self.extra_connection_statuses = tuple(extra_connection_statuses)
        for_responses["components"]["schemas"]["ConnectionStatusEnum"]["enum"].extend(self.extra_connection_statuses)
        self.connection_statuses = tuple(public["components"]["schemas"]["ConnectionStatusEnum"]["enum"])
        self._public = public
        self._registries = {
            "request": _registry(public, problems),
            "response": _registry(for_responses, problems),
        }
        self._format_checker = _format_checker()
        self._validators: dict[tuple[str, str], Draft202012Validator] = {}
        self._validators_lock = threading.Lock()
        self.problems = _problem_catalogue(problems)
        self._problem_by_identity = {
            (defaults.get("type"), defaults.get("title")): name for name, defaults in self.problems.items()
        }
        self._path_items = self._build_path_items(public)

    # ------------------------------------------------------------------ operations

    def _build_path_items(self, public: dict[str, Any]) -> list[_PathItem]:
        items = []
        for template, item in public["paths"].items():
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            operations = {
                method.upper(): Operation(method.upper(), template, item[method], self._parameters(template, item, method))
                for method in _HTTP_METHODS
                if method in item
            }
            items.append(_PathItem(template, re.compile(f"^{regex}$"), operations))
        # Literal paths win over templated ones (/applications/token vs /applications/{applicationId}).
        return sorted(items, key=lambda path_item: path_item.template.count("{"))

    def _parameters(self, template: str, item: dict[str, Any], method: str) -> tuple[Parameter, ...]:
        merged: dict[tuple[str, str], Parameter] = {}
        for owner in (("paths", template), ("paths", template, method)):
            node = item if len(owner) == 2 else item[method]
            for index, param in enumerate(node.get("parameters", [])):
                merged[(param["name"], param["in"])] = Parameter(
                    name=param["name"],
                    location=param["in"],
                    required=bool(param.get("required", param["in"] == "path")),
                    schema=param.get("schema", {}),
                    schema_uri=_pointer_uri(PUBLIC_URI, *owner, "parameters", index, "schema"),
                )
        return tuple(merged.values())

    def match(self, method: str, path: str) -> tuple[str | None, Operation | None, dict[str, str]]:
        """(path template or None, operation or None if the method is not defined, path values)."""
        first: tuple[str, dict[str, str]] | None = None
        for path_item in self._path_items:
            found = path_item.pattern.match(path)
            if not found:
                continue
            if method in path_item.operations:
                return path_item.template, path_item.operations[method], _unquote_all(found.groupdict())
            first = first or (path_item.template, _unquote_all(found.groupdict()))
        if first is None:
            return None, None, {}
        return first[0], None, first[1]

    def operations(self) -> Iterator[Operation]:
        for path_item in self._path_items:
            yield from path_item.operations.values()

    # ------------------------------------------------------------------ validation primitives

    def _validator(self, side: str, uri: str) -> Draft202012Validator:
        key = (side, uri)
        with self._validators_lock:
            if key not in self._validators:
                self._validators[key] = Draft202012Validator(
                    {"$ref": uri}, registry=self._registries[side], format_checker=self._format_checker
                )
            return self._validators[key]

    def validate(self, side: str, uri: str, instance: Any, what: str) -> list[str]:
        errors = sorted(self._validator(side, uri).iter_errors(instance), key=lambda error: error.json_path)
        messages = []
        for error in errors:
            where = "" if error.json_path == "$" else f" at {error.json_path}"
            messages.append(f"{what}{where}: {error.message[:_MAX_MESSAGE]}")
        return messages

    def _deref(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema and str(schema["$ref"]).startswith("#/"):
            node: Any = self._public
            for segment in str(schema["$ref"])[2:].split("/"):
                node = node[_unescape(segment)]
            schema = node
        return schema

    # ------------------------------------------------------------------ requests

    def check_request(
        self,
        operation: Operation,
        path_values: Mapping[str, str],
        query: Mapping[str, list[str]],
        content_type: str | None,
        raw_body: bytes,
    ) -> ParsedRequest:
        parsed = ParsedRequest()
        known_query = set()
        for param in operation.parameters:
            if param.location == "query":
                known_query.add(param.name)
                raw = query.get(param.name)
                target = parsed.query
            elif param.location == "path":
                raw = [path_values[param.name]] if param.name in path_values else None
                target = parsed.path
            else:  # headers and cookies are not checked
                continue
            self._check_parameter(param, raw, target, parsed.errors)
        for name in sorted(set(query) - known_query):
            parsed.errors.append(f"query parameter {name!r} is not defined for {operation.operation_id}")
        parsed.body = self._check_body(operation, content_type, raw_body, parsed.errors)
        return parsed

    def _check_parameter(self, param: Parameter, raw: list[str] | None, target: dict[str, Any], errors: list[str]) -> None:
        what = f"{param.location} parameter {param.name!r}"
        if raw is None:
            if param.required:
                errors.append(f"{what} is required")
            elif "default" in self._deref(param.schema):
                target[param.name] = self._deref(param.schema)["default"]
            return
        try:
            value = self._coerce(param.schema, raw)
        except _CoercionError as exc:
            errors.append(f"{what}: {exc}")
            return
        problems = self.validate("request", param.schema_uri, value, what)
        errors.extend(problems)
        if not problems:
            target[param.name] = value

    def _coerce(self, schema: dict[str, Any], raw: list[str]) -> Any:
        schema = self._deref(schema)
        if schema.get("type") == "array":
            item_type = self._deref(schema.get("items", {})).get("type")
            # Repeated (`a=1&a=2`, the OpenAPI form/explode default) and comma-joined values, the
            # form the real server itself writes into `next` links.
            values = [part for value in raw for part in value.split(",") if part != ""]
            return [_coerce_scalar(item_type, value) for value in values]
        if len(raw) > 1:
            raise _CoercionError(f"given {len(raw)} times but it is not an array")
        return _coerce_scalar(schema.get("type"), raw[0])

    def _check_body(self, operation: Operation, content_type: str | None, raw_body: bytes, errors: list[str]) -> Any:
        request_body = operation.spec.get("requestBody")
        if request_body is None:
            if raw_body.strip():
                errors.append(f"{operation.operation_id} takes no request body")
            return None
        if not raw_body.strip():
            if request_body.get("required"):
                errors.append("request body is required")
            return None
        media_type = (content_type or "").split(";")[0].strip().lower()
        content = request_body.get("content", {})
        if media_type not in content:
            errors.append(f"request Content-Type {media_type or '(none)'!r} is not one of {sorted(content)}")
            return None
        try:
            body = _decode_body(media_type, raw_body)
        except ValueError as exc:
            errors.append(f"request body is not valid {media_type}: {exc}")
            return None
        if "schema" in content[media_type]:
            uri = _pointer_uri(
                PUBLIC_URI, "paths", operation.template, operation.method.lower(), "requestBody", "content", media_type, "schema"
            )
            errors.extend(self.validate("request", uri, body, "request body"))
        return body

    # ------------------------------------------------------------------ responses and problems

    def check_response(self, operation: Operation, status: int, content_type: str | None, body: Any) -> list[str]:
        responses = operation.spec.get("responses", {})
        key = next((k for k in (str(status), f"{status // 100}XX", "default") if k in responses), None)
        media_type = (content_type or "").split(";")[0].strip().lower()
        declared = responses.get(key) if key else None
        if declared is None and status < 400:
            return [f"status {status} is not declared for {operation.operation_id}"]
        content = (declared or {}).get("content")
        if content:
            if media_type not in content:
                return [f"Content-Type {media_type or '(none)'!r} is not one of {sorted(content)}"]
            if "schema" not in content[media_type]:
                return []
            uri = _pointer_uri(
                PUBLIC_URI,
                "paths",
                operation.template,
                operation.method.lower(),
                "responses",
                key,
                "content",
                media_type,
                "schema",
            )
            return self.validate("response", uri, body, "response body")
        if status >= 400:
            if media_type not in PROBLEM_CONTENT_TYPES:
                return [f"problem Content-Type {media_type or '(none)'!r} is not one of {sorted(PROBLEM_CONTENT_TYPES)}"]
            return self.check_problem(status, body)
        return []

    def check_problem(self, status: int, body: Any) -> list[str]:
        """BaseProblemFields, then the named problem its type/title identify, and status == HTTP status."""
        errors = self.validate(
            "response", _pointer_uri(PROBLEMS_URI, "components", "schemas", "BaseProblemFields"), body, "problem body"
        )
        if errors:
            return errors
        name = self._problem_by_identity.get((body["type"], body["title"]))
        if name is not None:
            uri = _pointer_uri(PROBLEMS_URI, "components", "schemas", name)
            errors.extend(self.validate("response", uri, body, f"problem body ({name})"))
        if "status" in body and body["status"] != status:
            errors.append(f"problem body: status {body['status']!r} differs from the HTTP status {status}")
        return errors

    def problem(self, name: str, status: int, detail: str | None = None, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A body for the named problem of api-problems (its constant type and title)."""
        defaults = self.problems[name]
        body: dict[str, Any] = {
            "status": status,
            "type": defaults["type"],
            "title": defaults["title"],
            "detail": detail or defaults.get("detail", ""),
        }
        if data is not None:
            body["data"] = dict(data)
        return body


def _unquote_all(values: Mapping[str, str]) -> dict[str, str]:
    return {name: unquote(value) for name, value in values.items()}


def _coerce_scalar(kind: Any, value: str) -> Any:
    if kind == "integer":
        if not re.fullmatch(r"-?\d+", value):
            raise _CoercionError(f"{value!r} is not an integer")
        return int(value)
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            raise _CoercionError(f"{value!r} is not a number") from None
    if kind == "boolean":
        if value.lower() not in ("true", "false"):
            raise _CoercionError(f"{value!r} is not a boolean (true/false)")
        return value.lower() == "true"
    return value


def _decode_body(media_type: str, raw_body: bytes) -> Any:
    text = raw_body.decode("utf-8")
    if media_type == "application/x-www-form-urlencoded":
        return dict(parse_qsl(text, keep_blank_values=True, strict_parsing=True))
    return json.loads(text)


@functools.lru_cache(maxsize=8)
def load_contract(
    extra_job_statuses: frozenset[str] = frozenset(), extra_connection_statuses: frozenset[str] = frozenset()
) -> ApiContract:
    """The contract, built once per set of tolerated extra JobStatusEnum/ConnectionStatusEnum values."""
    return ApiContract(extra_job_statuses=sorted(extra_job_statuses), extra_connection_statuses=sorted(extra_connection_statuses))


# --------------------------------------------------------------------------- Java-style formatting


def java_offset_datetime(epoch_seconds: float) -> str:
    """`OffsetDateTime.ofInstant(Instant.ofEpochSecond(s), UTC).toString()`: seconds omitted when 0."""
    moment = datetime.fromtimestamp(int(epoch_seconds), tz=UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M") if moment.second == 0 else moment.strftime("%Y-%m-%dT%H:%M:%S")
    return text + "Z"


def java_duration(seconds: float) -> str:
    """`Duration.ofSeconds(n).toString()`: PT0S, PT10S, PT1M5S, PT8H6M12S."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if total == 0:
        return "PT0S"
    return "PT" + (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{secs}S" if secs else "")


def tag_id(name: str) -> str:
    """The stable tagId the fake gives the tag called `name`."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"fake-airbyte/tag/{name}"))


def _tag_color(name: str) -> str:
    return _TAG_COLORS[hashlib.sha256(name.encode()).digest()[0] % len(_TAG_COLORS)]


# --------------------------------------------------------------------------- state


@dataclass
class _Connection:
    connection_id: str
    name: str
    workspace_id: str
    status: str
    tags: tuple[str, ...]
    sync_seconds: float
    outcome: str
    rows: int
    bytes_: int
    created_at: int
    failed_attempts: int = 0
    retry_seconds: float = 0.0
    status_reason: str | None = None
    source_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    destination_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def to_json(self) -> dict[str, Any]:
        extension = {"statusReason": self.status_reason} if self.status_reason is not None else {}
        return extension | {
            "connectionId": self.connection_id,
            "name": self.name,
            "sourceId": self.source_id,
            "destinationId": self.destination_id,
            "workspaceId": self.workspace_id,
            "status": self.status,
            "schedule": {"scheduleType": "manual"},
            "nonBreakingSchemaUpdatesBehavior": "ignore",
            "namespaceDefinition": "destination",
            "configurations": {"streams": [{"name": "records", "syncMode": "full_refresh_overwrite"}]},
            "createdAt": self.created_at,
            "tags": [
                {"tagId": tag_id(tag), "workspaceId": self.workspace_id, "name": tag, "color": _tag_color(tag)}
                for tag in self.tags
            ],
        }


@dataclass
class _Job:
    job_id: int
    connection_id: str
    workspace_id: str
    job_type: str
    outcome: str
    run_seconds: float
    pending_seconds: float
    rows: int
    bytes_: int
    created_mono: float
    created_wall: float
    failed_attempts: int = 0
    retry_seconds: float = 0.0
    cancelled_mono: float | None = None

    def state(self, now: float) -> str:
        """pending, then per failed attempt running -> incomplete, then running -> the outcome."""
        if self.cancelled_mono is not None:
            return "cancelled"
        elapsed = now - self.created_mono
        if elapsed < self.pending_seconds:
            return "pending"
        attempt_ends = max(self.run_seconds, self.pending_seconds)
        for _ in range(self.failed_attempts):
            if elapsed < attempt_ends:
                return "running"
            if elapsed < attempt_ends + self.retry_seconds:
                return "incomplete"  # the attempt failed; Airbyte starts the next one
            attempt_ends += self.retry_seconds + self.run_seconds
        if self.outcome == "never" or elapsed < attempt_ends:
            return "running"
        return self.outcome

    def ends_after(self) -> float:
        """Seconds from creation to the terminal status (unless cancelled or never ending)."""
        first = max(self.run_seconds, self.pending_seconds)
        return first + self.failed_attempts * (self.retry_seconds + self.run_seconds)

    def updated_mono(self, now: float) -> float:
        if self.cancelled_mono is not None:
            return self.cancelled_mono
        if self.state(now) in TERMINAL_STATUSES:
            return self.created_mono + self.ends_after()
        return now

    def wall(self, mono: float) -> float:
        return self.created_wall + (mono - self.created_mono)


@dataclass
class _Fault:
    remaining: int
    status: int
    method: str | None
    path_prefix: str | None
    retry_after: float | datetime | None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path_prefix is None or path.startswith(self.path_prefix))


@dataclass
class _Corruption:
    mutator: Callable[[Any], object]
    method: str | None
    path_prefix: str | None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path_prefix is None or path.startswith(self.path_prefix))


@dataclass
class _Reply:
    status: int
    body: Any = None
    content_type: str | None = JSON
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if self.content_type is None:
            return b""
        if self.content_type.startswith("text/"):
            return str(self.body).encode()
        return json.dumps(self.body).encode()


Route = Callable[[ParsedRequest], _Reply]


class Clock(Protocol):
    """Where the fake reads time: the `time` module, or a test's `tests.fakes.clock.FakeClock`."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


# --------------------------------------------------------------------------- the fake server


class FakeAirbyte:
    """A contract-checking fake of self-hosted Airbyte's public API (see the module docstring)."""

    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",
        auth: bool = True,
        token_ttl_seconds: float = 180,
        report_unknown_status: str | None = None,
        pending_seconds: float = 0.05,
        next_on_every_page: bool = True,
        workspace_id: str = DEFAULT_WORKSPACE_ID,
        clock: Clock = time,
        extra_connection_statuses: Iterable[str] = (),
    ) -> None:
        """`extra_connection_statuses`: connection statuses outside the v2.0.0 spec (e.g. `locked`,
        as newer servers may report) that responses may carry without a violation."""
        if report_unknown_status is not None and report_unknown_status in JOB_STATUSES:
            raise ValueError(f"{report_unknown_status!r} is already in JobStatusEnum")
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth = auth
        self.token_ttl_seconds = token_ttl_seconds
        self.report_unknown_status = report_unknown_status
        self.pending_seconds = pending_seconds
        self.next_on_every_page = next_on_every_page
        self.workspace_id = workspace_id
        self._clock = clock
        extra = frozenset({report_unknown_status}) if report_unknown_status else frozenset()
        self.contract = load_contract(extra, frozenset(extra_connection_statuses))
        self.violations: list[str] = []
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._connections: dict[str, _Connection] = {}
        self._jobs: dict[int, _Job] = {}
        self._job_ids = itertools.count(1)
        self._tokens: dict[str, float] = {}
        self._faults: list[_Fault] = []
        self._corruptions: list[_Corruption] = []
        self._delay_seconds = 0.0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[tuple[str, str], Route] = {
            ("GET", "/"): self._ui_page,
            ("GET", "/health"): self._health,
            ("POST", "/applications/token"): self._create_token,
            ("GET", "/connections"): self._list_connections,
            ("GET", "/connections/{connectionId}"): self._get_connection,
            ("POST", "/jobs"): self._create_job,
            ("GET", "/jobs"): self._list_jobs,
            ("GET", "/jobs/{jobId}"): self._get_job,
            ("DELETE", "/jobs/{jobId}"): self._cancel_job,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeAirbyte:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-airbyte", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeAirbyte:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeAirbyte is not started")
        return int(self._server.server_address[1])

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.ui_url}{API_PREFIX}"

    # ------------------------------------------------------------------ scenario set-up

    def add_connection(
        self,
        name: str,
        *,
        tags: Iterable[str] = (),
        status: str = "active",
        sync_seconds: float = 0.5,
        outcome: str = "succeeded",
        rows: int = 1000,
        bytes_: int = 50_000,
        workspace_id: str | None = None,
        failed_attempts: int = 0,
        retry_seconds: float = 0.5,
        status_reason: str | None = None,
    ) -> str:
        """Add a connection; its jobs end in `outcome` after `sync_seconds` ("never": run until cancelled).

        `failed_attempts`: that many attempts of each job fail first; after each the job reports
        `incomplete` for `retry_seconds`, then runs its next attempt (`sync_seconds` again).
        `status_reason`: sent as `statusReason`. The v2.0.0 ConnectionResponse does not define it
        (it allows additional properties); it stands for what a newer server may say about a
        connection, such as a pending breaking schema change.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        known = (*self.contract.connection_statuses, *self.contract.extra_connection_statuses)
        if status not in known:
            raise ValueError(f"status must be one of {list(known)} (extra_connection_statuses adds more), not {status!r}")
        connection = _Connection(
            connection_id=str(uuid.uuid4()),
            name=name,
            workspace_id=workspace_id or self.workspace_id,
            status=status,
            tags=tuple(tags),
            sync_seconds=sync_seconds,
            outcome=outcome,
            rows=rows,
            bytes_=bytes_,
            created_at=int(self._clock.time()),
            failed_attempts=failed_attempts,
            retry_seconds=retry_seconds,
            status_reason=status_reason,
        )
        with self._lock:
            self._connections[connection.connection_id] = connection
        return connection.connection_id

    tag_id = staticmethod(tag_id)

    def start_running_job(self, connection_id: str) -> int:
        """Create a sync job that is already running (no pending phase): the next POST /jobs gets 409."""
        with self._lock:
            connection = self._connection(connection_id)
            if connection is None:
                raise KeyError(f"no connection {connection_id}")
            return self._new_job(connection, "sync", pending_seconds=0.0).job_id

    def jobs_for(self, connection_id: str) -> list[dict[str, Any]]:
        """JobResponse bodies of the connection's jobs, oldest first."""
        now = self._clock.monotonic()
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.connection_id == connection_id]
            return [self._job_json(job, now) for job in jobs]

    def expire_all_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    # ------------------------------------------------------------------ faults and hooks

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        method: str | None = None,
        path_prefix: str | None = None,
        retry_after: float | datetime | None = None,
    ) -> None:
        """The next `count` requests matching method/path_prefix (path without /api/public/v1) get `status`.

        `retry_after`: send a `Retry-After` header, in seconds (a number) or as an HTTP date (a datetime).
        """
        with self._lock:
            self._faults.append(_Fault(count, status, method.upper() if method else None, path_prefix, retry_after))

    def delay_responses(self, seconds: float) -> None:
        """Hold every following response for `seconds` (0 to stop)."""
        with self._lock:
            self._delay_seconds = seconds

    def corrupt_next_response(
        self, mutator: Callable[[Any], object], *, method: str | None = None, path_prefix: str | None = None
    ) -> None:
        """Test hook: `mutator` edits in place (its return value is ignored) the next matching JSON body."""
        with self._lock:
            self._corruptions.append(_Corruption(mutator, method.upper() if method else None, path_prefix))

    # ------------------------------------------------------------------ inspection

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        with self._lock:
            return sum(
                1
                for recorded_method, path, _ in self.requests
                if (method is None or recorded_method == method.upper()) and path.startswith(path_prefix)
            )

    def assert_no_violations(self) -> None:
        with self._lock:
            found = list(self.violations)
        if found:
            listing = "\n".join(f"  - {violation}" for violation in found)
            raise AssertionError(f"{len(found)} Airbyte API contract violation(s):\n{listing}")

    def clear_violations(self) -> list[str]:
        with self._lock:
            found = list(self.violations)
            self.violations.clear()
        return found

    # ------------------------------------------------------------------ request pipeline

    def _handle(self, handler: _Handler) -> None:
        method = handler.command
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw_body = handler.rfile.read(length) if length else b""
        recorded_path = split.path
        try:
            recorded_path, operation, reply = self._respond(method, split.path, split.query, handler, raw_body)
            self._check_reply(method, recorded_path, operation, reply)
        except Exception:  # noqa: BLE001 - a bug in the fake must fail the test, not hang it
            self._violation("fake crashed on", method, recorded_path, traceback.format_exc())
            reply = _Reply(500, self.contract.problem("UnexpectedProblemResponse", 500))
        with self._lock:
            delay = self._delay_seconds
            self.requests.append((method, recorded_path, reply.status))
        if delay:
            time.sleep(delay)
        handler.send(reply)

    def _respond(
        self, method: str, path: str, query: str, handler: _Handler, raw_body: bytes
    ) -> tuple[str, Operation | None, _Reply]:
        if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
            return path, None, self._ui_page(ParsedRequest())
        api_path = path[len(API_PREFIX) :] or "/"
        template, operation, path_values = self.contract.match(method, api_path)
        if template is None:
            self._violation("request", method, api_path, "no such path in the public API spec (real server: 200 + web UI HTML)")
            return api_path, None, self._ui_page(ParsedRequest())
        if operation is None:
            self._violation("request", method, api_path, f"method not defined for {template} in the public API spec")
            return api_path, None, self._problem(405, detail=f"{method} is not allowed on {template}")
        # The request is checked first so its violations are recorded whatever the answer is.
        parsed = self.contract.check_request(
            operation, path_values, parse_qs(query, keep_blank_values=True), handler.headers.get("Content-Type"), raw_body
        )
        for error in parsed.errors:
            self._violation("request", method, api_path, error)
        return api_path, operation, self._answer(method, api_path, operation, parsed, handler.headers.get("Authorization"))

    def _answer(
        self, method: str, api_path: str, operation: Operation, parsed: ParsedRequest, authorization: str | None
    ) -> _Reply:
        """Faults first (like a proxy), then auth (like micronaut security), then the 400, then the endpoint."""
        fault = self._take_fault(method, api_path)
        if fault is not None:
            return fault
        route = self._routes.get((method, operation.template))
        if route is None:
            self._violation("request", method, api_path, f"FakeAirbyte does not simulate {operation.operation_id}")
            return self._problem(501, detail=f"FakeAirbyte does not simulate {operation.operation_id}")
        if self.auth and not operation.anonymous:
            denied = self._check_bearer(authorization)
            if denied is not None:
                return denied
        if parsed.errors:
            return self._problem(400, data={"message": "; ".join(parsed.errors)[:2000]})
        return route(parsed)

    def _check_reply(self, method: str, path: str, operation: Operation | None, reply: _Reply) -> None:
        if reply.content_type == JSON:
            reply.body = self._apply_corruption(method, path, reply.body)
        if operation is not None:
            errors = self.contract.check_response(operation, reply.status, reply.content_type, reply.body)
        elif reply.status >= 400:
            errors = self.contract.check_problem(reply.status, reply.body)
        else:
            errors = []
        for error in errors:
            self._violation(f"response {reply.status} to", method, path, error)

    def _apply_corruption(self, method: str, path: str, body: Any) -> Any:
        with self._lock:
            corruption = next((c for c in self._corruptions if c.matches(method, path)), None)
            if corruption is None:
                return body
            self._corruptions.remove(corruption)
        mutated = copy.deepcopy(body)
        corruption.mutator(mutated)
        return mutated

    def _take_fault(self, method: str, path: str) -> _Reply | None:
        with self._lock:
            fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is None:
                return None
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.remove(fault)
        reply = self._problem(fault.status, detail=f"Injected failure ({fault.status}).")
        if isinstance(fault.retry_after, datetime):
            reply.headers["Retry-After"] = format_datetime(fault.retry_after.astimezone(UTC), usegmt=True)
        elif fault.retry_after is not None:
            reply.headers["Retry-After"] = str(math.ceil(fault.retry_after))
        return reply

    def _check_bearer(self, header: str | None) -> _Reply | None:
        if not header or not header.lower().startswith("bearer "):
            return self._unauthorized("The Authorization header is missing or is not a Bearer token.")
        token = header[len("bearer ") :].strip()
        with self._lock:
            expiry = self._tokens.get(token)
        if expiry is None or expiry <= self._clock.monotonic():
            return self._unauthorized("The access token is unknown or expired.")
        return None

    def _unauthorized(self, detail: str) -> _Reply:
        reply = self._problem(401, detail=detail)
        reply.headers["WWW-Authenticate"] = "Bearer"
        return reply

    def _problem(
        self, status: int, *, detail: str | None = None, data: Mapping[str, Any] | None = None, name: str | None = None
    ) -> _Reply:
        name = name or _PROBLEM_FOR_STATUS.get(status) or ("UnexpectedProblemResponse" if status >= 500 else None)
        if name is None:  # e.g. 405, 429: no named problem in api-problems, only BaseProblemFields
            title = _GENERIC_TITLES.get(status, "error")
            body: dict[str, Any] = {"status": status, "type": GENERIC_PROBLEM_TYPE, "title": title, "detail": detail or title}
            if data is not None:
                body["data"] = dict(data)
            return _Reply(status, body)
        return _Reply(status, self.contract.problem(name, status, detail, data))

    def _violation(self, kind: str, method: str, path: str, message: str) -> None:
        with self._lock:
            self.violations.append(f"{kind} {method} {path}: {message}")

    # ------------------------------------------------------------------ endpoints

    def _ui_page(self, _: ParsedRequest) -> _Reply:
        return _Reply(200, UI_HTML, HTML)

    def _health(self, _: ParsedRequest) -> _Reply:
        return _Reply(200, None, None)

    def _create_token(self, request: ParsedRequest) -> _Reply:
        body = request.body or {}
        if self.auth and (body.get("client_id"), body.get("client_secret")) != (self.client_id, self.client_secret):
            return self._problem(400, detail="Invalid client id or token")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self._clock.monotonic() + self.token_ttl_seconds
        return _Reply(
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": math.ceil(self.token_ttl_seconds)},
        )

    def _list_connections(self, request: ParsedRequest) -> _Reply:
        query = request.query
        limit, offset = query["limit"], query["offset"]
        workspaces = {value.lower() for value in query.get("workspaceIds", [])}
        tags = {value.lower() for value in query.get("tagIds", [])}
        with self._lock:
            connections = [
                connection
                for connection in self._connections.values()
                if (not workspaces or connection.workspace_id in workspaces)
                and (not tags or tags & {tag_id(tag) for tag in connection.tags})
                and (query["includeDeleted"] or connection.status != "deprecated")
            ]
        page = connections[offset : offset + limit]
        carry = {"includeDeleted": str(query["includeDeleted"]).lower()}
        if workspaces:
            carry["workspaceIds"] = ",".join(query["workspaceIds"])
        links = self._page_links("/connections", carry, len(page), len(connections), limit, offset)
        return _Reply(200, {**links, "data": [connection.to_json() for connection in page]})

    def _get_connection(self, request: ParsedRequest) -> _Reply:
        connection_id = request.path["connectionId"]
        with self._lock:
            connection = self._connection(connection_id)
            if connection is None:
                return self._not_found("connection", connection_id)
            return _Reply(200, connection.to_json())

    def _create_job(self, request: ParsedRequest) -> _Reply:
        connection_id, job_type = request.body["connectionId"], request.body["jobType"]
        if job_type == "refresh":  # the real JobsController refuses it
            return self._problem(422, data={"message": "Refreshes are not supported in the public API"})
        now = self._clock.monotonic()
        with self._lock:
            connection = self._connection(connection_id)
            if connection is None:
                return self._not_found("connection", connection_id)
            if any(
                job.connection_id == connection.connection_id and job.state(now) not in TERMINAL_STATUSES
                for job in self._jobs.values()
            ):
                message = f"A sync is already running for: {connection.connection_id}"
                return self._problem(409, data={"message": message})
            job = self._new_job(connection, job_type, pending_seconds=self.pending_seconds)
            return _Reply(200, self._job_json(job, now))

    def _list_jobs(self, request: ParsedRequest) -> _Reply:
        query = request.query
        order = _parse_order_by(query.get("orderBy"))
        if order is None:
            return self._problem(400, data={"message": f"Invalid order by clause provided: {query['orderBy']}"})
        order_field, descending = order
        connection_id = (query.get("connectionId") or "").lower()
        workspaces = {value.lower() for value in query.get("workspaceIds", [])}
        now = self._clock.monotonic()
        with self._lock:
            selected = [
                (job, self._job_json(job, now))
                for job in self._jobs.values()
                if (not connection_id or job.connection_id == connection_id)
                and (not workspaces or job.workspace_id in workspaces)
                and (query.get("jobType") is None or job.job_type == query["jobType"])
            ]
        selected = [(job, body) for job, body in selected if query.get("status") is None or body["status"] == query["status"]]
        selected.sort(
            key=lambda pair: (pair[0].created_mono if order_field == "createdat" else pair[0].updated_mono(now), pair[0].job_id),
            reverse=descending,
        )
        limit, offset = query["limit"], query["offset"]
        page = [body for _, body in selected[offset : offset + limit]]
        carry = {key: str(query[key]) for key in ("jobType", "connectionId") if query.get(key) is not None}
        if not connection_id and workspaces:
            carry["workspaceIds"] = ",".join(query["workspaceIds"])
        links = self._page_links("/jobs", carry, len(page), len(selected), limit, offset)
        return _Reply(200, {**links, "data": page})

    def _get_job(self, request: ParsedRequest) -> _Reply:
        job_id = request.path["jobId"]
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return self._not_found("job", str(job_id))
            return _Reply(200, self._job_json(job, self._clock.monotonic()))

    def _cancel_job(self, request: ParsedRequest) -> _Reply:
        job_id = request.path["jobId"]
        now = self._clock.monotonic()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return self._not_found("job", str(job_id))
            if job.state(now) not in TERMINAL_STATUSES:
                job.cancelled_mono = now
            return _Reply(200, self._job_json(job, now))

    # ------------------------------------------------------------------ helpers (call with the lock held)

    def _connection(self, connection_id: str) -> _Connection | None:
        return self._connections.get(connection_id.lower())

    def _new_job(self, connection: _Connection, job_type: str, *, pending_seconds: float) -> _Job:
        syncs_data = job_type == "sync"
        job = _Job(
            job_id=next(self._job_ids),
            connection_id=connection.connection_id,
            workspace_id=connection.workspace_id,
            job_type=job_type,
            outcome=connection.outcome,
            run_seconds=connection.sync_seconds,
            pending_seconds=pending_seconds,
            rows=connection.rows if syncs_data else 0,
            bytes_=connection.bytes_ if syncs_data else 0,
            created_mono=self._clock.monotonic(),
            created_wall=self._clock.time(),
            failed_attempts=connection.failed_attempts,
            retry_seconds=connection.retry_seconds,
        )
        self._jobs[job.job_id] = job
        return job

    def _job_json(self, job: _Job, now: float) -> dict[str, Any]:
        state = job.state(now)
        reported = self.report_unknown_status if state == "pending" and self.report_unknown_status else state
        body: dict[str, Any] = {
            "jobId": job.job_id,
            "status": reported,
            "jobType": job.job_type,
            "startTime": java_offset_datetime(job.created_wall),
            "connectionId": job.connection_id,
        }
        updated = job.updated_mono(now)
        if state in TERMINAL_STATUSES:
            body["lastUpdatedAt"] = java_offset_datetime(job.wall(updated))
            succeeded = state == "succeeded"
            body["bytesSynced"] = job.bytes_ if succeeded else 0
            body["rowsSynced"] = job.rows if succeeded else 0
        if state != "pending":
            body["duration"] = java_duration(updated - job.created_mono)
        return body

    def _page_links(
        self, resource: str, carry: Mapping[str, str], page_size: int, total: int, limit: int, offset: int
    ) -> dict[str, str]:
        def url(page_offset: int) -> str:
            return f"{self.base_url}{resource}?" + urlencode({**carry, "limit": limit, "offset": page_offset}, safe=",")

        has_next = page_size > 0 if self.next_on_every_page else offset + limit < total
        return {
            "previous": url(max(offset - limit, 0)) if offset else "",
            "next": url(offset + limit) if has_next else "",
        }

    def _not_found(self, resource_type: str, resource_id: str) -> _Reply:
        return self._problem(
            404,
            detail=f"The requested {resource_type} could not be found.",
            data={"resourceType": resource_type, "resourceId": resource_id},
        )


_GENERIC_TITLES = {405: "method-not-allowed", 429: "too-many-requests", 501: "not-implemented"}


def _parse_order_by(order_by: str | None) -> tuple[str, bool] | None:
    """(field lower-cased, descending) as the real server parses `orderBy`, or None if invalid."""
    if order_by is None:
        return "createdat", False
    found = re.search(r"([a-zA-Z0-9]+)\|(ASC|DESC)", order_by)
    if not found or found.group(1).lower() not in ("createdat", "updatedat"):
        return None
    return found.group(1).lower(), found.group(2) == "DESC"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 100 pollers connecting at once must not overflow the listen backlog
    fake: FakeAirbyte


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    # Headers and body go out in two writes: with Nagle's algorithm on, each keep-alive answer
    # waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def _dispatch(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def send(self, reply: _Reply) -> None:
        payload = reply.payload()
        try:
            self.send_response(reply.status)
            if reply.content_type is not None:
                self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass
