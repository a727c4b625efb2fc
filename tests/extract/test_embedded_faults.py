"""The embedded backend under faults: real source-faker syncs through PyAirbyte into real DuckDB
(and fakesnow standing in for Snowflake, where marked), real pip installs from PyPI."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from elt import warehouse_snowflake
from elt.extract.embedded import (
    ConnectorInstallFailed,
    ConnectorInstallUnreachable,
    EmbeddedBackend,
    EmbeddedSyncCancelled,
    EmbeddedSyncFailed,
    UnknownStream,
)
from elt.settings import load_settings
from elt.warehouse_snowflake import SnowflakeCredentials
from tests.conftest import BIN, CONNECTORS_DIR

FAKER = "airbyte-source-faker==7.2.1"


def _write_connections(
    path: Path,
    *,
    count: int,
    pip: str | None = FAKER,
    executable: Path | None = None,
    streams: str = "[users]",
    extra_config: str = "",
) -> Path:
    source = f"pip: {pip}" if executable is None else f"executable: {executable}"
    path.write_text(
        "connections:\n"
        "  - name: faker\n"
        "    source:\n"
        "      connector: source-faker\n"
        f"      {source}\n"
        f"      config: {{count: {count}, seed: 42, parallelism: 1{extra_config}}}\n"
        f"    streams: {streams}\n"
        "    destination: {schema: raw_faker}\n"
    )
    return path


def _backend(home: Path, connectors_dir: Path = CONNECTORS_DIR, **connections) -> EmbeddedBackend:
    path = _write_connections(home / "connections.yaml", **connections)
    return EmbeddedBackend(load_settings(home=home, airbyte_connections_file=path, connectors_dir=connectors_dir))


def _users(home: Path) -> tuple[int, int]:
    """Row count and highest id of raw_faker.users in the DuckDB warehouse."""
    with duckdb.connect(str(home / "data" / "warehouse.duckdb"), read_only=True) as connection:
        return connection.execute("select count(*), max(id) from raw_faker.users").fetchone()


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


def _connector_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any("source-faker" in part for part in process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass
    return found


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _files_holding(secret: str, folders: list[Path], since: float) -> list[Path]:
    """Files under `folders` changed since `since` whose bytes contain `secret`. A filesystem
    mounted below a folder is not walked: a chroot's /proc, say, whose /proc/kmsg blocks a read
    (the appliance lane's debootstrap once mounted one in /tmp while this scanned it)."""
    holding = []
    for folder in folders:
        device = folder.stat().st_dev
        # os.walk skips a folder that vanishes while it walks (the other lane's tests write in /tmp).
        for parent, folders_below, names in os.walk(folder):
            folders_below[:] = [name for name in folders_below if _on_device(Path(parent) / name, device)]
            for path in (Path(parent) / name for name in names):
                try:
                    if path.is_file() and path.stat().st_mtime >= since and secret.encode() in path.read_bytes():
                        holding.append(path)
                except OSError:  # another process's file, gone or unreadable
                    pass
    return holding


def _on_device(path: Path, device: int) -> bool:
    try:
        return path.lstat().st_dev == device
    except OSError:
        return False


def _crashing_connector(folder: Path, lines: int) -> Path:
    """source-faker itself, except that its `read` dies after `lines` messages (a connector crash)."""
    real = CONNECTORS_DIR / "source-faker" / "bin" / "source-faker"
    script = folder / "source-faker-crashing"
    script.write_text(f'#!/bin/sh\nif [ "$1" = read ]; then {real} "$@" | head -n {lines}; exit 3; fi\nexec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.slow
def test_full_refresh_leaves_exactly_what_the_source_emitted(tmp_path: Path) -> None:
    """1,500 users synced, then a full refresh of a source now emitting 1,000: 1,000 rows, not 1,500."""
    _backend(tmp_path, count=1500).sync("faker", full_refresh=False)
    assert _users(tmp_path) == (1500, 1500)

    result = _backend(tmp_path, count=1000).sync("faker", full_refresh=True)

    assert result.rows_per_stream == {"users": 1000}
    assert _users(tmp_path) == (1000, 1000)


@pytest.mark.slow
def test_incremental_streams_are_named_with_elts_way_to_a_full_refresh_not_pyairbytes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """From the second sync on, PyAirbyte's own notice tells the user to pass `force_full_refresh=True` to `read()`,
    which nobody running elt can do."""
    _backend(tmp_path, count=100, streams="[users, products]").sync("faker", full_refresh=False)
    capfd.readouterr()
    with caplog.at_level("INFO", logger="elt.extract.embedded"):  # the second sync has a state
        _backend(tmp_path, count=100, streams="[users, products]").sync("faker", full_refresh=False)

    assert "force_full_refresh" not in capfd.readouterr().err
    assert (
        "connection 'faker': incremental streams products, users (a full refresh: `elt run --full-refresh`, "
        "or all-etl's full_refresh parameter)"
    ) in [record.getMessage() for record in caplog.records]


@pytest.mark.slow
def test_full_refresh_on_snowflake_publishes_exactly_what_the_source_emitted(tmp_path: Path, snowflake_env) -> None:
    """The same on Snowflake (fakesnow): the DuckDB staging is exact, so the published table is."""
    _backend(tmp_path, count=1500).sync("faker", full_refresh=False)
    _backend(tmp_path, count=1000).sync("faker", full_refresh=True)

    with warehouse_snowflake.connect(SnowflakeCredentials.from_settings(load_settings(home=tmp_path))) as connection:
        rows = connection.cursor().execute("select count(*), max(id) from ANALYTICS.raw_faker.users").fetchone()
    assert tuple(rows) == (1000, 1000)


@pytest.mark.slow
def test_crashed_full_refresh_keeps_the_previous_table_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connector that dies mid-read during a full refresh: the sync fails, naming the
    connection; the table keeps the previous sync's rows, not a part of the new ones; no record
    files or resolved config outlive the sync."""
    secret = secrets.token_hex(16)
    monkeypatch.setenv("FAKER_API_TOKEN", secret)
    _backend(tmp_path, count=200, extra_config=", api_token: '${FAKER_API_TOKEN}'").sync("faker", full_refresh=False)
    started = time.time()
    crashing = _crashing_connector(tmp_path, lines=500)
    backend = _backend(tmp_path, count=5000, executable=crashing, extra_config=", api_token: '${FAKER_API_TOKEN}'")
    with pytest.raises(EmbeddedSyncFailed) as error:
        backend.sync("faker", full_refresh=True)

    message = str(error.value)
    assert message.startswith("connection 'faker' (source-faker) failed: ") and "\n" not in message
    assert secret not in message
    assert _users(tmp_path) == (200, 200)
    assert list((tmp_path / "data" / "airbyte-cache").iterdir()) == []
    assert _files_holding(secret, [tmp_path / "data", Path(tempfile.gettempdir())], since=started) == []


@pytest.mark.slow
def test_successful_sync_leaves_no_record_files_and_no_resolved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a sync, the data folder holds the warehouse and the catalog cache only, and no file
    anywhere (data folder, system temp folder) holds the secret the config resolved."""
    secret = secrets.token_hex(16)
    monkeypatch.setenv("FAKER_API_TOKEN", secret)
    started = time.time()
    _backend(tmp_path, count=200, extra_config=", api_token: '${FAKER_API_TOKEN}'").sync("faker", full_refresh=False)

    data = tmp_path / "data"
    assert [path.relative_to(data).as_posix() for path in _files_under(data)] == [
        "airbyte-catalogs/.key",
        "airbyte-catalogs/faker.catalog.json",
        "airbyte-catalogs/source-faker.spec.json",
        "warehouse.duckdb",
    ]
    assert list((data / "airbyte-cache").iterdir()) == []
    assert _files_holding(secret, [data, Path(tempfile.gettempdir())], since=started) == []


def test_folders_of_dead_syncs_are_removed_by_the_next_one(tmp_path: Path) -> None:
    """What a sync killed with -9 leaves (its folder, or record files of the old layout) is
    removed when the next sync starts; a running process's folder is left alone."""
    from elt.extract.embedded import SyncFolder

    root = tmp_path / "airbyte-cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    abandoned = root / f"faker.{dead.stdout.strip()}.0badc0de"
    (abandoned / "tmp" / "tmpabc").mkdir(parents=True)
    (abandoned / "tmp" / "tmpabc" / "config.json").write_text('{"api_token": "secret"}')
    (root / "users_01HX.jsonl.gz").write_bytes(b"partial")
    running = SyncFolder.create(root, "other")

    SyncFolder.remove_abandoned(root)

    assert sorted(path.name for path in root.iterdir()) == [running.path.name]


@pytest.mark.slow
def test_cancel_stops_the_connector_and_keeps_the_previous_table(tmp_path: Path) -> None:
    """A sync of a million users, cancelled mid-read: the connector process is gone within 10 s,
    the sync raises, and the table keeps the previous sync's 200 rows."""
    _backend(tmp_path, count=200).sync("faker", full_refresh=False)
    backend = _backend(tmp_path, count=1_000_000)
    outcome: dict[str, BaseException] = {}

    def sync() -> None:
        try:
            backend.sync("faker", full_refresh=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=sync)
    thread.start()
    scratch = tmp_path / "data" / "airbyte-cache"
    _wait_for(lambda: list(scratch.glob("*/records/*")), 180, "the first record files of the sync")
    connectors = _wait_for(_connector_processes, 10, "the connector process")

    backend.cancel_started_jobs()

    _wait_for(lambda: not _alive(connectors), 10, "the connector processes to end")
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), EmbeddedSyncCancelled)
    assert str(outcome["error"]) == (
        "connection 'faker' (source-faker): sync cancelled; tables of streams that had not finished are unchanged"
    )
    assert _users(tmp_path) == (200, 200)
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_sigterm_to_elt_run_stops_the_sync(tmp_path: Path, prefect_server, appliance_env: Path, appliance_remote) -> None:
    """`elt run` gets SIGTERM (docker stop, systemd, a Prefect cancellation) during a sync: the
    connector ends within 10 s and the table keeps the previous sync's rows."""
    home = appliance_env
    _write_connections(home / "connections.yaml", count=200)
    env = {
        **prefect_server.env(),
        "ELT_HOME": str(home),
        "ELT_AIRBYTE_CONNECTIONS_FILE": str(home / "connections.yaml"),
        "ELT_CONNECTORS_DIR": str(CONNECTORS_DIR),
        "ELT_GIT_REPO": str(appliance_remote.bare),
    }
    command = [str(BIN / "elt"), "run", "--skip-pull", "--skip-transform"]
    first = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _users(home) == (200, 200)

    _write_connections(home / "connections.yaml", count=1_000_000)
    run = subprocess.Popen([*command, "--full-refresh"], env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        scratch = home / "data" / "airbyte-cache"
        _wait_for(lambda: list(scratch.glob("*/records/*")), 180, "the first record files of the sync")
        elt = psutil.Process(run.pid)
        connectors = _wait_for(
            lambda: [child for child in elt.children(recursive=True) if "read" in child.cmdline()], 10, "the connector process"
        )

        run.terminate()

        _wait_for(lambda: not _alive(connectors), 10, "the connector processes to end")
        output = run.communicate(timeout=120)[0].decode()
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, output
    assert "connection 'faker' (source-faker): sync cancelled" in output
    assert _users(home) == (200, 200)
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_unknown_stream_names_the_connection_and_the_closest_match(tmp_path: Path) -> None:
    """Checked from the source's catalog, before any data moves."""
    backend = _backend(tmp_path, count=200, streams="[user, purchases]")
    with pytest.raises(UnknownStream) as error:
        backend.check_streams()
    assert str(error.value) == (
        f"{tmp_path / 'connections.yaml'}: connection 'faker': streams: 'user' (did you mean 'users'?) "
        "not offered by source-faker (it offers: products, purchases, users)"
    )


def _catalog_entry(home: Path) -> dict:
    return json.loads((home / "data" / "airbyte-catalogs" / "faker.catalog.json").read_text())


@pytest.mark.slow
def test_catalog_is_cached_between_runs_and_rediscovered_when_the_config_changes(tmp_path: Path) -> None:
    """A second check reuses the catalog (no discover); a changed config never does."""
    _backend(tmp_path, count=200).check_streams()
    first = _catalog_entry(tmp_path)

    _backend(tmp_path, count=200).check_streams()
    assert _catalog_entry(tmp_path) == first

    _backend(tmp_path, count=300).check_streams()
    changed = _catalog_entry(tmp_path)
    assert changed["key"] != first["key"] and changed["saved_at"] > first["saved_at"]
    assert "300" not in json.dumps(changed)  # the config itself is never stored


@pytest.mark.slow
def test_uninstallable_pip_spec_keeps_the_working_connector(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A good install, then a version that does not exist: the error names the connection and
    the spec, the working install stays, and the good spec syncs again without reinstalling.
    Then a real other version installs beside it, and its catalog is discovered anew."""
    connectors = tmp_path / "connectors"
    _backend(tmp_path, connectors, count=200).check_streams()
    link = connectors / "source-faker"
    working = link.resolve()
    before = _catalog_entry(tmp_path)

    with pytest.raises(ConnectorInstallFailed) as error:
        _backend(tmp_path, connectors, count=200, pip="airbyte-source-faker==99.99.99").sync("faker", full_refresh=False)
    message = str(error.value)
    assert message.startswith(
        f"{tmp_path / 'connections.yaml'}: connection 'faker': source.pip: installing 'airbyte-source-faker==99.99.99' failed: "
    )
    assert message.endswith(f"; kept the working install of '{FAKER}': fix source.pip or set it back")
    assert "\n" not in message
    assert link.resolve() == working and (link / "bin" / "source-faker").exists()

    caplog.clear()
    with caplog.at_level("INFO", logger="elt.extract.embedded"):
        result = _backend(tmp_path, connectors, count=200).sync("faker", full_refresh=False)
    assert result.rows_per_stream == {"users": 200}
    assert not [record for record in caplog.records if record.getMessage().startswith("Installing")]
    assert link.resolve() == working

    _backend(tmp_path, connectors, count=200, pip="airbyte-source-faker==7.2.0").check_streams()
    assert link.resolve() != working and not working.exists()
    assert (link / ".installed-from").read_text() == "airbyte-source-faker==7.2.0"
    assert _catalog_entry(tmp_path)["key"] != before["key"]


def test_unreachable_package_index_is_a_transient_install_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real install against an index that refuses connections: retrying later can help, so
    the error says transient (a spec that does not exist stays terminal, above)."""
    for variable in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9/simple")
    backend = _backend(tmp_path, tmp_path / "connectors", count=200)
    with pytest.raises(ConnectorInstallUnreachable) as error:
        backend.sync("faker", full_refresh=False)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'connections.yaml'}: connection 'faker': source.pip: installing '{FAKER}' failed: ")
    assert "Connection refused" in message and "\n" not in message
    assert error.value.transient
    assert not (tmp_path / "connectors" / "source-faker").exists()


@pytest.mark.slow
def test_connector_installed_in_place_by_an_earlier_version_is_used_then_replaced(tmp_path: Path) -> None:
    """Machines and images set up before side-by-side installs hold `<connectors>/<connector>`
    as a plain virtualenv with `.installed-from`: it is used as it is, and a changed spec
    replaces it with a link to the new install."""
    from elt.extract.connections import load_connections
    from elt.extract.embedded import ensure_connector

    connectors = tmp_path / "connectors"
    legacy = connectors / "source-faker"
    uv = str(BIN / "uv")
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(legacy)], check=True)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(legacy / "bin" / "python"), FAKER], check=True)
    (legacy / ".installed-from").write_text(FAKER)

    path = _write_connections(tmp_path / "connections.yaml", count=200)
    assert ensure_connector(load_connections(path)[0], connectors, path) == legacy / "bin" / "source-faker"
    assert not legacy.is_symlink()

    path = _write_connections(tmp_path / "connections.yaml", count=200, pip="airbyte-source-faker==7.2.0")
    executable = ensure_connector(load_connections(path)[0], connectors, path)
    assert legacy.is_symlink() and executable == legacy.resolve() / "bin" / "source-faker"
    assert (legacy / ".installed-from").read_text() == "airbyte-source-faker==7.2.0"
    assert [entry.name for entry in (connectors / ".installs").iterdir()] == [legacy.resolve().name]
    # Compiled at install: where PYTHONDONTWRITEBYTECODE is set, each sync would compile it again.
    assert list(legacy.resolve().glob("lib/python*/site-packages/source_faker/__pycache__/source.*.pyc"))
    spec = subprocess.run([str(executable), "spec"], capture_output=True, text=True, timeout=120)
    assert '"SPEC"' in spec.stdout, spec.stderr


_PROTOCOL_SOURCE = '''#!{python}
"""A minimal Airbyte source speaking the protocol: one stream `events` of `count` records."""
import json, sys

def emit(message):
    print(json.dumps(message), flush=True)

command = sys.argv[1]
if command == "spec":
    emit({{"type": "SPEC", "spec": {{"connectionSpecification": {{"type": "object", "properties": {{"count": {{"type": "integer"}}}}}}}}}})
    sys.exit(0)
config = json.load(open(sys.argv[sys.argv.index("--config") + 1]))
stream = {{"name": "events", "json_schema": {{"type": "object", "properties": {{"id": {{"type": "integer"}}}}}},
          "supported_sync_modes": ["full_refresh", "incremental"], "source_defined_primary_key": [["id"]]}}
if command == "discover":
    emit({{"type": "CATALOG", "catalog": {{"streams": [stream]}}}})
elif command == "read":
    for number in range(config["count"]):
        emit({{"type": "RECORD", "record": {{"stream": "events", "data": {{"id": number}}, "emitted_at": 0}}}})
'''


@pytest.mark.slow
def test_full_refresh_of_a_stream_that_emits_nothing_leaves_it_empty(tmp_path: Path) -> None:
    """PyAirbyte swaps in a new table only for a stream that had records. source-faker always
    emits at least one user, so a 25-line source speaking the Airbyte protocol stands in here."""
    script = tmp_path / "source-events"
    script.write_text(_PROTOCOL_SOURCE.format(python=sys.executable))
    script.chmod(0o700)

    def backend(count: int) -> EmbeddedBackend:
        path = tmp_path / "connections.yaml"
        path.write_text(
            "connections:\n  - name: events\n    source:\n      connector: source-events\n"
            f"      executable: {script}\n      config: {{count: {count}}}\n"
            "    streams: [events]\n    destination: {schema: raw_events}\n"
        )
        return EmbeddedBackend(load_settings(home=tmp_path, airbyte_connections_file=path))

    assert backend(3).sync("events", full_refresh=False).rows == 3
    assert backend(0).sync("events", full_refresh=True).rows_per_stream == {"events": 0}

    with duckdb.connect(str(tmp_path / "data" / "warehouse.duckdb"), read_only=True) as connection:
        assert connection.execute("select count(*) from raw_events.events").fetchone() == (0,)


def test_cached_catalog_expires_after_its_max_age(tmp_path: Path) -> None:
    """A source's new columns are seen within ELT_AIRBYTE_CATALOG_MAX_AGE_HOURS; 0 rediscovers every time."""
    from airbyte_protocol.models import AirbyteCatalog

    from elt.extract.embedded import CatalogCache

    catalog = AirbyteCatalog.model_validate(
        {"streams": [{"name": "users", "json_schema": {}, "supported_sync_modes": ["full_refresh"]}]}
    )
    CatalogCache(tmp_path, max_age_seconds=3600).store_catalog("faker", "key-1", catalog)

    assert CatalogCache(tmp_path, max_age_seconds=3600).stream_names("faker", "key-1") == ["users"]
    assert CatalogCache(tmp_path, max_age_seconds=3600).stream_names("faker", "key-2") is None
    assert CatalogCache(tmp_path, max_age_seconds=0).stream_names("faker", "key-1") is None
