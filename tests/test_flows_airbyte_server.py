"""all-etl with the server backend: a real Prefect server, real dbt and DuckDB, and the fake Airbyte
that enforces the pinned public API spec (see tests/fakes/airbyte_server.py for what it simulates)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from elt.extract.base import ExtractFailed, UnknownConnections
from elt.flows import all_etl
from tests.conftest import PrefectServer, make_remote
from tests.fakes.airbyte_server import FakeAirbyte

pytestmark = pytest.mark.slow

SOURCES = """
version: 2
sources:
  - name: shop
    schema: raw_shop
    meta: {airbyte_connection: shop}
    tables: [{name: orders}]
  - name: crm
    schema: raw_crm
    meta: {airbyte_connection: crm}
    tables: [{name: contacts}]
"""


@pytest.fixture
def two_source_remote(tmp_path: Path):
    """A dbt project whose two sources are loaded by the Airbyte connections 'shop' and 'crm'."""
    project = tmp_path / "two_sources"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text("name: two_sources\nversion: '1.0'\nconfig-version: 2\nprofile: warehouse\n")
    (project / "models" / "sources.yml").write_text(SOURCES)
    (project / "models" / "shop_revenue.sql").write_text("select sum(amount) as revenue from {{ source('shop', 'orders') }}\n")
    (project / "models" / "crm_contacts.sql").write_text("select * from {{ source('crm', 'contacts') }}\n")
    (project / "models" / "contacts_with_revenue.sql").write_text(
        "select * from {{ ref('crm_contacts') }} cross join {{ ref('shop_revenue') }}\n"
    )
    (tmp_path / "remote").mkdir()
    return make_remote(tmp_path / "remote", project)


@pytest.fixture
def raw_tables(appliance_env: Path) -> Path:
    """The raw tables Airbyte would have loaded (the fake moves no data)."""
    path = appliance_env / "data" / "warehouse.duckdb"
    path.parent.mkdir(parents=True)
    with duckdb.connect(str(path)) as connection:
        connection.execute("create schema raw_shop; create table raw_shop.orders as select 10.5 as amount")
        connection.execute("create schema raw_crm; create table raw_crm.contacts as select 'ada' as name")
    return path


def test_twenty_syncs_one_fails_and_dbt_builds_what_it_does_not_feed(
    prefect_server: PrefectServer, fake_airbyte: FakeAirbyte, airbyte_env: None, two_source_remote, raw_tables: Path
) -> None:
    fake_airbyte.add_connection("shop", sync_seconds=1.0)
    fake_airbyte.add_connection("crm", sync_seconds=1.0, outcome="failed")
    for index in range(18):
        fake_airbyte.add_connection(f"other-{index:02d}", sync_seconds=1.0)

    state = all_etl(repo=str(two_source_remote.bare), return_state=True)

    assert state.is_failed()
    with pytest.raises(
        ExtractFailed, match=r"^1 of 20 connections failed to sync: crm: connection 'crm': sync job \d+ ended failed \(http"
    ):
        state.result()
    assert fake_airbyte.count("POST", "/jobs") == 20
    with duckdb.connect(str(raw_tables), read_only=True) as warehouse:
        tables = {row[0] for row in warehouse.execute("select table_name from information_schema.tables").fetchall()}
    assert "shop_revenue" in tables
    assert not {"crm_contacts", "contacts_with_revenue"} & tables
    rows = prefect_server.artifacts("extract-load-results")[0]["data"]
    assert "crm" in str(rows) and "job-history" in str(rows)


def test_dbts_process_starts_before_an_airbyte_servers_syncs_and_the_transform_uses_it(
    prefect_server: PrefectServer,
    fake_airbyte: FakeAirbyte,
    airbyte_env: None,
    two_source_remote,
    raw_tables: Path,
    run_events: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While an Airbyte server syncs, the run only waits on its API: dbt's process starts at once,
    ELT_DBT_START=after-syncs or not (it is about embedded syncs), so its import overlaps the
    syncs, and the transform takes that process over."""
    monkeypatch.setenv("ELT_DBT_START", "after-syncs")
    fake_airbyte.add_connection("shop", sync_seconds=1.0)
    fake_airbyte.add_connection("crm", sync_seconds=1.0)
    state = all_etl(repo=str(two_source_remote.bare), return_state=True)
    assert state.is_completed()
    assert run_events[0] == "dbt process started early"
    assert sorted(run_events[1:]) == ["sync crm ends", "sync crm starts", "sync shop ends", "sync shop starts"]


def test_unknown_connection_stops_before_any_sync(
    prefect_server: PrefectServer, fake_airbyte: FakeAirbyte, airbyte_env: None, two_source_remote, raw_tables: Path
) -> None:
    fake_airbyte.add_connection("shop")
    fake_airbyte.add_connection("crm")
    state = all_etl(connections=["shop", "hubspot"], repo=str(two_source_remote.bare), return_state=True)
    assert state.is_failed()
    with pytest.raises(UnknownConnections, match=r"^no connection named hubspot; known connections: shop, crm$"):
        state.result()
    assert fake_airbyte.count("POST", "/jobs") == 0


def test_inactive_connection_is_not_synced_and_its_models_are_left_out(
    prefect_server: PrefectServer, fake_airbyte: FakeAirbyte, airbyte_env: None, two_source_remote, raw_tables: Path
) -> None:
    """Airbyte disabled 'crm' (by hand, or by itself after repeated failures): its raw table is
    stale, so nothing built on it is rebuilt as if fresh, and the run fails naming it."""
    fake_airbyte.add_connection("shop", sync_seconds=0.2)
    crm_id = fake_airbyte.add_connection("crm", status="inactive")

    state = all_etl(repo=str(two_source_remote.bare), return_state=True)

    assert state.is_failed()
    with pytest.raises(ExtractFailed) as error:
        state.result()
    assert str(error.value) == (
        "1 of 2 connections failed to sync: crm: connection 'crm' was not synced: Airbyte marks it inactive; "
        f"enable or fix it in the Airbyte UI ({fake_airbyte.ui_url}/workspaces/{fake_airbyte.workspace_id}/connections/{crm_id}), "
        "or leave it out of the run (elt run -c, or ELT_AIRBYTE_CONNECTION_TAG)"
    )
    assert fake_airbyte.jobs_for(crm_id) == []
    assert fake_airbyte.count("POST", "/jobs") == 1
    with duckdb.connect(str(raw_tables), read_only=True) as warehouse:
        tables = {row[0] for row in warehouse.execute("select table_name from information_schema.tables").fetchall()}
    assert "shop_revenue" in tables
    assert not {"crm_contacts", "contacts_with_revenue"} & tables
    rows = prefect_server.artifacts("extract-load-results")[0]["data"]
    assert "was not synced: Airbyte marks it inactive" in str(rows)
