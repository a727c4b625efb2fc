"""The temporary Prefect server's database (src/elt/temporary_server.py): migrated once, reused
while current, migrated again when it is not, once when two runs start at once.

The fast tests put a stand-in for `prefect server database upgrade` in UPGRADE_COMMAND: a real
process that writes a real SQLite `alembic_version` (what Prefect's migration leaves) and logs
each call. The slow test runs Prefect's own migration and a real flow on the temporary server.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import types
from importlib.metadata import version
from pathlib import Path

import psutil
import pytest

from elt import temporary_server
from elt.temporary_server import CONNECTION_URL, MIGRATE_ON_START, PrefectDatabaseMigrationFailed, prepare

STAND_IN = textwrap.dedent(
    """
    import os, sqlite3, sys, time
    from pathlib import Path
    calls = Path(sys.argv[1])
    with calls.open("a") as log:
        log.write("migrate\\n")
    release = Path(sys.argv[2])
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    database = os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"].removeprefix("sqlite+aiosqlite:///")
    if os.environ.get("STAND_IN_FAILS"):
        print("sqlite3.OperationalError: disk I/O error", file=sys.stderr)
        sys.exit(1)
    connection = sqlite3.connect(database)
    connection.execute("create table if not exists alembic_version (version_num text)")
    connection.execute("delete from alembic_version")
    connection.execute("insert into alembic_version values ('rev-head')")
    connection.commit()
    """
)


@pytest.fixture
def migration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The stand-in migration; `calls()` counts its runs; it waits for `release` unless released."""
    script = tmp_path / "stand_in_upgrade.py"
    script.write_text(STAND_IN)
    calls, release = tmp_path / "calls.log", tmp_path / "release"
    release.touch()
    monkeypatch.setattr(temporary_server, "UPGRADE_COMMAND", [sys.executable, str(script), str(calls), str(release)])
    monkeypatch.setattr(temporary_server, "TEMPLATES", tmp_path / "venv-share-elt")  # none made: each test makes its own

    class Migration:
        def calls(self) -> int:
            return len(calls.read_text().splitlines()) if calls.exists() else 0

        def hold(self) -> None:
            release.unlink()

        def let_go(self) -> None:
            release.touch()

    return Migration()


def _environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}


def test_migrated_once_then_reused_without_migrating(tmp_path: Path, migration) -> None:
    data = tmp_path / "data"
    first, second = _environ(), _environ()

    assert prepare(data, first) == data / "prefect" / "prefect.db"
    assert prepare(data, second) == data / "prefect" / "prefect.db"

    assert migration.calls() == 1
    for environ in (first, second):
        assert environ[CONNECTION_URL] == f"sqlite+aiosqlite:///{data / 'prefect' / 'prefect.db'}"
        assert environ[MIGRATE_ON_START] == "false"


def test_another_prefect_version_migrates_again(tmp_path: Path, migration) -> None:
    data = tmp_path / "data"
    prepare(data, _environ())
    record = data / "prefect" / "migrated.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | {"prefect": "3.0.0"}))

    prepare(data, _environ())

    assert migration.calls() == 2


@pytest.mark.parametrize("change", ["deleted", "other revision"])
def test_a_database_that_changed_is_migrated_again(tmp_path: Path, migration, change: str) -> None:
    data = tmp_path / "data"
    prepare(data, _environ())
    database = data / "prefect" / "prefect.db"
    if change == "deleted":
        database.unlink()
    else:
        with sqlite3.connect(database) as connection:
            connection.execute("update alembic_version set version_num = 'rev-older'")

    environ = _environ()
    prepare(data, environ)

    assert migration.calls() == 2
    assert environ[MIGRATE_ON_START] == "false"


def test_a_new_database_is_a_copy_of_the_template_make_venv_migrated(tmp_path: Path, migration) -> None:
    template = temporary_server.make_template(_environ())
    assert template == tmp_path / "venv-share-elt" / f"prefect-{version('prefect')}.db"
    assert temporary_server.make_template(_environ()) == template  # kept: made once per Prefect
    assert migration.calls() == 1

    for data in (tmp_path / "one", tmp_path / "two"):
        environ = _environ()
        database = prepare(data, environ)
        assert database is not None
        with sqlite3.connect(database) as connection:
            assert connection.execute("select version_num from alembic_version").fetchall() == [("rev-head",)]
        assert json.loads((data / "prefect" / "migrated.json").read_text()) == {
            "prefect": version("prefect"),
            "revision": "rev-head",
        }
        assert environ[MIGRATE_ON_START] == "false"
    assert migration.calls() == 1  # neither run migrated


def test_an_existing_database_is_migrated_in_place_and_keeps_its_runs_despite_a_template(tmp_path: Path, migration) -> None:
    temporary_server.make_template(_environ())
    data = tmp_path / "data"
    database = data / "prefect" / "prefect.db"
    database.parent.mkdir(parents=True)
    with sqlite3.connect(database) as connection:
        connection.execute("create table flow_run (name text)")
        connection.execute("insert into flow_run values ('last night''s all-etl')")
        connection.execute("create table alembic_version (version_num text)")
        connection.execute("insert into alembic_version values ('rev-older')")

    prepare(data, _environ())

    assert migration.calls() == 2  # the template's, then this database's own
    with sqlite3.connect(database) as connection:
        assert connection.execute("select name from flow_run").fetchall() == [("last night's all-etl",)]
        assert connection.execute("select version_num from alembic_version").fetchall() == [("rev-head",)]


def test_a_copy_that_fails_names_both_files_and_leaves_no_database(tmp_path: Path, migration, monkeypatch) -> None:
    temporary_server.make_template(_environ())
    data = tmp_path / "data"

    def connect(path: object, *args: object, **kwargs: object) -> sqlite3.Connection:
        if str(path).endswith(".copying"):
            raise sqlite3.OperationalError("database or disk is full")
        return sqlite3.connect(path, *args, **kwargs)

    monkeypatch.setattr(temporary_server, "sqlite3", types.SimpleNamespace(connect=connect, Error=sqlite3.Error))
    with pytest.raises(PrefectDatabaseMigrationFailed) as raised:
        prepare(data, _environ())

    template = tmp_path / "venv-share-elt" / f"prefect-{version('prefect')}.db"
    assert str(raised.value) == (
        f"copying the migrated Prefect database {template} to {data / 'prefect' / 'prefect.db'} failed: "
        f"database or disk is full; free space in {data / 'prefect'}, or set PREFECT_API_URL to a running Prefect server"
    )
    assert sorted(path.name for path in (data / "prefect").iterdir()) == [".migrate.lock"]


def test_another_prefects_template_is_not_used(tmp_path: Path, migration) -> None:
    other = tmp_path / "venv-share-elt" / "prefect-3.0.0.db"
    other.parent.mkdir(parents=True)
    with sqlite3.connect(other) as connection:
        connection.execute("create table alembic_version (version_num text)")
        connection.execute("insert into alembic_version values ('rev-of-3.0.0')")

    database = prepare(tmp_path / "data", _environ())

    assert migration.calls() == 1
    with sqlite3.connect(database) as connection:
        assert connection.execute("select version_num from alembic_version").fetchall() == [("rev-head",)]


def test_two_runs_starting_at_once_migrate_once(tmp_path: Path, migration) -> None:
    data = tmp_path / "data"
    migration.hold()
    environs = [_environ(), _environ()]
    errors: list[BaseException] = []

    def run(environ: dict[str, str]) -> None:
        try:
            prepare(data, environ)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which fails on it
            errors.append(exc)

    first = threading.Thread(target=run, args=(environs[0],))
    first.start()
    _wait_for(lambda: migration.calls() == 1, "the first run's migration to start")
    second = threading.Thread(target=run, args=(environs[1],))
    second.start()  # finds the database not migrated yet, while the first run migrates it
    migration.let_go()
    for thread in (first, second):
        thread.join(timeout=60)
        assert not thread.is_alive(), "prepare did not return"

    assert errors == []
    assert migration.calls() == 1
    assert [environ[MIGRATE_ON_START] for environ in environs] == ["false", "false"]


def test_a_run_killed_while_migrating_does_not_leave_the_migration_running(tmp_path: Path, migration) -> None:
    migration.hold()
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from elt import temporary_server\n"
        f"temporary_server.UPGRADE_COMMAND = {temporary_server.UPGRADE_COMMAND!r}\n"
        f"temporary_server.TEMPLATES = Path({str(temporary_server.TEMPLATES)!r})\n"
        "temporary_server.prepare(Path(sys.argv[1]), {})\n"
    )
    run = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data")])
    _wait_for(lambda: migration.calls() == 1, "the run's migration to start")
    (stand_in,) = [child for child in psutil.Process(run.pid).children() if "stand_in_upgrade" in " ".join(child.cmdline())]

    run.kill()
    run.wait()

    _wait_for(lambda: not stand_in.is_running() or stand_in.status() == psutil.STATUS_ZOMBIE, "the migration to end", 30)


@pytest.mark.parametrize(
    "chosen",
    [
        {"PREFECT_API_URL": "http://prefect:4200/api"},
        {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://prefect@db/prefect"},
        {"PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "true"},
    ],
)
def test_left_alone_when_the_user_chose(tmp_path: Path, migration, chosen: dict[str, str]) -> None:
    environ = _environ() | chosen

    assert prepare(tmp_path / "data", environ) is None

    assert environ == _environ() | chosen
    assert migration.calls() == 0


def test_failed_migration_names_the_database_and_the_fix(tmp_path: Path, migration, monkeypatch) -> None:
    monkeypatch.setenv("STAND_IN_FAILS", "1")
    data = tmp_path / "data"
    environ = _environ() | {"STAND_IN_FAILS": "1"}

    with pytest.raises(PrefectDatabaseMigrationFailed) as error:
        prepare(data, environ)

    folder = data / "prefect"
    assert str(error.value) == (
        f"migrating the temporary Prefect server's database {folder / 'prefect.db'} failed: "
        f"sqlite3.OperationalError: disk I/O error; remove {folder} to start from an empty one, "
        "or set PREFECT_API_URL to a running Prefect server"
    )
    assert MIGRATE_ON_START not in environ and CONNECTION_URL not in environ
    assert not (folder / "migrated.json").exists()


@pytest.mark.slow
def test_a_flow_runs_on_the_temporary_server_elt_run_starts(tmp_path: Path) -> None:
    """Prefect's own migration, then `elt run`'s way of starting the temporary server: a real
    flow runs on it, the run's process never imports Prefect's server, and the server ends with it."""
    data = tmp_path / "data"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from elt import temporary_server\n"
        "temporary_server.prepare(Path(sys.argv[1]))\n"
        "server = temporary_server.start()\n"
        "with server.wait_and_use():\n"
        "    from prefect import flow\n"
        "    @flow\n"
        "    def hello():\n"
        "        return 'ran'\n"
        "    print(hello(), server.process.pid, 'prefect.server.api.server' in sys.modules)\n"
    )
    environ = _environ() | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(data)],
        env=environ | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"},
        capture_output=True,
        text=True,
        timeout=900,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    result, server_pid, imported_server = completed.stdout.strip().splitlines()[-1].split()
    assert (result, imported_server) == ("ran", "False")
    assert not psutil.pid_exists(int(server_pid)) or psutil.Process(int(server_pid)).status() == psutil.STATUS_ZOMBIE
    recorded = json.loads((data / "prefect" / "migrated.json").read_text())
    with sqlite3.connect(data / "prefect" / "prefect.db") as connection:
        assert connection.execute("select version_num from alembic_version").fetchone() == (recorded["revision"],)
        assert connection.execute("select name from flow where name = 'hello'").fetchone() == ("hello",)


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.05)
