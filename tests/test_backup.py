"""`elt warehouse backup` / `restore` on a real DuckDB file, through the real CLI, with a real
flock held by a real second process standing in for a running all-etl."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import duckdb
import pytest

from elt import run_lock
from elt.settings import load_settings
from tests.conftest import BIN
from tests.test_run_lock import _holder

RUN_ID = "11111111-1111-1111-1111-111111111111"


def _elt(home: Path, *args: str, stdin: bytes | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "elt"), "warehouse", *args],
        env={**os.environ, "ELT_HOME": str(home), **env},
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def _warehouse(home: Path, rows: int, *, checkpoint: bool = True, path: Path | None = None) -> Path:
    """A warehouse with `rows` orders (in home's data folder, or at `path`); without a checkpoint
    the last writes are only in its WAL."""
    path = path or home / "data" / "warehouse.duckdb"
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = duckdb.connect(str(path))
    if not checkpoint:
        connection.execute("pragma disable_checkpoint_on_shutdown")
        connection.execute("pragma wal_autocheckpoint='1TB'")
    connection.execute("create schema if not exists main_marts")
    connection.execute("create or replace table main_marts.orders as select range as id from range(?)", [rows])
    connection.close()
    return path


def _orders(path: Path) -> int:
    with duckdb.connect(str(path), read_only=True) as connection:
        return connection.execute("select count(*) from main_marts.orders").fetchone()[0]


def test_backup_then_restore_brings_back_what_the_warehouse_held(tmp_path: Path) -> None:
    """The last writes were only in the write-ahead log: the backup holds them anyway."""
    path = _warehouse(tmp_path, 7, checkpoint=False)
    assert Path(f"{path}.wal").exists(), "the test needs writes that are only in the WAL"
    backup = tmp_path / "backups" / "warehouse.duckdb"
    made = _elt(tmp_path, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert made.stderr.decode().strip() == f"warehouse backup: {backup.stat().st_size} bytes to {backup}"
    assert _orders(backup) == 7

    _warehouse(tmp_path, 100)
    restored = _elt(tmp_path, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr.decode().strip() == f"warehouse restored: {path.stat().st_size} bytes from {backup}"
    assert _orders(path) == 7
    assert not Path(f"{path}.wal").exists()


def test_backup_and_restore_stream_through_stdout_and_stdin(tmp_path: Path) -> None:
    """What docker/backup.sh and restore.sh do through `docker compose exec -T`."""
    path = _warehouse(tmp_path, 5)
    made = _elt(tmp_path, "backup", "-")
    assert made.returncode == 0, made.stderr
    assert made.stdout[8:12] == b"DUCK", "stdout is not a DuckDB file"
    _warehouse(tmp_path, 9)
    restored = _elt(tmp_path, "restore", "-", stdin=made.stdout)
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr.decode().strip().endswith("bytes from stdin")
    assert _orders(path) == 5


def test_a_backup_waits_for_the_running_all_etl_and_gives_up_naming_it(tmp_path: Path) -> None:
    path = _warehouse(tmp_path, 3)
    run = _holder(tmp_path, RUN_ID)
    try:
        refused = _elt(tmp_path, "backup", str(tmp_path / "b.duckdb"), "--wait", "1")
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            f"error: another all-etl run (flow run {RUN_ID}, PID {run.pid}) still holds {path} after 1 s; "
            "the warehouse backup did not start: run it again when that ends"
        )
        assert not (tmp_path / "b.duckdb").exists()

        waiting = subprocess.Popen(
            [str(BIN / "elt"), "warehouse", "backup", str(tmp_path / "b.duckdb"), "--wait", "60"],
            env={**os.environ, "ELT_HOME": str(tmp_path)},
            stderr=subprocess.PIPE,
        )
    finally:
        run.kill()
        run.wait()
    assert waiting.wait(timeout=90) == 0, waiting.stderr.read() if waiting.stderr else ""
    assert _orders(tmp_path / "b.duckdb") == 3


def test_a_run_that_starts_during_a_backup_is_refused_naming_the_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    settings = load_settings()
    with (
        run_lock.hold_for_task(settings, "warehouse backup", wait_seconds=0),
        pytest.raises(run_lock.WarehouseInUse) as refused,
        run_lock.hold(settings, RUN_ID),
    ):
        pytest.fail("a run got the lock during a backup")
    assert str(refused.value) == (
        f"the warehouse backup (PID {os.getpid()}) is using {tmp_path / 'data' / 'warehouse.duckdb'}; wait for it or cancel it"
    )
    with run_lock.hold(settings, RUN_ID):  # and once the backup is done, a run starts
        pass


def test_a_dead_runs_record_outlives_a_backup_so_the_next_run_marks_it_crashed(tmp_path: Path) -> None:
    _warehouse(tmp_path, 1)
    lock = tmp_path / "data" / "warehouse.duckdb.run.lock"
    dead = {"flow_run_id": RUN_ID, "pid": 999999, "started": "2026-01-01T00:00:00+00:00", "watchdog_pid": None, "task": None}
    lock.write_text(json.dumps(dead))
    assert _elt(tmp_path, "backup", str(tmp_path / "b.duckdb")).returncode == 0
    assert json.loads(lock.read_text()) == dead


def test_a_backup_that_is_not_a_database_is_refused_and_the_warehouse_kept(tmp_path: Path) -> None:
    path = _warehouse(tmp_path, 4)
    broken = tmp_path / "prefect.dump"
    broken.write_bytes(b"PGDMP not a duckdb file" * 100)
    refused = _elt(tmp_path, "restore", str(broken))
    assert refused.returncode == 1
    message = refused.stderr.decode().strip()
    assert message.startswith(f"error: {broken} is not a usable DuckDB database (")
    assert message.endswith("); the warehouse is unchanged")
    assert _orders(path) == 4

    missing = _elt(tmp_path, "restore", str(tmp_path / "nope.duckdb"))
    assert missing.stderr.decode().strip() == f"error: {tmp_path / 'nope.duckdb'}: no such backup file"


def test_a_restore_during_a_run_is_refused_and_the_warehouse_kept(tmp_path: Path) -> None:
    path = _warehouse(tmp_path, 4)
    backup = tmp_path / "b.duckdb"
    assert _elt(tmp_path, "backup", str(backup)).returncode == 0
    _warehouse(tmp_path, 6)
    run = _holder(tmp_path, RUN_ID)
    try:
        refused = _elt(tmp_path, "restore", str(backup))
    finally:
        run.kill()
        run.wait()
    assert refused.returncode == 1
    assert refused.stderr.decode().strip() == (
        f"error: another all-etl run (flow run {RUN_ID}, PID {run.pid}) still holds {path} after 0 s; "
        "the warehouse restore did not start: run it again when that ends"
    )
    assert _orders(path) == 6


def test_snowflake_is_not_backed_up_here(tmp_path: Path) -> None:
    refused = _elt(tmp_path, "backup", str(tmp_path / "b.duckdb"), ELT_WAREHOUSE="snowflake")
    assert refused.returncode == 1
    assert refused.stderr.decode().strip() == (
        "error: ELT_WAREHOUSE=snowflake: Snowflake keeps its own backups (Time Travel, zero-copy clones); "
        "only a DuckDB warehouse is backed up by the appliance"
    )


def test_an_environments_warehouse_is_backed_up_and_restored_and_the_default_is_untouched(tmp_path: Path) -> None:
    """`--env staging` (environments/staging.env names its own data folder) copies and replaces
    staging's warehouse only, as docker/backup.sh and restore.sh do for every environment."""
    default = _warehouse(tmp_path, 3)
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "staging.env").write_text(f"ELT_DATA_DIR={tmp_path / 'staging-data'}\n")
    staging = _warehouse(tmp_path, 5, path=tmp_path / "staging-data" / "warehouse.duckdb")
    backup = tmp_path / "backups" / "warehouse-staging.duckdb"

    made = _elt(tmp_path, "backup", "--env", "staging", str(backup))
    assert made.returncode == 0, made.stderr
    assert _orders(backup) == 5
    with duckdb.connect(str(staging)) as connection:
        connection.execute("insert into main_marts.orders select 99")
    restored = _elt(tmp_path, "restore", "--env", "staging", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr.decode().strip() == f"warehouse restored: {staging.stat().st_size} bytes from {backup}"
    assert (_orders(staging), _orders(default)) == (5, 3)

    missing = _elt(tmp_path, "backup", "--env", "prod", "-")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == (
        f"error: ELT_ENV=prod: {tmp_path / 'environments' / 'prod.env'} does not exist (environments defined: staging); "
        "create it or choose another"
    )


FAKE_COMPOSE = """#!/usr/bin/env bash
# Stands in for docker/compose.sh: `exec -T prefect-worker CMD...` and `run ... prefect-worker CMD...`
# run CMD here; PostgreSQL's pg_dump and pg_restore copy stdin/stdout; the rest does nothing.
set -euo pipefail
case "$*" in
  *"prefect-worker elt "*) args=("$@"); while [ "${args[0]}" != elt ]; do args=("${args[@]:1}"); done; exec "$ELT_BIN" "${args[@]:1}" ;;
  *pg_dump*) echo "a database dump" ;;
  *pg_restore*) cat >/dev/null ;;
  *pg_isready*) ;;
esac
"""


@pytest.mark.slow  # five `elt` processes
def test_backup_sh_and_restore_sh_copy_every_environments_warehouse(tmp_path: Path) -> None:
    """docker/backup.sh and restore.sh as they are, with a stand-in compose.sh that runs the
    worker's `elt warehouse` command on this machine (the compose stack's backup test runs them
    for real, with the default environment only): one warehouse-<name>.duckdb per DuckDB
    environment, none for one on Snowflake, each restored into its own environment."""
    checkout = tmp_path / "checkout"
    (checkout / "docker").mkdir(parents=True)
    for script in ("backup.sh", "restore.sh"):
        (checkout / "docker" / script).write_bytes((Path(__file__).parents[1] / "docker" / script).read_bytes())
        (checkout / "docker" / script).chmod(0o755)
    (checkout / "docker" / "compose.sh").write_text(FAKE_COMPOSE)
    (checkout / "docker" / "compose.sh").chmod(0o755)
    (checkout / "environments").mkdir()
    (checkout / "environments" / "staging.env").write_text(f"ELT_DATA_DIR={checkout / 'staging-data'}\n")
    (checkout / "environments" / "prod-snowflake.env").write_text("ELT_WAREHOUSE=snowflake\n")
    default = _warehouse(checkout, 3)
    staging = _warehouse(checkout, 5, path=checkout / "staging-data" / "warehouse.duckdb")
    env = {**os.environ, "ELT_HOME": str(checkout), "ELT_BIN": str(BIN / "elt")}

    backed_up = subprocess.run(
        [str(checkout / "docker" / "backup.sh"), str(tmp_path / "backups")], env=env, capture_output=True, text=True, timeout=300
    )
    assert backed_up.returncode == 0, backed_up.stderr
    folder = Path(backed_up.stdout.strip().splitlines()[-1].removeprefix("backed up to "))
    assert sorted(path.name for path in folder.iterdir()) == ["prefect.dump", "warehouse-staging.duckdb", "warehouse.duckdb"]
    assert (
        "warehouse of environment prod-snowflake: ELT_WAREHOUSE=snowflake keeps its own backups; not copied" in backed_up.stdout
    )
    assert (_orders(folder / "warehouse.duckdb"), _orders(folder / "warehouse-staging.duckdb")) == (3, 5)

    _warehouse(checkout, 100)
    with duckdb.connect(str(staging)) as connection:
        connection.execute("delete from main_marts.orders")
    restored = subprocess.run(
        [str(checkout / "docker" / "restore.sh"), str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert restored.returncode == 0, restored.stderr
    assert f"warehouse of environment staging: restored from {folder / 'warehouse-staging.duckdb'}" in restored.stdout
    assert (_orders(default), _orders(staging)) == (3, 5)
