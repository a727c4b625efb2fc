"""Backup and restore of the DuckDB warehouse, consistent while the appliance runs.

A backup waits for the warehouse's run lock (a running all-etl finishes first; one that starts
meanwhile is refused, naming the backup), copies the file and its write-ahead log, then opens
the copy once: DuckDB folds the log into it and proves it is a database. A restore takes the
same lock, checks the backup opens, and swaps it in with one rename, so a failed restore leaves
the warehouse as it was. Prefect's database is backed up by docker/backup.sh with pg_dump.

Snowflake keeps its own history (Time Travel, zero-copy clones): nothing to copy here.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

from elt import run_lock
from elt.errors import ConfigurationError, EltError
from elt.settings import Settings
from elt.warehouse import warehouse_for
from elt.warehouse_duckdb import DuckDBWarehouse

STDIO = Path("-")


class BackupUnusable(EltError):
    pass


def backup_warehouse(settings: Settings, destination: Path, wait_seconds: float) -> int:
    """Write a consistent copy of the warehouse to `destination` ('-': stdout); its size in bytes."""
    warehouse = _duckdb(settings)
    if not warehouse.path.exists():
        raise EltError(f"ELT_DUCKDB_PATH={warehouse.path} does not exist: nothing to back up yet (no run has loaded it)")
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=warehouse.path.parent) as scratch:
        copy = Path(scratch) / warehouse.path.name
        with run_lock.hold_for_task(settings, "warehouse backup", wait_seconds):
            shutil.copy2(warehouse.path, copy)
            wal = _wal(warehouse.path)
            if wal.exists():
                shutil.copy2(wal, _wal(copy))
        _check_opens(copy, f"the copy of {warehouse.path}", write=True)
        if destination == STDIO:
            return _stream(copy, sys.stdout.buffer)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        shutil.copyfile(copy, partial)
        partial.replace(destination)
        return destination.stat().st_size


def restore_warehouse(settings: Settings, source: Path) -> int:
    """Replace the warehouse with the backup `source` ('-': stdin); refused while a run uses it."""
    warehouse = _duckdb(settings)
    warehouse.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=warehouse.path.parent) as scratch:
        incoming = Path(scratch) / warehouse.path.name
        if source == STDIO:
            with incoming.open("wb") as out:
                _stream_into(sys.stdin.buffer, out)
            shown = "the backup on stdin"
        else:
            if not source.is_file():
                raise BackupUnusable(f"{source}: no such backup file")
            shutil.copyfile(source, incoming)
            shown = str(source)
        _check_opens(incoming, shown, write=False)
        with run_lock.hold_for_task(settings, "warehouse restore", wait_seconds=0):
            _wal(warehouse.path).unlink(missing_ok=True)
            incoming.replace(warehouse.path)
    return warehouse.path.stat().st_size


def _duckdb(settings: Settings) -> DuckDBWarehouse:
    warehouse = warehouse_for(settings)
    if not isinstance(warehouse, DuckDBWarehouse):
        raise ConfigurationError(
            f"ELT_WAREHOUSE={settings.warehouse.value}: {warehouse.name} keeps its own backups "
            "(Time Travel, zero-copy clones); only a DuckDB warehouse is backed up by the appliance"
        )
    return warehouse


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _check_opens(path: Path, shown: str, *, write: bool) -> None:
    """Open it as DuckDB (a writable open folds a copied write-ahead log into the file)."""
    import duckdb

    try:
        with closing(duckdb.connect(str(path), read_only=not write)) as connection:
            connection.execute("select count(*) from information_schema.tables").fetchone()
            if write:
                connection.execute("checkpoint")
    except duckdb.Error as exc:
        raise BackupUnusable(
            f"{shown} is not a usable DuckDB database ({str(exc).splitlines()[0]}); the warehouse is unchanged"
        ) from None


def _stream(path: Path, out: BinaryIO) -> int:
    with path.open("rb") as source:
        size = _stream_into(source, out)
    out.flush()
    return size


def _stream_into(source: BinaryIO, out: BinaryIO) -> int:
    size = 0
    while chunk := source.read(1 << 20):
        out.write(chunk)
        size += len(chunk)
    return size
