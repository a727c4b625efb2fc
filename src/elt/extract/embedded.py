"""The embedded backend: real Airbyte connectors run in-process by PyAirbyte.

Each connector lives in its own virtualenv under ELT_CONNECTORS_DIR (PyAirbyte's own model:
connectors pin their own airbyte-cdk), installed on first use from the `pip` spec in
`airbyte/connections.yaml`. `<connectors dir>/<connector>` is a symlink to the install in use;
a changed spec is installed beside it and the link switched only once that install worked, so
a spec that cannot be installed leaves the working connector in place. PyAirbyte then runs the
connector through `local_executable` with AIRBYTE_OFFLINE_MODE set, so no connector registry
is contacted.

Every sync works in a folder of its own under `<data>/airbyte-cache/`: PyAirbyte's record files
and the connector's temporary files (where the CDK writes its resolved config, secrets
included) go there, and the folder is removed when the sync ends, however it ends. A folder
left by a process that was killed outright is removed by the next sync.

Each connection's catalog (discover output) and each connector's spec are cached under
`<data>/airbyte-catalogs/`, keyed by the installed connector and a keyed hash of the resolved
config, so a scheduled run starts the connector once (read) instead of three times.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from elt.errors import ConfigurationError, EltError, TerminalError, TransientError, first_line
from elt.extract.base import SyncResult
from elt.extract.connections import ConnectionSpec, load_connections, resolve_config
from elt.extract.pyairbyte_imports import only_what_duckdb_needs, without_dataframe_libraries
from elt.settings import Settings
from elt.warehouse import warehouse_for

if TYPE_CHECKING:
    from airbyte.caches import CacheBase
    from airbyte.sources import Source
    from airbyte_protocol.models import AirbyteCatalog, ConnectorSpecification

logger = logging.getLogger(__name__)


class ConnectorNotInstalled(ConfigurationError):
    pass


class ConnectorInstallFailed(TerminalError):
    pass


class ConnectorInstallUnreachable(TransientError):
    """The package index could not be reached; the next run may install fine."""


class EmbeddedSyncFailed(TerminalError):
    pass


class EmbeddedSyncUnreachable(TransientError):
    """A sync failed on the network (the source's API, Snowflake): retrying later may succeed."""


class EmbeddedSyncCancelled(EltError):
    """The run was cancelled or the process told to stop; nothing of the unfinished streams was written."""


class ConnectionNotInFile(ConfigurationError):
    pass


class UnknownStream(ConfigurationError):
    pass


# DuckDB takes one writer per file; syncs into the same file wait for each other.
_warehouse_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_install_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

_NETWORK_TROUBLE = re.compile(
    r"failed to fetch|error sending request|dns error|name resolution|name or service not known|"
    r"connection (refused|reset|aborted)|timed out|timeout|network is unreachable|could not connect|"
    r"max retries exceeded|newconnectionerror|temporarily unavailable",
    re.IGNORECASE,
)


class EmbeddedBackend:
    def __init__(self, settings: Settings, connections: list[ConnectionSpec] | None = None) -> None:
        self.settings = settings
        self.warehouse = warehouse_for(settings)
        self.connections_file = settings.path(settings.airbyte_connections_file)
        specs = connections if connections is not None else load_connections(self.connections_file)
        self._connections = {spec.name: spec for spec in specs if spec.enabled}
        data_dir = settings.path(settings.data_dir)
        self._scratch = data_dir / "airbyte-cache"
        self._catalogs = CatalogCache(
            data_dir / "airbyte-catalogs", max_age_seconds=settings.airbyte_catalog_max_age_hours * 3600
        )
        self._cancelled = threading.Event()
        self._running: set[SyncFolder] = set()
        self._running_lock = threading.Lock()

    def connection_names(self) -> list[str]:
        return list(self._connections)

    def connection(self, name: str) -> ConnectionSpec:
        try:
            return self._connections[name]
        except KeyError:
            raise ConnectionNotInFile(
                f"connection '{name}' is not in {self.connections_file} "
                f"(enabled connections: {', '.join(self._connections) or 'none'})"
            ) from None

    def check_streams(self, connections: list[str] | None = None) -> None:
        """Every configured stream is offered by its source, read from the cached catalog (discover
        runs only when there is none for this connector version and config). Moves no data."""
        problems = []
        for name in connections or self.connection_names():
            spec = self.connection(name)
            if spec.streams == "*":
                continue
            try:
                offered = self._offered_streams(spec)
            except Exception as exc:  # noqa: BLE001 - its sync fails with the full story; others still sync
                logger.warning("connection '%s': streams not checked before the run: %s", name, first_line(exc))
                continue
            problem = self._unknown_streams(spec, offered)
            if problem:
                problems.append(problem)
        if problems:
            raise UnknownStream("; ".join(problems))

    def _offered_streams(self, spec: ConnectionSpec) -> list[str]:
        """From the cached catalog when it is current (no PyAirbyte import, no connector start-up)."""
        executable = ensure_connector(spec, self.settings.path(self.settings.connectors_dir), self.connections_file)
        key = self._catalogs.key(spec, installed_version(executable), resolve_config(spec, self.settings.environment()))
        cached = self._catalogs.stream_names(spec.name, key)
        if cached is not None and set(spec.streams) <= set(cached):
            return cached
        with self._sync_folder(spec) as folder:
            source, _ = self._source(spec, folder, rediscover=cached is not None)
            return source.get_available_streams()

    def sync(self, connection: str, *, full_refresh: bool) -> SyncResult:
        """One connection's sync. A full refresh replaces each stream's table with exactly what
        the source emitted; a sync that fails or is cancelled leaves every unfinished table as it was."""
        spec = self.connection(connection)
        started = time.monotonic()
        with self._sync_folder(spec) as folder:
            try:
                source, installed = self._source(spec, folder, rediscover=full_refresh)
                streams = self._selected_streams(spec, source)
                source.select_streams(streams)
                _log_incremental_streams_as_elt_runs_them(source, spec)
                _stop_reading_when_cancelled(source, self._cancelled, self._cancel_error(spec))
                with without_dataframe_libraries():
                    cache, cache_path = self._cache(spec, folder.records)
                with _warehouse_locks[str(cache_path)]:
                    with without_dataframe_libraries():
                        try:
                            self._raise_if_cancelled(spec)
                            result = source.read(
                                cache=cache,
                                force_full_refresh=full_refresh,
                                # "auto" merges on the primary key: rows the source no longer emits would stay.
                                write_strategy="replace" if full_refresh else "auto",
                            )
                            counts = dict(result._progress_tracker.stream_read_counts)  # PyAirbyte exposes only the total
                            if full_refresh:
                                _empty_streams_without_records(cache, streams, counts)
                        finally:
                            cache.close()
                    self._catalogs.store_spec(spec.source.connector, installed, source)
                    self._raise_if_cancelled(spec)
                    self._publish(spec, cache_path, streams)
            except (EltError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise self._failure(spec, exc) from exc
        rows_per_stream = {stream: counts.get(stream, 0) for stream in streams}
        return SyncResult(
            connection=spec.name,
            rows=sum(rows_per_stream.values()),
            rows_per_stream=rows_per_stream,
            seconds=time.monotonic() - started,
        )

    def cancel_started_jobs(self) -> None:
        """Stop every running sync of this backend: its connector processes are terminated (killed
        after 5 s), and the sync raises instead of committing what it had read."""
        self._cancelled.set()
        with self._running_lock:
            running = list(self._running)
        for folder in running:
            folder.stop_connectors()

    # ---

    def _source(self, spec: ConnectionSpec, folder: SyncFolder, *, rediscover: bool) -> tuple[Source, str]:
        """The PyAirbyte source, its catalog and spec taken from the cache where they are current."""
        executable = ensure_connector(spec, self.settings.path(self.settings.connectors_dir), self.connections_file)
        config = resolve_config(spec, self.settings.environment())
        airbyte = _import_pyairbyte()
        source = airbyte.get_source(
            spec.source.connector,
            config=config,
            local_executable=folder.launcher(executable),
            install_if_missing=False,
        )
        installed = installed_version(executable)
        key = self._catalogs.key(spec, installed, config)
        cached = None if rediscover else self._catalogs.load_catalog(spec.name, key)
        if cached is not None and spec.streams != "*" and not set(spec.streams) <= {stream.name for stream in cached.streams}:
            cached = None  # a stream added to the file since: the source may offer it now
        # PyAirbyte discovers on first use of `discovered_catalog` and specs on first validation;
        # handing it the cached ones saves a connector start-up each.
        if cached is not None:
            source._discovered_catalog = cached
        else:
            self._raise_if_cancelled(spec)
            self._catalogs.store_catalog(spec.name, key, source.discovered_catalog)
        cached_spec = self._catalogs.load_spec(spec.source.connector, installed)
        if cached_spec is not None:
            source._spec = cached_spec
        return source, installed

    def _selected_streams(self, spec: ConnectionSpec, source: Source) -> list[str]:
        available = source.get_available_streams()
        problem = self._unknown_streams(spec, available)
        if problem:
            raise UnknownStream(problem)
        return available if spec.streams == "*" else list(spec.streams)

    def _unknown_streams(self, spec: ConnectionSpec, available: list[str]) -> str | None:
        if spec.streams == "*":
            return None
        unknown = [stream for stream in spec.streams if stream not in available]
        if not unknown:
            return None
        described = []
        for stream in unknown:
            close = difflib.get_close_matches(stream, available, n=1)
            described.append(f"'{stream}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        offered = sorted(available)
        listing = ", ".join(offered[:30]) + (f", … ({len(offered) - 30} more)" if len(offered) > 30 else "")
        return (
            f"{self.connections_file}: connection '{spec.name}': streams: {', '.join(described)} "
            f"not offered by {spec.source.connector} (it offers: {listing or 'nothing'})"
        )

    @contextlib.contextmanager
    def _sync_folder(self, spec: ConnectionSpec) -> Iterator[SyncFolder]:
        self._raise_if_cancelled(spec)
        SyncFolder.remove_abandoned(self._scratch)
        folder = SyncFolder.create(self._scratch, spec.name)
        with self._running_lock:
            self._running.add(folder)
        try:
            yield folder
        finally:
            with self._running_lock:
                self._running.discard(folder)
            folder.stop_connectors()  # a connector PyAirbyte stopped reading from, if any is left
            folder.remove()

    def _raise_if_cancelled(self, spec: ConnectionSpec) -> None:
        if self._cancelled.is_set():
            raise self._cancel_error(spec)

    def _cancel_error(self, spec: ConnectionSpec) -> EmbeddedSyncCancelled:
        return EmbeddedSyncCancelled(
            f"connection '{spec.name}' ({spec.source.connector}): sync cancelled; tables of streams that had not finished are unchanged"
        )

    def _failure(self, spec: ConnectionSpec, exc: BaseException) -> EltError:
        if self._cancelled.is_set():
            return self._cancel_error(spec)
        message = f"connection '{spec.name}' ({spec.source.connector}) failed: {first_line(exc)}"
        return EmbeddedSyncUnreachable(message) if _is_network_error(exc) else EmbeddedSyncFailed(message)

    def _publish(self, spec: ConnectionSpec, staged: Path, streams: list[str]) -> None:
        try:
            self.warehouse.publish_staged(staged, spec.destination.schema_, streams)
        except Exception as exc:
            message = (
                f"connection '{spec.name}': loading into {self.warehouse.schema_location(spec.destination.schema_)} "
                f"failed: {first_line(exc)}"
            )
            raise (EmbeddedSyncUnreachable if _is_network_error(exc) else EmbeddedSyncFailed)(message) from exc

    def _cache(self, spec: ConnectionSpec, records: Path) -> tuple[CacheBase, Path]:
        """Where PyAirbyte writes: a DuckDB file the warehouse then publishes (or that is the
        warehouse itself); PyAirbyte keeps incremental state beside the rows."""
        from airbyte.caches import DuckDBCache

        path = self.warehouse.staging_path
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = DuckDBCache(db_path=path, schema_name=spec.destination.schema_, cache_dir=records)
        return cache, path


def _log_incremental_streams_as_elt_runs_them(source: Source, spec: ConnectionSpec) -> None:
    """PyAirbyte prints on stderr which streams sync incrementally and that a full refresh is
    `force_full_refresh=True` in `read()`, its own API; here a full refresh is asked for otherwise."""

    def log(*, incremental_streams: set[str] | None = None) -> None:
        _run_logger().info(
            "connection '%s': incremental streams %s (a full refresh: `elt run --full-refresh`, or all-etl's "
            "full_refresh parameter)",
            spec.name,
            ", ".join(sorted(incremental_streams or ())),
        )

    source._log_incremental_streams = log  # type: ignore[method-assign]


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Inside a Prefect run, its logger (its lines are the run's logs and `elt run`'s output);
    outside one, this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def _stop_reading_when_cancelled(source: Source, cancelled: threading.Event, error: EmbeddedSyncCancelled) -> None:
    """Make a cancelled read raise instead of ending.

    PyAirbyte treats a connector that exits on SIGTERM as finished and would then write the
    records read so far; raising from the message stream stops it before anything is written.
    """
    read_with_catalog = source._read_with_catalog

    def read_until_cancelled(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with contextlib.closing(read_with_catalog(*args, **kwargs)) as messages:
            for message in messages:
                if cancelled.is_set():
                    raise error
                yield message
        if cancelled.is_set():
            raise error

    source._read_with_catalog = read_until_cancelled  # type: ignore[method-assign,assignment]


def _empty_streams_without_records(cache: CacheBase, streams: list[str], counts: dict[str, int]) -> None:
    """A full refresh of a stream that emitted nothing leaves its table empty, not as it was:
    PyAirbyte only swaps in a new table for a stream that had records."""
    processor = cache.processor
    statements = [
        f"DELETE FROM {processor._fully_qualified(processor.get_sql_table_name(stream))}"
        for stream in streams
        if not counts.get(stream)
    ]
    if statements:
        cache.execute_sql(statements)


class SyncFolder:
    """One sync's scratch folder: PyAirbyte's record files, the connector's TMPDIR, the PIDs of
    the connector processes it started. Named `<connection>.<pid>.<token>` so a later sync can
    tell the folders of dead processes from those of running ones."""

    _NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(\d+)\.[0-9a-f]+$")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = path / "records"
        self.tmp = path / "tmp"
        self.pids_file = path / "connector-pids"

    @classmethod
    def create(cls, root: Path, connection: str) -> SyncFolder:
        root.mkdir(parents=True, exist_ok=True)
        folder = cls(root / f"{connection}.{os.getpid()}.{secrets.token_hex(4)}")
        folder.path.mkdir(mode=0o700)
        folder.records.mkdir()
        folder.tmp.mkdir()
        return folder

    @classmethod
    def remove_abandoned(cls, root: Path) -> None:
        """Folders of processes that no longer run, and record files of versions that wrote them
        straight into `root`: what a crashed sync left behind."""
        import psutil

        if not root.is_dir():
            return
        for entry in root.iterdir():
            match = cls._NAME.match(entry.name)
            if entry.is_dir() and match and not psutil.pid_exists(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file() and entry.name.endswith((".jsonl", ".jsonl.gz")):
                entry.unlink(missing_ok=True)

    def launcher(self, executable: Path) -> Path:
        """A script PyAirbyte runs instead of the connector: it records the connector's PID and
        points its temporary files here, then becomes the connector."""
        script = self.path / executable.name
        script.write_text(
            "#!/bin/sh\n"
            f"echo $$ >> {shlex.quote(str(self.pids_file))}\n"
            f"TMPDIR={shlex.quote(str(self.tmp))}\n"
            "export TMPDIR\n"
            f'exec {shlex.quote(str(executable))} "$@"\n'
        )
        script.chmod(0o700)
        return script

    def stop_connectors(self, grace_seconds: float = 5.0) -> None:
        """Terminate every connector process this sync started that still runs, and their children."""
        import psutil

        try:
            pids = {int(line) for line in self.pids_file.read_text().split()}
        except FileNotFoundError:
            return
        ours = {process.pid: process for process in psutil.Process().children(recursive=True)}
        victims = []
        for pid in pids & ours.keys():
            victims.append(ours[pid])
            with contextlib.suppress(psutil.Error):
                victims += ours[pid].children(recursive=True)
        if not victims:
            return
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        # Not psutil.wait_procs: it would reap the connector before PyAirbyte's Popen can.
        deadline = time.monotonic() + grace_seconds
        while (alive := [process for process in victims if _running(process)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _running(process: Any) -> bool:
    import psutil

    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class CatalogCache:
    """Each connection's discovered catalog and each connector's spec, reused between runs.

    A catalog is reused only for the same installed connector (every package version in its
    virtualenv) and the same resolved config, compared by an HMAC keyed with a random key kept
    beside the cache, so no hash of a secret is ever stored in the clear. `max_age_seconds`
    bounds how long a source's new columns can go unseen.
    """

    def __init__(self, folder: Path, max_age_seconds: float) -> None:
        self.folder = folder
        self.max_age_seconds = max_age_seconds

    def key(self, spec: ConnectionSpec, installed: str, config: dict[str, Any]) -> str:
        identity = json.dumps(
            {"connector": spec.source.connector, "installed": installed, "config": config}, sort_keys=True, default=str
        )
        return hmac.new(self._secret(), identity.encode(), hashlib.sha256).hexdigest()

    def load_catalog(self, connection: str, key: str) -> AirbyteCatalog | None:
        from airbyte_protocol.models import AirbyteCatalog

        entry = self._current(connection, key)
        return None if entry is None else AirbyteCatalog.model_validate(entry["catalog"])

    def stream_names(self, connection: str, key: str) -> list[str] | None:
        entry = self._current(connection, key)
        return None if entry is None else [stream["name"] for stream in entry["catalog"]["streams"]]

    def _current(self, connection: str, key: str) -> dict[str, Any] | None:
        entry = self._read(self.folder / f"{connection}.catalog.json")
        if not entry or entry.get("key") != key or time.time() - entry.get("saved_at", 0) >= self.max_age_seconds:
            return None
        return entry

    def store_catalog(self, connection: str, key: str, catalog: Any) -> None:
        self._write(
            self.folder / f"{connection}.catalog.json",
            {"key": key, "saved_at": time.time(), "catalog": catalog.model_dump(mode="json", exclude_none=True)},
        )

    def load_spec(self, connector: str, installed: str) -> ConnectorSpecification | None:
        from airbyte_protocol.models import ConnectorSpecification

        entry = self._read(self.folder / f"{connector}.spec.json")
        if not entry or entry.get("installed") != installed:
            return None
        return ConnectorSpecification.model_validate(entry["spec"])

    def store_spec(self, connector: str, installed: str, source: Source) -> None:
        spec = source._spec  # set once PyAirbyte has validated the config
        if spec is not None:
            self._write(
                self.folder / f"{connector}.spec.json",
                {"installed": installed, "spec": spec.model_dump(mode="json", exclude_none=True)},
            )

    def _secret(self) -> bytes:
        path = self.folder / ".key"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_bytes(path, secrets.token_bytes(32), exclusive=True)
            return path.read_bytes()

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            entry = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def _write(self, path: Path, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_bytes(path, json.dumps(entry).encode())

    @staticmethod
    def _write_bytes(path: Path, data: bytes, exclusive: bool = False) -> None:
        """Written whole or not at all; `exclusive` keeps the first of two concurrent writers."""
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            if exclusive:
                with contextlib.suppress(FileExistsError):
                    os.link(temporary, path)
            else:
                os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)


def installed_version(executable: Path) -> str:
    """What identifies the installed connector: every distribution in its virtualenv, or for a
    connector outside one, the executable file itself."""
    real = executable.resolve()
    venv = real.parent.parent
    if (venv / "pyvenv.cfg").exists():
        distributions = sorted(path.name for path in venv.glob("lib/python*/site-packages/*.dist-info"))
        return hashlib.sha256("\n".join(distributions).encode()).hexdigest()
    stat = real.stat()
    return f"{real}:{stat.st_mtime_ns}:{stat.st_size}"


def ensure_connector(spec: ConnectionSpec, connectors_dir: Path, connections_file: Path) -> Path:
    """The connector's executable, installed into its own virtualenv if needed."""
    if spec.source.executable:
        return find_connector(spec, connectors_dir, connections_file) or spec.source.executable
    link = connectors_dir / spec.source.connector
    with _install_locks[str(link)], _file_lock(connectors_dir / f".{spec.source.connector}.lock"):
        found = find_connector(spec, connectors_dir, connections_file)
        if found:
            return found
        installed = _read(link / ".installed-from")
        in_use = installed if (link / "bin" / spec.source.connector).exists() else None
        return _install_beside(spec, link, in_use, f"{connections_file}: connection '{spec.name}'")


def find_connector(spec: ConnectionSpec, connectors_dir: Path, connections_file: Path) -> Path | None:
    """The installed executable the spec asks for, without installing anything: None when only
    an install from `source.pip` would provide it; ConnectorNotInstalled when nothing would."""
    source = spec.source
    where = f"{connections_file}: connection '{spec.name}'"
    if source.executable:
        if not source.executable.exists():
            raise ConnectorNotInstalled(f"{where}: source.executable: {source.executable} does not exist")
        return source.executable
    link = connectors_dir / source.connector
    executable = link / "bin" / source.connector
    if executable.exists() and (source.pip is None or _read(link / ".installed-from") == source.pip):
        return link.resolve() / "bin" / source.connector
    if source.pip is not None:
        return None
    found = shutil.which(source.connector)
    if found:
        return Path(found)
    raise ConnectorNotInstalled(
        f"{where}: source.connector: '{source.connector}' is not installed "
        f"(looked in {link} and on PATH); add its PyPI package as source.pip, "
        f"e.g. pip: airbyte-{source.connector}"
    )


def _install_beside(spec: ConnectionSpec, link: Path, installed: str | None, where: str) -> Path:
    """Install into a new virtualenv next to the one in use, then point `link` at it."""
    pip, connector = spec.source.pip, spec.source.connector
    assert pip is not None
    venv = link.parent / ".installs" / f"{connector}-{hashlib.sha256(pip.encode()).hexdigest()[:12]}"
    kept = f"; kept the working install of '{installed}': fix source.pip or set it back" if installed else ""
    logger.info("Installing %s from '%s' into %s", connector, pip, venv)
    try:
        if venv.exists():
            shutil.rmtree(venv)  # an earlier attempt at this spec that did not finish
        _install(pip, venv, where, kept)
        if not (venv / "bin" / connector).exists():
            raise ConnectorInstallFailed(
                f"{where}: source.connector: installing '{pip}' did not provide the "
                f"'{connector}' command; check source.connector and source.pip{kept}"
            )
        (venv / ".installed-from").write_text(pip)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    _switch(link, venv)
    return venv / "bin" / connector


def _switch(link: Path, venv: Path) -> None:
    """Point `link` at `venv` in one rename, then remove the install it pointed at."""
    previous: Path | None = None
    if link.is_symlink():
        previous = link.resolve()
    elif link.is_dir():
        # A connector installed in place by an earlier version of the appliance.
        previous = link.parent / ".installs" / f"{link.name}-retired-{os.getpid()}"
        link.rename(previous)
    pointer = link.with_name(f".{link.name}.switching-{os.getpid()}")
    pointer.unlink(missing_ok=True)
    pointer.symlink_to(venv.relative_to(link.parent))
    os.replace(pointer, link)
    if previous is not None and previous != venv.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def _install(pip: str, venv: Path, where: str, kept: str) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    if uv:
        commands = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
            # Compiled now (pip does by default): where PYTHONDONTWRITEBYTECODE is set, each sync
            # would compile the connector's modules again.
            [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", str(venv / "bin" / "python"), pip],
        ]
    else:
        commands = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", pip],
        ]
    for command in commands:
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            tail = " | ".join(line.strip() for line in completed.stderr.strip().splitlines()[-3:])
            error = ConnectorInstallUnreachable if _NETWORK_TROUBLE.search(completed.stderr) else ConnectorInstallFailed
            raise error(f"{where}: source.pip: installing '{pip}' failed: {tail}{kept}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Two processes never install the same connector at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_network_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)) or _NETWORK_TROUBLE.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def preload_pyairbyte() -> threading.Thread:
    """Start importing PyAirbyte (seconds, even with only its DuckDB cache) in a background thread, so that the import overlaps Prefect's start-up instead of
    delaying the first sync; a sync's own import waits for it. A failed preload is only logged:
    the sync's import fails again where the user sees it."""
    thread = threading.Thread(target=_preload, name="elt-pyairbyte-import", daemon=True)
    thread.start()
    return thread


def _preload() -> None:
    try:
        _import_pyairbyte()
    except Exception:  # the sync's own import raises it, with its story
        logger.debug("Preloading PyAirbyte failed", exc_info=True)


_pyairbyte_import_lock = threading.Lock()


def _import_pyairbyte() -> ModuleType:
    # One import at a time: a sync's import waits for the preload's, handlers put back included.
    with _pyairbyte_import_lock:
        return _import_pyairbyte_once()


def _import_pyairbyte_once() -> ModuleType:
    os.environ.setdefault("AIRBYTE_OFFLINE_MODE", "1")
    os.environ.setdefault("NO_LIVE_PROGRESS", "1")
    root = logging.getLogger()
    handlers_before = list(root.handlers)
    with warnings.catch_warnings(), _without_airbyte_cdk_logging_config(), only_what_duckdb_needs():
        warnings.simplefilter("ignore", FutureWarning)  # google-cloud's Python 3.11 end-of-life notices
        # requests' check of its dependencies' versions, on the lock's chardet: nothing a run can act on
        warnings.filterwarnings("ignore", message=r"urllib3 \(.*\) or chardet \(.*\)/charset_normalizer")
        import airbyte

    if root.handlers != handlers_before:  # configured some other way than the one kept out
        from prefect.logging.configuration import setup_logging

        root.handlers = handlers_before
        setup_logging(incremental=False)
    _keep_pyairbyte_temp_files_private()
    return airbyte


@contextlib.contextmanager
def _without_airbyte_cdk_logging_config() -> Iterator[None]:
    """airbyte_cdk's entrypoint runs `logging.config.dictConfig` when imported: it closes every
    handler (https://github.com/python/cpython/issues/127567) and sends every log, Prefect's flow
    runs' included, through its JSON formatter on stdout, which is how a connector process talks
    to Airbyte. In this process it would print the run's own lines as JSON until they were put
    back. Only that configuration is skipped; any other passes through."""
    import logging.config

    configure = logging.config.dictConfig

    def dict_config(config: Any) -> None:
        formatters = config.get("formatters", {}) if isinstance(config, dict) else {}
        if any(str(formatter.get("()", "")).startswith("airbyte_cdk.") for formatter in formatters.values()):
            return
        configure(config)

    logging.config.dictConfig = dict_config
    try:
        yield
    finally:
        logging.config.dictConfig = configure


_PYAIRBYTE_TEMP = re.compile(r"^elt-airbyte\.(\d+)\.\w+$")
_pyairbyte_temp_lock = threading.Lock()


def _keep_pyairbyte_temp_files_private() -> None:
    """PyAirbyte writes each connector call's config (secrets resolved) to a world-readable file
    in the system temp folder and deletes it after the call. Point it at a folder only this
    process can read, removed when the process exits; a killed process's folder is removed here
    by the next one."""
    import atexit

    import psutil
    from airbyte._util import temp_files

    with _pyairbyte_temp_lock:
        if temp_files.TEMP_DIR_OVERRIDE is not None:
            return
        system_temp = Path(tempfile.gettempdir())
        for entry in system_temp.glob("elt-airbyte.*"):
            match = _PYAIRBYTE_TEMP.match(entry.name)
            if match and entry.is_dir() and not psutil.pid_exists(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=f"elt-airbyte.{os.getpid()}.", dir=system_temp))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        temp_files.TEMP_DIR_OVERRIDE = folder


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
