"""The embedded backend: real Airbyte connectors run in-process by PyAirbyte.

Each connector lives in its own virtualenv under ELT_CONNECTORS_DIR (PyAirbyte's own model:
connectors pin their own airbyte-cdk), installed on first use from the `pip` spec in
`airbyte/connections.yaml`. PyAirbyte then runs it through `local_executable` with
AIRBYTE_OFFLINE_MODE set, so no connector registry is contacted.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from elt.errors import ConfigurationError, TerminalError
from elt.extract.base import SyncResult
from elt.extract.connections import ConnectionSpec, load_connections, resolve_config
from elt.settings import Settings, Warehouse

if TYPE_CHECKING:
    from airbyte.caches import CacheBase

logger = logging.getLogger(__name__)


class ConnectorNotInstalled(ConfigurationError):
    pass


class ConnectorInstallFailed(TerminalError):
    pass


class EmbeddedSyncFailed(TerminalError):
    pass


class UnknownConnection(ConfigurationError):
    pass


# DuckDB takes one writer per file; syncs into the same file wait for each other.
_warehouse_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_install_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


class EmbeddedBackend:
    def __init__(self, settings: Settings, connections: list[ConnectionSpec] | None = None) -> None:
        self.settings = settings
        self.connections_file = settings.path(settings.airbyte_connections_file)
        specs = connections if connections is not None else load_connections(self.connections_file)
        self._connections = {spec.name: spec for spec in specs if spec.enabled}

    def connection_names(self) -> list[str]:
        return list(self._connections)

    def connection(self, name: str) -> ConnectionSpec:
        try:
            return self._connections[name]
        except KeyError:
            raise UnknownConnection(
                f"connection '{name}' is not in {self.connections_file} "
                f"(enabled connections: {', '.join(self._connections) or 'none'})"
            ) from None

    def sync(self, connection: str, *, full_refresh: bool) -> SyncResult:
        spec = self.connection(connection)
        executable = ensure_connector(spec, self.settings.path(self.settings.connectors_dir), self.connections_file)
        config = resolve_config(spec, _environment())
        started = time.monotonic()

        airbyte = _import_pyairbyte()
        source = airbyte.get_source(
            spec.source.connector,
            config=config,
            local_executable=executable,
            install_if_missing=False,
        )
        available = source.get_available_streams()
        streams = available if spec.streams == "*" else spec.streams
        unknown = [stream for stream in streams if stream not in available]
        if unknown:
            raise ConfigurationError(
                f"{self.connections_file}: connection '{spec.name}': streams: "
                f"{', '.join(unknown)} not offered by {spec.source.connector} (it offers: {', '.join(available)})"
            )
        source.select_streams(streams)

        cache, cache_path = self._cache(spec)
        with _warehouse_locks[str(cache_path)]:
            try:
                result = source.read(cache=cache, force_full_refresh=full_refresh)
            except Exception as exc:
                raise EmbeddedSyncFailed(
                    f"connection '{spec.name}' ({spec.source.connector}) failed: {_first_line(exc)}"
                ) from exc
            finally:
                cache.close()
            if self.settings.warehouse is Warehouse.snowflake:
                from elt import snowflake

                try:
                    snowflake.replace_tables_from_duckdb(self.settings, cache_path, spec.destination.schema_, streams)
                except Exception as exc:
                    raise EmbeddedSyncFailed(
                        f"connection '{spec.name}': loading into Snowflake {self.settings.snowflake_database}."
                        f"{spec.destination.schema_} failed: {_first_line(exc)}"
                    ) from exc
        # PyAirbyte counts records per stream on its progress tracker and exposes only the total.
        counts = dict(result._progress_tracker.stream_read_counts)  # noqa: SLF001
        rows_per_stream = {stream: counts.get(stream, 0) for stream in streams}
        return SyncResult(
            connection=spec.name,
            rows=sum(rows_per_stream.values()),
            rows_per_stream=rows_per_stream,
            seconds=time.monotonic() - started,
        )

    def cancel_started_jobs(self) -> None:
        """Connectors run in this process's children; they end with it."""

    def _cache(self, spec: ConnectionSpec) -> tuple[CacheBase, Path]:
        """Where PyAirbyte writes: the DuckDB warehouse itself, or a DuckDB staging file that is
        then published to Snowflake (PyAirbyte keeps incremental state beside the rows)."""
        from airbyte.caches import DuckDBCache

        if self.settings.warehouse is Warehouse.duckdb:
            path = self.settings.path(self.settings.duckdb_path)
        else:
            path = self.settings.path(self.settings.data_dir) / "airbyte-staging.duckdb"
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = DuckDBCache(
            db_path=path,
            schema_name=spec.destination.schema_,
            cache_dir=self.settings.path(self.settings.data_dir) / "airbyte-cache",
        )
        return cache, path


def ensure_connector(spec: ConnectionSpec, connectors_dir: Path, connections_file: Path) -> Path:
    """The connector's executable, installed into its own virtualenv if needed."""
    source = spec.source
    where = f"{connections_file}: connection '{spec.name}'"
    if source.executable:
        if not source.executable.exists():
            raise ConnectorNotInstalled(
                f"{where}: source.executable: {source.executable} does not exist"
            )
        return source.executable

    venv = connectors_dir / source.connector
    executable = venv / "bin" / source.connector
    installed_from = venv / ".installed-from"
    with _install_locks[str(venv)]:
        if executable.exists() and (source.pip is None or _read(installed_from) == source.pip):
            return executable
        if source.pip is None:
            found = shutil.which(source.connector)
            if found:
                return Path(found)
            raise ConnectorNotInstalled(
                f"{where}: source.connector: '{source.connector}' is not installed "
                f"(looked in {venv} and on PATH); add its PyPI package as source.pip, "
                f"e.g. pip: airbyte-{source.connector}"
            )
        logger.info("Installing %s from '%s' into %s", source.connector, source.pip, venv)
        _install(spec, venv, where)
        if not executable.exists():
            raise ConnectorInstallFailed(
                f"{where}: source.connector: installing '{source.pip}' did not provide the "
                f"'{source.connector}' command; check source.connector and source.pip"
            )
        installed_from.write_text(source.pip)
        return executable


def _install(spec: ConnectionSpec, venv: Path, where: str) -> None:
    assert spec.source.pip is not None
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if uv:
        commands = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
            [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), spec.source.pip],
        ]
    else:
        commands = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", spec.source.pip],
        ]
    for command in commands:
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            tail = " | ".join(line.strip() for line in completed.stderr.strip().splitlines()[-3:])
            raise ConnectorInstallFailed(f"{where}: source.pip: installing '{spec.source.pip}' failed: {tail}")


def _import_pyairbyte():
    os.environ.setdefault("AIRBYTE_OFFLINE_MODE", "1")
    os.environ.setdefault("NO_LIVE_PROGRESS", "1")
    root = logging.getLogger()
    handlers_before = list(root.handlers)
    # airbyte_cdk's entrypoint runs logging.config.dictConfig at import time, which closes every
    # existing handler and sends all logs through its JSON formatter; put Prefect's logging back.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # google-cloud's Python 3.11 end-of-life notices
        import airbyte
        import airbyte_cdk.entrypoint  # noqa: F401

    if root.handlers != handlers_before:
        from prefect.logging.configuration import setup_logging

        root.handlers = handlers_before
        setup_logging(incremental=False)
    return airbyte


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _environment() -> dict[str, str]:
    """Process environment plus `.env`, which pydantic-settings reads but does not export."""
    from dotenv import dotenv_values

    values = {key: value for key, value in dotenv_values(".env").items() if value is not None}
    return {**values, **os.environ}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
