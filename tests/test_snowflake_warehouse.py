"""The Snowflake warehouse's work against a warehouse: publishing staged raw tables, the grants
probe of `elt doctor` and reading a run's query history, as the product calls them.

Snowflake itself cannot run here: the warehouse is fakesnow's server (Snowflake's wire protocol
and SQL over DuckDB; one server for the session, a database per test), our faithful fake. Where
fakesnow cannot play a part, the smallest fake of the connector's documented contract stands in,
said per test: a cursor that refuses a statement with the `ProgrammingError` Snowflake raises for
a role without the privilege (fakesnow has no roles), and INFORMATION_SCHEMA.QUERY_HISTORY, which
fakesnow lacks, read from a table of rows in its documented columns. Every connection the code
opens goes through `snowflake.connector.connect` as usual and is recorded, so the query tag each
one gets is checked too.
"""

from __future__ import annotations

import datetime
import decimal
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import snowflake.connector
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from snowflake.connector.errors import DatabaseError, ProgrammingError

from elt import warehouse_snowflake
from elt.settings import load_settings
from elt.warehouse import MissingGrants, warehouse_for
from elt.warehouse_snowflake import (
    QUERY_TAG_VARIABLE,
    QueryHistoryUnavailable,
    SnowflakeCredentials,
    SnowflakeLoginRejected,
    SnowflakeWarehouse,
    query_tag,
)
from tests.conftest import FakesnowServer

RUN_ID = "6f1c0a52-0d8e-4c55-9a43-2b8b1f3e9d10"


class _Cursor:
    """A fakesnow cursor, except for the statements `refuse` names, which raise what Snowflake
    raises for them, and the query-history table function, read from `history_table`."""

    def __init__(self, cursor: Any, connector: Connector) -> None:
        self._cursor = cursor
        self._connector = connector

    def execute(self, sql: str, params: Any = None) -> _Cursor:
        self._connector.statements.append(sql)
        for pattern, error in self._connector.refuse.items():
            if re.search(pattern, sql):
                raise error
        history = re.search(r"table\((.+)\.information_schema\.query_history\((.*)\)\) where ", sql)
        if history and self._connector.history_table:
            self._connector.history_calls.append((history.group(1), history.group(2)))
            sql = sql.replace(history.group(0), f"{self._connector.history_table} where ")
        self._cursor.execute(sql, params)
        return self

    def executemany(self, sql: str, rows: list[tuple]) -> _Cursor:
        self._connector.statements.append(sql)
        self._cursor.executemany(sql, rows)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Connection:
    def __init__(self, connection: Any, connector: Connector) -> None:
        self._connection = connection
        self._connector = connector

    def cursor(self) -> _Cursor:
        return _Cursor(self._connection.cursor(), self._connector)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._connection.__exit__(*exc)


class Connector:
    """`snowflake.connector.connect`, recording each call's arguments (secrets included: the
    test reads them, nothing prints them)."""

    def __init__(self, connect: Callable[..., Any]) -> None:
        self._connect = connect
        self.calls: list[dict[str, Any]] = []
        self.statements: list[str] = []
        self.refuse: dict[str, ProgrammingError] = {}
        self.history_table: str | None = None
        self.history_calls: list[tuple[str, str]] = []
        self.refuse_login: Exception | None = None

    def __call__(self, **params: Any) -> _Connection:
        self.calls.append(params)
        if self.refuse_login is not None:
            raise self.refuse_login
        return _Connection(self._connect(**params), self)

    @property
    def query_tags(self) -> list[str | None]:
        return [call.get("session_parameters", {}).get("QUERY_TAG") for call in self.calls]


@pytest.fixture
def connector(monkeypatch: pytest.MonkeyPatch) -> Connector:
    recording = Connector(snowflake.connector.connect)
    monkeypatch.setattr(snowflake.connector, "connect", recording)
    return recording


@pytest.fixture
def database(snowflake_env: FakesnowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """SNOWFLAKE_DATABASE: a database of this test's own on the session's fakesnow server."""
    name = f"T_{uuid.uuid4().hex[:12].upper()}"
    monkeypatch.setenv("SNOWFLAKE_DATABASE", name)
    with _raw_connect(snowflake_env) as connection:
        connection.cursor().execute(f"create database {name}")
    return name


_RAW_CONNECT = snowflake.connector.connect


def _raw_connect(server: FakesnowServer, database: str | None = None) -> Any:
    """A connection of the test's own, past the recording connector (fakesnow's `describe
    table` needs a current database)."""
    return _RAW_CONNECT(
        user="x", password="x", account="x", host="127.0.0.1", port=server.port, protocol="http", database=database
    )


def _rows(server: FakesnowServer, sql: str) -> list[tuple]:
    database = re.search(r" (T_[0-9A-F]{12})\.", sql)
    with _raw_connect(server, database.group(1) if database else None) as connection:
        return connection.cursor().execute(sql).fetchall()


def _warehouse() -> SnowflakeWarehouse:
    warehouse = warehouse_for(load_settings())
    assert isinstance(warehouse, SnowflakeWarehouse)
    return warehouse


@pytest.fixture
def inside_a_flow_run() -> Iterator[str]:
    """Prefect's own FlowRunContext, as an all-etl run (a flow run with no parent) sets it; no
    Prefect server is needed to read its id."""
    run = FlowRun(id=uuid.UUID(RUN_ID), flow_id=uuid.uuid4(), name="all-etl")
    with FlowRunContext.model_construct(flow_run=run):
        yield RUN_ID


# --- publishing staged tables ----------------------------------------------------------------

_USERS_COLUMNS = (
    "id BIGINT, name VARCHAR, age INTEGER, big HUGEINT, score DOUBLE, ratio FLOAT, active BOOLEAN, "
    "born DATE, seen TIMESTAMP, _airbyte_extracted_at TIMESTAMP WITH TIME ZONE, _airbyte_meta JSON, "
    "balance DECIMAL(10,2), amount DECIMAL(38,9), address STRUCT(city VARCHAR, zip VARCHAR), tags VARCHAR[], opens TIME"
)
_EXTRACTED = datetime.datetime(2026, 12, 2, 9, 30, 15, 250000, tzinfo=datetime.UTC)


def _stage(path: Path, schema: str, tables: dict[str, tuple[str, list[str]]]) -> Path:
    """A DuckDB file as the embedded backend's PyAirbyte leaves it: `tables` maps a name to its
    columns and the rows as SQL value lists."""
    with duckdb.connect(str(path)) as staging:
        staging.execute(f"create schema if not exists {schema}")
        for table, (columns, rows) in tables.items():
            staging.execute(f"create or replace table {schema}.{table} ({columns})")
            for row in rows:
                staging.execute(f"insert into {schema}.{table} values ({row})")
    return path


# No NULL timestamp: fakesnow 0.12 reads one back as 1970-01-01 (not checked whether the insert or the read does it).
_USER_ROWS = [
    "1, 'Ada', 36, 9007199254740993, 0.5, 0.25, true, DATE '1990-01-02', "
    "TIMESTAMP '2026-12-01 08:00:00.123456', TIMESTAMPTZ '2026-12-02 09:30:15.25+00', '{\"changes\": []}', "
    "12.34, 0.000000001, {'city': 'Zürich', 'zip': '8001'}, ['a', 'b'], TIME '08:30:00'",
    "2, NULL, NULL, NULL, NULL, NULL, false, NULL, "
    "TIMESTAMP '2026-12-01 08:00:01', TIMESTAMPTZ '2026-12-02 09:30:15.25+00', NULL, "
    "NULL, NULL, NULL, [], NULL",
]


def test_staged_tables_land_column_by_column_with_snowflake_types(
    database: str, snowflake_env: FakesnowServer, connector: Connector, tmp_path: Path, inside_a_flow_run: str
) -> None:
    """What the embedded backend hands over lands as it was staged: every DuckDB type as its
    Snowflake type, values and NULLs intact, structs and lists as JSON text, each table's rows
    counted; the load's queries carry the run's tag with `"stage":"load"` (how its cost is found)."""
    staged = _stage(
        tmp_path / "staging.duckdb",
        "raw_faker",
        {"users": (_USERS_COLUMNS, _USER_ROWS), "products": ("id BIGINT, title VARCHAR", ["7, 'lamp'"])},
    )
    copied = warehouse_snowflake.replace_tables_from_duckdb(
        SnowflakeCredentials.from_settings(load_settings()), staged, "raw_faker", ["users", "products"]
    )
    assert copied == {"users": 2, "products": 1}
    assert connector.query_tags == [f'{{"app":"elt-appliance","flow_run_id":"{RUN_ID}","stage":"load"}}']
    types = [(name, kind) for name, kind, *_ in _rows(snowflake_env, f"describe table {database}.RAW_FAKER.USERS")]
    assert types == [
        ("ID", "NUMBER(38,0)"),
        ("NAME", "VARCHAR(16777216)"),
        ("AGE", "NUMBER(38,0)"),
        ("BIG", "NUMBER(38,0)"),
        ("SCORE", "FLOAT"),
        ("RATIO", "FLOAT"),
        ("ACTIVE", "BOOLEAN"),
        ("BORN", "DATE"),
        ("SEEN", "TIMESTAMP_NTZ(9)"),
        ("_AIRBYTE_EXTRACTED_AT", "TIMESTAMP_TZ(9)"),
        ("_AIRBYTE_META", "VARCHAR(16777216)"),
        ("BALANCE", "NUMBER(10,2)"),
        ("AMOUNT", "NUMBER(38,9)"),
        ("ADDRESS", "VARCHAR(16777216)"),
        ("TAGS", "VARCHAR(16777216)"),
        ("OPENS", "TIME(9)"),
    ]
    rows = _rows(snowflake_env, f"select * from {database}.RAW_FAKER.USERS order by id")
    assert rows == [
        (
            1,
            "Ada",
            36,
            9007199254740993,
            0.5,
            0.25,
            True,
            datetime.date(1990, 1, 2),
            datetime.datetime(2026, 12, 1, 8, 0, 0, 123456),
            _EXTRACTED,
            '{"changes": []}',
            decimal.Decimal("12.34"),
            decimal.Decimal("0.000000001"),
            '{"city": "Z\\u00fcrich", "zip": "8001"}',
            '["a", "b"]',
            datetime.time(8, 30),
        ),
        (2, None, None, None, None, None, False, None, datetime.datetime(2026, 12, 1, 8, 0, 1), _EXTRACTED)
        + (None,) * 4
        + ("[]", None),
    ]
    assert _rows(snowflake_env, f"select * from {database}.RAW_FAKER.PRODUCTS") == [(7, "lamp")]


def test_publishing_again_replaces_the_rows_in_batches(
    database: str, snowflake_env: FakesnowServer, connector: Connector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next sync's tables replace the last ones whole (rows gone from the source are gone),
    sent in batches: 5 rows in batches of 2 land as 5 rows, each once. Outside a flow run the
    load's tag names no run."""
    warehouse = _warehouse()
    first = _stage(
        tmp_path / "first.duckdb", "raw_shop", {"orders": ("id BIGINT, amount DOUBLE", ["1, 1.5", "2, 2.5", "3, 3.5"])}
    )
    warehouse.publish_staged(first, "raw_shop", ["orders"])
    monkeypatch.setattr(warehouse_snowflake, "_BATCH_ROWS", 2)
    rows = [f"{n}, {n}.25" for n in range(10, 15)]
    second = _stage(tmp_path / "second.duckdb", "raw_shop", {"orders": ("id BIGINT, amount DOUBLE", rows)})
    assert warehouse_snowflake.replace_tables_from_duckdb(warehouse.credentials, second, "raw_shop", ["orders"]) == {"orders": 5}
    assert _rows(snowflake_env, f"select id, amount from {database}.RAW_SHOP.ORDERS order by id") == [
        (n, n + 0.25) for n in range(10, 15)
    ]
    inserts = [sql for sql in connector.statements if sql.startswith("insert into")]
    assert inserts == [f'insert into "{database}".raw_shop.orders (id, amount) values (%s, %s)'] * 4  # 3 rows, then 2 + 2 + 1
    assert connector.query_tags == ['{"app":"elt-appliance","flow_run_id":null,"stage":"load"}'] * 2


def test_a_load_failing_midway_leaves_the_previous_rows_and_the_tables_after_it_untouched(
    database: str, snowflake_env: FakesnowServer, connector: Connector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each table is replaced in one transaction: a row Snowflake refuses (a text where the
    table has a number) in the second batch rolls back the delete and the first batch, the
    error goes to the caller, the table published before it keeps its new rows and the one
    after it is not touched."""
    warehouse = _warehouse()
    tables = {
        "a_first": ("id BIGINT", ["1"]),
        "b_failing": ("id BIGINT", ["1", "2"]),
        "c_after": ("id BIGINT", ["1"]),
    }
    warehouse.publish_staged(_stage(tmp_path / "before.duckdb", "raw_x", tables), "raw_x", list(tables))
    monkeypatch.setattr(warehouse_snowflake, "_BATCH_ROWS", 2)
    changed = {
        "a_first": ("id BIGINT", ["5", "6", "7"]),
        "b_failing": ("id VARCHAR", ["'10'", "'11'", "'not a number'"]),
        "c_after": ("id BIGINT", ["9"]),
    }
    with pytest.raises(ProgrammingError, match="Could not convert string 'not a number'"):
        warehouse.publish_staged(_stage(tmp_path / "after.duckdb", "raw_x", changed), "raw_x", list(changed))
    assert _rows(snowflake_env, f"select id from {database}.RAW_X.A_FIRST order by id") == [(5,), (6,), (7,)]
    assert _rows(snowflake_env, f"select id from {database}.RAW_X.B_FAILING order by id") == [(1,), (2,)]
    assert _rows(snowflake_env, f"select id from {database}.RAW_X.C_AFTER order by id") == [(1,)]
    assert connector.statements[-5:] == [
        "begin",
        f'delete from "{database}".raw_x.b_failing',
        f'insert into "{database}".raw_x.b_failing (id) values (%s)',
        f'insert into "{database}".raw_x.b_failing (id) values (%s)',
        "rollback",
    ]


def test_a_new_column_in_the_source_is_added_to_the_raw_table_and_nothing_is_dropped(
    database: str, snowflake_env: FakesnowServer, connector: Connector, tmp_path: Path
) -> None:
    """A source that starts sending a column (a connector upgrade, a new field) loads into the
    table an earlier sync created: the column is added, with its type; earlier columns stay,
    and one the source no longer sends keeps its place and is NULL in the new rows."""
    warehouse = _warehouse()
    before = _stage(
        tmp_path / "before.duckdb", "raw_faker", {"users": ("id BIGINT, name VARCHAR, legacy VARCHAR", ["1, 'Ada', 'x'"])}
    )
    warehouse.publish_staged(before, "raw_faker", ["users"])
    after = _stage(
        tmp_path / "after.duckdb",
        "raw_faker",
        {"users": ("id BIGINT, name VARCHAR, email VARCHAR, joined DATE", ["2, 'Bo', 'bo@example.com', DATE '2026-12-01'"])},
    )
    warehouse.publish_staged(after, "raw_faker", ["users"])
    types = [(name, kind) for name, kind, *_ in _rows(snowflake_env, f"describe table {database}.RAW_FAKER.USERS")]
    assert types == [
        ("ID", "NUMBER(38,0)"),
        ("NAME", "VARCHAR(16777216)"),
        ("LEGACY", "VARCHAR(16777216)"),
        ("EMAIL", "VARCHAR(16777216)"),
        ("JOINED", "DATE"),
    ]
    assert _rows(snowflake_env, f"select * from {database}.RAW_FAKER.USERS") == [
        (2, "Bo", None, "bo@example.com", datetime.date(2026, 12, 1))
    ]


def test_the_staging_file_is_read_while_another_process_reads_it(
    database: str, snowflake_env: FakesnowServer, tmp_path: Path
) -> None:
    """The staging file is opened read-only: `elt doctor` (which reads which schemas were
    staged) or another reader may hold it meanwhile; DuckDB lets a writer open a file no
    other process has open at all."""
    import subprocess
    import sys

    staged = _stage(tmp_path / "staging.duckdb", "raw_x", {"t": ("id BIGINT", ["1"])})
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys; c = duckdb.connect({str(staged)!r}, read_only=True); print(1, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "1\n"
        _warehouse().publish_staged(staged, "raw_x", ["t"])
    finally:
        reader.communicate("", timeout=30)
    assert _rows(snowflake_env, f"select id from {database}.RAW_X.T") == [(1,)]


# --- the grants probe (elt doctor) -----------------------------------------------------------


def _refused(what: str) -> ProgrammingError:
    return ProgrammingError(
        msg=f"SQL access control error: Insufficient privileges to operate on {what}", errno=3001, sqlstate="42501"
    )


def test_a_role_that_may_do_everything_is_described_in_one_line(
    database: str, snowflake_env: FakesnowServer, connector: Connector
) -> None:
    """Sources in the raw schema (named in any case, a database given or not), read as they are;
    the probe schema and table it creates are dropped again; the doctor's tag."""
    with _raw_connect(snowflake_env) as connection:
        cursor = connection.cursor()
        cursor.execute(f"create schema {database}.RAW_FAKER")
        for table in ("USERS", "PRODUCTS"):
            cursor.execute(f"create table {database}.RAW_FAKER.{table} (id int)")
    sources = [(database.lower(), "raw_faker", "users"), ("", "Raw_Faker", "products")]
    assert _warehouse().check_grants(sources) == (
        f"role TRANSFORMER can use TRANSFORMING, read 2 source table(s) and build in {database}.DBT"
    )
    assert connector.query_tags == ['{"app":"elt-appliance","flow_run_id":"doctor"}']
    assert connector.statements[0] == 'use warehouse "TRANSFORMING"'
    schemas = [name for (name,) in _rows(snowflake_env, f"select schema_name from {database}.information_schema.schemata")]
    assert "DBT" in schemas and "DBT_ELT_DOCTOR_PROBE" not in schemas
    assert _rows(
        snowflake_env, f"select count(*) from {database}.information_schema.tables where table_name = 'ELT_DOCTOR_PROBE'"
    ) == [(0,)]


def test_raw_schemas_the_first_run_creates_are_not_a_problem_and_are_named(
    database: str, snowflake_env: FakesnowServer, connector: Connector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh embedded install: two raw schemas are not there yet, and the first run creates
    them. Their tables are not counted as read, those of a schema loaded already are; with no
    role set, the role shows as the default."""
    with _raw_connect(snowflake_env) as connection:
        connection.cursor().execute(f"create schema {database}.RAW_LOADED")
        connection.cursor().execute(f"create table {database}.RAW_LOADED.EVENTS (id int)")
    monkeypatch.delenv("SNOWFLAKE_ROLE")
    sources = [
        ("", "raw_faker", "users"),
        ("", "raw_faker", "products"),
        ("", "raw_shop", "orders"),
        ("", "raw_loaded", "events"),
    ]
    assert _warehouse().check_grants(sources, first_run_creates={"RAW_FAKER", "RAW_SHOP"}) == (
        f"role (default) can use TRANSFORMING, read 1 source table(s) and build in {database}.DBT; "
        f"raw schema {database}.RAW_FAKER, {database}.RAW_SHOP not loaded yet (the first run creates it)"
    )


def test_every_missing_grant_is_listed_with_the_grant_that_fixes_it(
    database: str, snowflake_env: FakesnowServer, connector: Connector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role refused the warehouse, schema creation and table creation (the cursor raises
    Snowflake's access-control error: fakesnow has no roles); a raw schema it can't see (not
    loaded, in this database and another, even when the first run creates a schema of that
    name, which it does only in SNOWFLAKE_DATABASE); a table it can't read next to one it can."""
    with _raw_connect(snowflake_env) as connection:
        cursor = connection.cursor()
        cursor.execute(f"create schema {database}.RAW_SHOP")
        cursor.execute(f"create table {database}.RAW_SHOP.ORDERS (id int)")
    connector.refuse = {
        r"^use warehouse ": ProgrammingError(msg="Object does not exist, or operation cannot be performed.", errno=2043),
        r"^create schema if not exists .*_ELT_DOCTOR_PROBE$": _refused("database"),
        r"^create or replace transient table ": _refused("schema"),
    }
    sources = [
        ("", "raw_shop", "orders"),
        ("", "raw_shop", "refunds"),
        ("", "raw_faker", "users"),
        ("OTHER_DB", "raw_faker", "users"),
    ]
    with pytest.raises(MissingGrants) as error:
        _warehouse().check_grants(sources, first_run_creates={"RAW_FAKER_NOT_THIS"})
    role = "TRANSFORMER"
    assert error.value.problems == [
        f"role {role} cannot use warehouse TRANSFORMING: GRANT USAGE ON WAREHOUSE TRANSFORMING TO ROLE {role};",
        f"role {role} cannot read {database}.RAW_SHOP.refunds (not loaded yet, or no SELECT): "
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {database}.RAW_SHOP TO ROLE {role}; "
        f"GRANT SELECT ON FUTURE TABLES IN SCHEMA {database}.RAW_SHOP TO ROLE {role};",
        f"role {role} cannot see raw schema {database}.RAW_FAKER (not loaded yet, or no USAGE): "
        f"GRANT USAGE ON DATABASE {database} TO ROLE {role}; GRANT USAGE ON SCHEMA {database}.RAW_FAKER TO ROLE {role};",
        f"role {role} cannot see raw schema OTHER_DB.RAW_FAKER (not loaded yet, or no USAGE): "
        f"GRANT USAGE ON DATABASE OTHER_DB TO ROLE {role}; GRANT USAGE ON SCHEMA OTHER_DB.RAW_FAKER TO ROLE {role};",
        f"role {role} cannot create schemas in {database} (dbt builds <schema>_staging and <schema>_marts): "
        f"GRANT CREATE SCHEMA ON DATABASE {database} TO ROLE {role};",
        f"role {role} cannot create tables in {database}.DBT: "
        f"GRANT USAGE, CREATE TABLE, CREATE VIEW ON SCHEMA {database}.DBT TO ROLE {role};",
    ]

    monkeypatch.delenv("SNOWFLAKE_ROLE")  # then the problems name the role the user logs in with
    role = "<role of SNOWFLAKE_USER>"
    with pytest.raises(MissingGrants) as other_database:
        _warehouse().check_grants([("OTHER_DB", "raw_faker", "users")], first_run_creates={"RAW_FAKER"})
    assert [problem.split(":")[0] for problem in other_database.value.problems] == [
        f"role {role} cannot use warehouse TRANSFORMING",
        f"role {role} cannot see raw schema OTHER_DB.RAW_FAKER (not loaded yet, or no USAGE)",
        f"role {role} cannot create schemas in {database} (dbt builds <schema>_staging and <schema>_marts)",
        f"role {role} cannot create tables in {database}.DBT",
    ]
    assert other_database.value.problems[0].endswith(f"GRANT USAGE ON WAREHOUSE TRANSFORMING TO ROLE {role};")


# --- query history and the run's cost -------------------------------------------------------


def _history_row(query_id: str, tag: str | None, node: str | None, execution_ms: int, size: str | None = "Medium") -> str:
    comment = f'/* {{"app": "dbt", "node_id": "{node}"}} */ ' if node else ""
    text = (comment + "select 1").replace("'", "''")
    tag_sql = "NULL" if tag is None else "'" + tag.replace("'", "''") + "'"
    size_sql = "NULL" if size is None else f"'{size}'"
    return f"('{query_id}', '{text}', {tag_sql}, {size_sql}, {execution_ms + 100}, {execution_ms}, 1000)"


@pytest.fixture
def query_history(database: str, snowflake_env: FakesnowServer, connector: Connector) -> str:
    """INFORMATION_SCHEMA.QUERY_HISTORY(...) for this test: a table in its documented columns,
    which the recording cursor reads in place of the table function (fakesnow has none).
    This run's dbt and load queries, another run's (whose id this run's id is the start of),
    dbt's default tag outside a run, and untagged queries."""
    table = f'"{database}".HISTORY.QUERY_HISTORY'
    this_run = query_tag(RUN_ID)
    rows = [
        _history_row("q1", this_run, "model.shop.orders", 7_200_000),  # 2 h on a Medium: 8 credits
        _history_row("q2", this_run, None, 360_000),
        _history_row("q3", query_tag(RUN_ID, stage="load"), None, 1_800_000, "X-Small"),
        _history_row("q4", query_tag(RUN_ID + "0"), "model.shop.orders", 3_600_000),
        _history_row("q5", query_tag(RUN_ID + "0", stage="load"), None, 3_600_000),
        _history_row("q6", "elt", "model.shop.orders", 3_600_000),
        _history_row("q7", None, None, 3_600_000),
    ]
    with _raw_connect(snowflake_env) as connection:
        cursor = connection.cursor()
        cursor.execute(f"create schema {database}.HISTORY")
        cursor.execute(
            f"create table {table} (query_id varchar, query_text varchar, query_tag varchar, warehouse_size varchar, "
            "total_elapsed_time number, execution_time number, bytes_scanned number, user_name varchar)"
        )
        cursor.execute(
            f"insert into {table} (query_id, query_text, query_tag, warehouse_size, total_elapsed_time, "
            f"execution_time, bytes_scanned) values {', '.join(rows)}"
        )
    connector.history_table = table
    return table


def test_the_runs_cost_is_read_from_its_queries_in_the_history(
    database: str, query_history: str, connector: Connector, inside_a_flow_run: str
) -> None:
    """Inside a run: its queries (dbt's and the load's, found by the run's tag) and no other
    run's, priced by warehouse size; the history is read over the last 24 hours, untagged."""
    cost = _warehouse().run_cost()
    assert cost is not None
    assert cost.rows == [
        {"node": "model.shop.orders", "queries": 1, "elapsed_seconds": 7200.1, "bytes_scanned": 1000, "estimated_credits": 8.0},
        {"node": "(embedded load)", "queries": 1, "elapsed_seconds": 1800.1, "bytes_scanned": 1000, "estimated_credits": 0.5},
        {"node": "(dbt overhead)", "queries": 1, "elapsed_seconds": 360.1, "bytes_scanned": 1000, "estimated_credits": 0.4},
        {"node": "TOTAL", "queries": 3, "elapsed_seconds": 9360.3, "bytes_scanned": 3000, "estimated_credits": 8.9},
    ]
    assert cost.line == "~8.9000 Snowflake credits (estimate: 3 queries, 9360.3s; artifact snowflake-cost)"
    assert cost.description == "Snowflake queries of this run (load and dbt nodes), with estimated credits"
    assert connector.history_calls == [
        (f'"{database}"', "end_time_range_start => dateadd('hour', -24, current_timestamp()), result_limit => 10000")
    ]
    assert connector.query_tags == ['{"app":"elt-appliance","flow_run_id":null}']


def test_the_history_rows_have_the_documented_columns_and_the_hours_asked_for(
    database: str, query_history: str, connector: Connector
) -> None:
    history = warehouse_snowflake.run_query_history(SnowflakeCredentials.from_settings(load_settings()), RUN_ID, hours=3)
    assert history[0] == {
        "QUERY_ID": "q1",
        "QUERY_TEXT": '/* {"app": "dbt", "node_id": "model.shop.orders"} */ select 1',
        "QUERY_TAG": query_tag(RUN_ID),
        "WAREHOUSE_SIZE": "Medium",
        "TOTAL_ELAPSED_TIME": 7_200_100,
        "EXECUTION_TIME": 7_200_000,
        "BYTES_SCANNED": 1000,
    }
    assert sorted(row["QUERY_ID"] for row in history) == ["q1", "q2", "q3"]
    assert connector.history_calls[0][1].startswith("end_time_range_start => dateadd('hour', -3, current_timestamp())")


def test_a_history_that_cannot_be_read_says_why(database: str, snowflake_env: FakesnowServer, connector: Connector) -> None:
    """fakesnow refuses the table function as Snowflake refuses a role without MONITOR: the
    error's first line, named with the view and the role (the default when none is set)."""
    credentials = SnowflakeCredentials.from_settings(load_settings())
    with pytest.raises(QueryHistoryUnavailable) as error:
        warehouse_snowflake.run_query_history(credentials, RUN_ID)
    assert str(error.value) == (
        f"query history unavailable: {database}.INFORMATION_SCHEMA.QUERY_HISTORY could not be read as role TRANSFORMER: "
        '001003 (42000): Parser Error: syntax error at or near "TABLE"'
    )
    connector.refuse = {"query_history": ProgrammingError(msg="", errno=None)}
    with pytest.raises(QueryHistoryUnavailable) as empty:
        warehouse_snowflake.run_query_history(credentials.model_copy(update={"role": None}), RUN_ID)
    assert str(empty.value).startswith(
        f"query history unavailable: {database}.INFORMATION_SCHEMA.QUERY_HISTORY could not be read as role (default): "
    )


def test_a_history_on_an_unreachable_account_says_why(monkeypatch: pytest.MonkeyPatch, database: str) -> None:
    monkeypatch.setenv("SNOWFLAKE_PORT", "1")
    with pytest.raises(QueryHistoryUnavailable) as error:
        warehouse_snowflake.run_query_history(SnowflakeCredentials.from_settings(load_settings()), RUN_ID)
    assert str(error.value).startswith(
        f"query history unavailable: {database}.INFORMATION_SCHEMA.QUERY_HISTORY could not be read as role TRANSFORMER: "
        "cannot connect to Snowflake account acme-test at http://127.0.0.1:1 as TRANSFORMER: "
    )


# --- row counts of a run's models ------------------------------------------------------------


def test_row_counts_of_the_runs_tables_are_keyed_by_their_names(
    database: str, snowflake_env: FakesnowServer, connector: Connector, inside_a_flow_run: str
) -> None:
    with _raw_connect(snowflake_env) as connection:
        cursor = connection.cursor()
        cursor.execute(f"create schema {database}.DBT_MARTS")
        cursor.execute(f"create table {database}.DBT_MARTS.DAILY_REVENUE as select 1 as id union all select 2")
        cursor.execute(f"create table {database}.DBT_MARTS.EMPTY (id int)")
    counts = _warehouse()._row_counts([f"{database}.dbt_marts.daily_revenue", f'"{database}"."DBT_MARTS"."EMPTY"'])
    assert counts == {f"{database}.DBT_MARTS.DAILY_REVENUE": 2, f"{database}.DBT_MARTS.EMPTY": 0}
    assert connector.query_tags == [query_tag(RUN_ID)]


# --- the connections themselves -------------------------------------------------------------


def test_the_reachability_probe_is_bounded_and_a_runs_connections_are_not(
    database: str, snowflake_env: FakesnowServer, connector: Connector, inside_a_flow_run: str
) -> None:
    """`elt doctor`'s and the pre-run check's probe bounds every socket read by
    SNOWFLAKE_CONNECT_TIMEOUT_SECONDS and runs `select 1`; the connections of a run (here the
    row counts) keep the connector's read timeout, which long queries need."""
    warehouse = _warehouse()
    warehouse.check_reachable()
    assert connector.statements == ["select 1"]
    warehouse._row_counts([])
    assert [(call.get("socket_timeout"), call["login_timeout"]) for call in connector.calls] == [(10.0, 10.0), (None, 10.0)]
    assert connector.query_tags == [None, query_tag(RUN_ID)]


def test_a_login_snowflake_refuses_names_the_user_and_what_to_check(
    database: str, snowflake_env: FakesnowServer, connector: Connector
) -> None:
    """The connector raises a DatabaseError (neither an OperationalError nor an
    InterfaceError) when the account answers and refuses the login: a wrong password, key or
    user. fakesnow accepts every login, so the connector here raises what Snowflake's answer
    makes it raise (its message as the connector words it, over two lines)."""
    connector.refuse_login = DatabaseError(
        msg="Failed to connect to DB: acme-test.snowflakecomputing.com:443. Incorrect username or password was specified.\n"
        "Request ID: 2b9c",
        errno=250001,
        sqlstate="08001",
    )
    warehouse = _warehouse()
    with pytest.raises(SnowflakeLoginRejected) as error:
        warehouse.check_reachable()
    assert str(error.value) == (
        f"Snowflake account acme-test at http://127.0.0.1:{snowflake_env.port} refused the login of TRANSFORMER: "
        "250001 (08001): Failed to connect to DB: acme-test.snowflakecomputing.com:443. "
        "Incorrect username or password was specified. (check SNOWFLAKE_USER, SNOWFLAKE_ROLE and the key or password)"
    )
    assert warehouse.known_problem() == "warehouse settings unusable"
    assert snowflake_env.env()["SNOWFLAKE_PASSWORD"] not in str(error.value)


def test_inside_a_run_dbt_tags_its_queries_with_the_run(snowflake_env: FakesnowServer, inside_a_flow_run: str) -> None:
    """The tag dbt-snowflake sets (the profile's query_tag reads this variable), by which the
    run's cost is found."""
    environment = _warehouse().dbt_environment()
    assert environment[QUERY_TAG_VARIABLE] == f'{{"app":"elt-appliance","flow_run_id":"{RUN_ID}"}}'
    assert environment["SNOWFLAKE_PASSWORD"] == snowflake_env.env()["SNOWFLAKE_PASSWORD"]
