"""Embedded connections as code: the `airbyte/connections.yaml` file.

```yaml
connections:
  - name: faker                      # what `elt run --connection` and the summary call it
    source:
      connector: source-faker        # an Airbyte source connector
      pip: airbyte-source-faker==7.2.1   # installed into its own virtualenv on first use
      config: {count: 1000, seed: 42}
    streams: [users, products, purchases]   # or "*" for all
    destination:
      schema: raw_faker              # the schema the dbt sources read
```
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from elt.errors import ConfigurationError, yaml_problem

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConnectionsFileError(ConfigurationError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    connector: str = Field(pattern=r"^source-[a-z0-9][a-z0-9-]*$")
    pip: str | None = None
    executable: Path | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class DestinationSpec(_Strict):
    schema_: str = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"'{value}' is not a plain SQL identifier")
        return value


class ConnectionSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    source: SourceSpec
    streams: list[str] | Literal["*"]
    destination: DestinationSpec
    enabled: bool = True

    @field_validator("streams")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if value != "*" and not value:
            raise ValueError("list at least one stream, or '*' for all")
        return value


class _ConnectionsFile(_Strict):
    connections: list[dict[str, Any]]


def load_connections(path: Path) -> list[ConnectionSpec]:
    """Parse and validate the file; any problem is one line naming the file, connection and field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConnectionsFileError(
            f"{path}: file not found (set ELT_AIRBYTE_CONNECTIONS_FILE to your connections file)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConnectionsFileError(yaml_problem(path, exc)) from None

    try:
        document = _ConnectionsFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ConnectionsFileError(f"{path}: {_describe(exc, _ConnectionsFile)}") from None

    connections: list[ConnectionSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(document.connections):
        label = (
            f"connection '{entry.get('name')}'" if isinstance(entry, dict) and entry.get("name") else f"connection #{index + 1}"
        )
        try:
            connection = ConnectionSpec.model_validate(entry)
        except ValidationError as exc:
            raise ConnectionsFileError(f"{path}: {label}: {_describe(exc, ConnectionSpec)}") from None
        if connection.name in seen:
            raise ConnectionsFileError(f"{path}: {label}: name: defined twice")
        seen.add(connection.name)
        connections.append(connection)
    return connections


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_config(connection: ConnectionSpec, environ: dict[str, str]) -> dict[str, Any]:
    """The source config with `${VAR}` references replaced from the environment.

    Keeps API keys out of the file: `config: {api_key: "${STRIPE_API_KEY}"}`.
    """

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, str):
            return _ENV_REFERENCE.sub(lookup, value)
        return value

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConnectionsFileError(
                f"connection '{connection.name}': source.config refers to ${{{name}}}, which is not set in the environment or .env"
            )
        return environ[name]

    return {key: resolve(value) for key, value in connection.source.config.items()}


def unset_references(connection: ConnectionSpec, environ: dict[str, str]) -> list[tuple[str, str]]:
    """(config key path, variable) for each `${VAR}` in the source config that `environ` lacks.

    >>> spec = ConnectionSpec.model_validate({"name": "shop", "streams": ["users"], "destination": {"schema": "raw"},
    ...     "source": {"connector": "source-shop", "config": {"auth": {"key": "${SHOP_KEY}"}}}})
    >>> unset_references(spec, {})
    [('source.config.auth.key', 'SHOP_KEY')]
    """
    missing: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        elif isinstance(value, str):
            missing.extend((where, name) for name in _ENV_REFERENCE.findall(value) if name not in environ)

    walk(connection.source.config, "source.config")
    return missing


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    # A misspelled key shows up twice: as an unknown key and as a required one missing; the
    # unknown key is the one to name.
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "string_pattern_mismatch":
        message = f"'{first['input']}' does not match {first['ctx']['pattern']}"
    if first["type"] == "extra_forbidden":
        known = _known_keys(model, first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        message = f"unknown key; did you mean '{close[0]}'?" if close else f"unknown key (known keys: {', '.join(known)})"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{field}: {message}{more}"


def _known_keys(model: type[BaseModel], location: tuple[str | int, ...]) -> list[str]:
    """The keys the file may have at `location` (a path of keys into `model`)."""
    for part in location:
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        annotation = fields[str(part)].annotation if str(part) in fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [info.alias or name for name, info in model.model_fields.items()]
