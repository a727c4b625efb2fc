"""The database of the temporary Prefect server `elt run` starts when PREFECT_API_URL is unset.

Prefect's temporary server migrates its SQLite database each time it starts: about 20 s on a
fresh database and 1–2 s more on every later start just to find it at the head revision. Here
the database lives under the data folder (`<data>/prefect/prefect.db`, removed by `make clean`
with the rest of the run state) and is migrated once per Prefect version, before Prefect
starts, under a file lock: two runs starting at once migrate it once, the second waiting for
the first. Each later run checks it is still current (the Prefect version recorded when it was
migrated, and the revision the database itself holds) and starts the server without migrating.
A database that was deleted, replaced or migrated by another Prefect version is migrated again.
Where there is no database yet, it is a copy of the one `make venv` migrated once for the
installed Prefect (`python -m elt.temporary_server`, into the virtualenv's share/elt): a first
`make demo` does not spend Prefect's ~20 s of migrations; without that copy it migrates.

`start` then starts that server the way Prefect's own temporary server starts (the same uvicorn
command, prefect/server/api/server.py `SubprocessASGIServer`), but at the start of `elt run`, so
that it comes up while this process imports Prefect, the flows and PyAirbyte, and without
importing Prefect's whole server into this process (Prefect's client does, to launch it).

Left alone when the user chose the database (PREFECT_SERVER_DATABASE_CONNECTION_URL or
PREFECT_API_DATABASE_CONNECTION_URL) or whether to migrate, or runs against a server (PREFECT_API_URL).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, MutableMapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from elt import processes
from elt.errors import ConfigurationError, TransientError

CONNECTION_URL = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
MIGRATE_ON_START = "PREFECT_SERVER_DATABASE_MIGRATE_ON_START"
_USER_CHOICES = (
    "PREFECT_API_URL",
    CONNECTION_URL,
    "PREFECT_API_DATABASE_CONNECTION_URL",
    MIGRATE_ON_START,
    "PREFECT_API_DATABASE_MIGRATE_ON_START",
)


# Prefect's own migration command; the tests put a stand-in here.
UPGRADE_COMMAND = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "--yes"]
# Where `make venv` leaves a database migrated for each installed Prefect (`template`).
TEMPLATES = Path(sys.prefix) / "share" / "elt"


class PrefectDatabaseMigrationFailed(ConfigurationError):
    pass


class TemporaryServerDidNotStart(TransientError):
    pass


def prepare(data_dir: Path, environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Point the temporary server at `<data_dir>/prefect/prefect.db`, migrated and current, and
    tell it not to migrate again. Returns the database, or None when the user chose otherwise."""
    if any(environ.get(name) for name in _USER_CHOICES):
        return None
    folder = data_dir / "prefect"
    database = folder / "prefect.db"
    environment = {**environ, CONNECTION_URL: f"sqlite+aiosqlite:///{database}"}
    if not _is_current(folder, database):
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / ".migrate.lock"):
            if not _is_current(folder, database):  # another run may have migrated it meanwhile
                _migrate(folder, database, environment)
    environ[CONNECTION_URL] = environment[CONNECTION_URL]
    environ[MIGRATE_ON_START] = "false"
    return database


def _is_current(folder: Path, database: Path) -> bool:
    try:
        recorded = json.loads((folder / "migrated.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and recorded.get("prefect") == version("prefect")
        and recorded.get("revision") is not None
        and recorded.get("revision") == _revision(database)
    )


def _revision(database: Path) -> str | None:
    """The Alembic revision the database holds; None for a missing or unmigrated database."""
    if not database.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            row = connection.execute("select version_num from alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _migrate(folder: Path, database: Path, environment: dict[str, str]) -> None:
    """A new database is a copy of the installed template, if any; else Prefect's own `prefect
    server database upgrade` migrates it (an existing one always, in place: its runs are kept).
    Then record what it left."""
    (folder / "migrated.json").unlink(missing_ok=True)
    template = template_path()
    if not database.exists() and _revision(template) is not None:
        for leftover in (database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
            leftover.unlink(missing_ok=True)  # a deleted database's log must not be replayed into the copy
        copying = database.with_name(f".{database.name}.copying")
        try:
            copying.unlink(missing_ok=True)
            # SQLite's backup copies what the template holds, its write-ahead log included.
            with (
                contextlib.closing(sqlite3.connect(f"file:{template}?mode=ro", uri=True)) as source,
                contextlib.closing(sqlite3.connect(copying)) as target,
            ):
                source.backup(target)
            os.replace(copying, database)
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(OSError):
                copying.unlink(missing_ok=True)
            raise PrefectDatabaseMigrationFailed(
                f"copying the migrated Prefect database {template} to {database} failed: {exc}; "
                f"free space in {folder}, or set PREFECT_API_URL to a running Prefect server"
            ) from exc
    else:
        _upgrade(database, environment)
    revision = _revision(database)
    if revision is None:
        raise PrefectDatabaseMigrationFailed(
            f"migrating the temporary Prefect server's database {database} failed: no revision recorded; "
            f"remove {folder} to start from an empty one, or set PREFECT_API_URL to a running Prefect server"
        )
    record = folder / ".migrated.json.writing"
    record.write_text(json.dumps({"prefect": version("prefect"), "revision": revision}))
    os.replace(record, folder / "migrated.json")


def _upgrade(database: Path, environment: dict[str, str]) -> None:
    completed = subprocess.run(
        UPGRADE_COMMAND,
        env=environment | {MIGRATE_ON_START: "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        capture_output=True,
        text=True,
        preexec_fn=processes.die_with_parent,  # a run killed meanwhile does not leave it migrating
    )
    if completed.returncode != 0 or _revision(database) is None:
        tail = " | ".join(line.strip() for line in (completed.stderr or completed.stdout).strip().splitlines()[-3:])
        raise PrefectDatabaseMigrationFailed(
            f"migrating the temporary Prefect server's database {database} failed: {tail or 'no revision recorded'}; "
            f"remove {database.parent} to start from an empty one, or set PREFECT_API_URL to a running Prefect server"
        )


def template_path() -> Path:
    return TEMPLATES / f"prefect-{version('prefect')}.db"


def make_template(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Migrate a new database for the installed Prefect into TEMPLATES (once: kept while it holds
    a revision), which a run's new database then copies."""
    template = template_path()
    if _revision(template) is not None:
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with _locked(template.parent / ".template.lock"):
        if _revision(template) is None:
            migrating = template.with_name(f".{template.name}.{os.getpid()}")
            migrating.unlink(missing_ok=True)
            clean = {key: value for key, value in environ.items() if key not in _USER_CHOICES}
            _upgrade(migrating, {**clean, CONNECTION_URL: f"sqlite+aiosqlite:///{migrating}"})
            with contextlib.closing(sqlite3.connect(migrating)) as connection:
                connection.execute("pragma journal_mode = delete")  # its write-ahead log folded in, the files removed
            os.replace(migrating, template)
    return template


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TemporaryServer:
    """Prefect's temporary server, a child of this process, stopped when the process exits
    (a killed run's watchdog stops it, src/elt/processes.py)."""

    def __init__(self, environ: dict[str, str]) -> None:
        self._environ = environ
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process = self._launch()
        atexit.register(self.stop)

    def _launch(self) -> subprocess.Popen[bytes]:
        import prefect

        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(Path(prefect.__file__).parent.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=self._environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
            preexec_fn=processes.die_with_parent,  # started and stopped by the run's main thread
        )

    def wait_until_healthy(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.process.poll() == 3:  # uvicorn: the port was taken meanwhile
                self.port = _free_port()
                self.api_url = f"http://127.0.0.1:{self.port}/api"
                self.process = self._launch()
            elif self.process.poll() is not None or time.monotonic() > deadline:
                how = (
                    f"exited with code {self.process.returncode}"
                    if self.process.poll() is not None
                    else f"not healthy after {timeout_seconds:.0f} s"
                )
                raise TemporaryServerDidNotStart(
                    f"the temporary Prefect server {how}; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
                    "if the machine is busy, or set PREFECT_API_URL to a running Prefect server"
                )
            time.sleep(0.1)

    def wait_and_use(self) -> contextlib.AbstractContextManager[Any]:
        """Once healthy, this process's Prefect API (its settings are read once, at import)."""
        from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

        # The environment's value even when Prefect read its settings before it was set.
        chosen = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
        self.wait_until_healthy(float(chosen) if chosen else get_current_settings().server.ephemeral.startup_timeout_seconds)
        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(environ: MutableMapping[str, str] = os.environ) -> TemporaryServer | None:
    """Start the temporary server when no Prefect server is configured (PREFECT_API_URL in the
    environment, .env or the Prefect profile); None when one is."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    return TemporaryServer({**environ, **settings.to_environment_variables(exclude_unset=True)})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    print(f"temporary Prefect server's database template: {make_template()}")
