"""Snowflake: one place that turns settings into credentials for snowflake-connector-python and dbt-snowflake.

Auth is a key pair (SNOWFLAKE_PRIVATE_KEY as a PEM, as the base64 body of one, or as a path,
with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE when encrypted) or a password. The key is normalised
once to unencrypted PKCS#8 DER: the connector takes the bytes, dbt-snowflake the base64 of
them (it reads a `private_key` not starting with '-' as base64 DER). Neither the key nor the
password is ever written to a file or a message.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from elt.errors import ConfigurationError
from elt.settings import Settings

DBT_KEY_VARIABLE = "ELT_SNOWFLAKE_PRIVATE_KEY_DER_BASE64"
QUERY_TAG_VARIABLE = "ELT_SNOWFLAKE_QUERY_TAG"
_ACCEPTED_FORMS = (
    "a PEM (the '-----BEGIN ... KEY-----' block), its base64 body with the header, footer and newlines "
    "removed, or the path to a .p8/.pem file"
)


class SnowflakeKeyError(ConfigurationError):
    pass


def private_key_der(value: str, passphrase: str | None = None) -> bytes:
    """The key as unencrypted PKCS#8 DER, whichever accepted form it came in."""
    text = value.strip().replace("\\n", "\n")
    password = passphrase.encode() if passphrase else None
    if text.startswith("-----BEGIN"):
        return _normalise(lambda: serialization.load_pem_private_key(text.encode(), password), "PEM", passphrase)
    compact = "".join(text.split())
    if len(compact) > 64 and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", compact):
        try:
            der = base64.b64decode(compact)
        except ValueError:  # binascii.Error: a character lost in a copy-paste
            raise SnowflakeKeyError(f"SNOWFLAKE_PRIVATE_KEY (base64 body) is truncated or damaged; expected {_ACCEPTED_FORMS}") from None
        return _normalise(lambda: serialization.load_der_private_key(der, password), "base64 body", passphrase)
    path = Path(text).expanduser()
    if path.is_file():
        data = path.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return _normalise(lambda: serialization.load_pem_private_key(data, password), f"PEM file {path}", passphrase)
        return _normalise(lambda: serialization.load_der_private_key(data, password), f"DER file {path}", passphrase)
    if len(text) < 512 and (text.startswith(("/", "~", ".")) or text.endswith((".p8", ".pem", ".der"))):
        raise SnowflakeKeyError(f"SNOWFLAKE_PRIVATE_KEY looks like a path, but {path} is not a file; expected {_ACCEPTED_FORMS}")
    raise SnowflakeKeyError(f"SNOWFLAKE_PRIVATE_KEY is not a key; expected {_ACCEPTED_FORMS}")


def _normalise(load, form: str, passphrase: str | None) -> bytes:
    try:
        key = load()
    except TypeError:
        if passphrase:
            raise SnowflakeKeyError("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE is set but the key is not encrypted; unset it") from None
        raise SnowflakeKeyError("SNOWFLAKE_PRIVATE_KEY is encrypted: set SNOWFLAKE_PRIVATE_KEY_PASSPHRASE") from None
    except ValueError:
        if passphrase:
            raise SnowflakeKeyError(
                f"SNOWFLAKE_PRIVATE_KEY ({form}) could not be read with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE: "
                f"a wrong passphrase, or not a key; expected {_ACCEPTED_FORMS}"
            ) from None
        raise SnowflakeKeyError(f"SNOWFLAKE_PRIVATE_KEY ({form}) is not a valid private key; expected {_ACCEPTED_FORMS}") from None
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _required(settings: Settings) -> None:
    missing = [
        f"SNOWFLAKE_{name.upper()}"
        for name in ("account", "user", "warehouse", "database")
        if not getattr(settings, f"snowflake_{name}")
    ]
    if not (settings.snowflake_password or settings.snowflake_private_key):
        missing.append("SNOWFLAKE_PRIVATE_KEY or SNOWFLAKE_PASSWORD")
    if missing:
        raise ConfigurationError(f"ELT_WAREHOUSE=snowflake needs {', '.join(missing)}")


def connect_kwargs(settings: Settings, query_tag: str | None = None) -> dict[str, Any]:
    """Arguments for snowflake.connector.connect."""
    _required(settings)
    kwargs: dict[str, Any] = {
        "account": settings.snowflake_account,
        "user": settings.snowflake_user,
        "role": settings.snowflake_role,
        "warehouse": settings.snowflake_warehouse,
        "database": settings.snowflake_database,
        "schema": settings.snowflake_schema,
        "login_timeout": 30,
        "network_timeout": 120,
        "application": "elt-appliance",
    }
    if settings.snowflake_private_key:
        passphrase = settings.snowflake_private_key_passphrase
        kwargs["private_key"] = private_key_der(
            settings.snowflake_private_key.get_secret_value(), passphrase.get_secret_value() if passphrase else None
        )
    else:
        kwargs["password"] = settings.snowflake_password.get_secret_value()
    for name in ("host", "port", "protocol"):
        if getattr(settings, f"snowflake_{name}") is not None:
            kwargs[name] = getattr(settings, f"snowflake_{name}")
    if query_tag:
        kwargs["session_parameters"] = {"QUERY_TAG": query_tag}
    return {key: value for key, value in kwargs.items() if value is not None}


def connect(settings: Settings, query_tag: str | None = None):
    import snowflake.connector

    return snowflake.connector.connect(**connect_kwargs(settings, query_tag))


def dbt_output(settings: Settings) -> dict[str, Any]:
    """The profile's snowflake output: every secret is an env_var() reference, filled by dbt_environment."""
    output: dict[str, Any] = {
        "type": "snowflake",
        "account": "{{ env_var('SNOWFLAKE_ACCOUNT') }}",
        "user": "{{ env_var('SNOWFLAKE_USER') }}",
        "warehouse": "{{ env_var('SNOWFLAKE_WAREHOUSE') }}",
        "database": "{{ env_var('SNOWFLAKE_DATABASE') }}",
        "schema": "{{ env_var('SNOWFLAKE_SCHEMA') }}",
        "query_tag": f"{{{{ env_var('{QUERY_TAG_VARIABLE}', 'elt') }}}}",
        "threads": settings.dbt_threads,
        "connect_timeout": 30,
    }
    if settings.snowflake_role:
        output["role"] = "{{ env_var('SNOWFLAKE_ROLE') }}"
    if settings.snowflake_private_key:
        output["private_key"] = f"{{{{ env_var('{DBT_KEY_VARIABLE}') }}}}"
    else:
        output["password"] = "{{ env_var('SNOWFLAKE_PASSWORD') }}"
    for name in ("host", "port", "protocol"):
        value = getattr(settings, f"snowflake_{name}")
        if value is not None:
            output[name] = value
    return output


def dbt_environment(settings: Settings) -> dict[str, str]:
    """The variables dbt_output refers to."""
    _required(settings)
    env = {
        "SNOWFLAKE_ACCOUNT": settings.snowflake_account,
        "SNOWFLAKE_USER": settings.snowflake_user,
        "SNOWFLAKE_ROLE": settings.snowflake_role,
        "SNOWFLAKE_WAREHOUSE": settings.snowflake_warehouse,
        "SNOWFLAKE_DATABASE": settings.snowflake_database,
        "SNOWFLAKE_SCHEMA": settings.snowflake_schema,
    }
    if settings.snowflake_private_key:
        kwargs = connect_kwargs(settings)
        env[DBT_KEY_VARIABLE] = base64.b64encode(kwargs["private_key"]).decode()
    else:
        env["SNOWFLAKE_PASSWORD"] = settings.snowflake_password.get_secret_value()
    return {key: value for key, value in env.items() if value is not None}


def query_tag(flow_run_id: str | None) -> str:
    """The tag every query of a run carries; dbt adds each node's id in its query comment."""
    return json.dumps({"app": "elt-appliance", "flow_run_id": flow_run_id}, separators=(",", ":"))


_DUCKDB_TO_SNOWFLAKE = {
    "BIGINT": "NUMBER(38,0)",
    "INTEGER": "NUMBER(38,0)",
    "HUGEINT": "NUMBER(38,0)",
    "DOUBLE": "FLOAT",
    "FLOAT": "FLOAT",
    "BOOLEAN": "BOOLEAN",
    "VARCHAR": "VARCHAR",
    "DATE": "DATE",
    "TIMESTAMP": "TIMESTAMP_NTZ",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP_TZ",
    "JSON": "VARCHAR",  # kept as text; PARSE_JSON it in a staging model when needed
}
_BATCH_ROWS = 5000


def replace_tables_from_duckdb(settings: Settings, duckdb_path: Path, schema: str, tables: list[str]) -> dict[str, int]:
    """Copy whole tables from a DuckDB file into SNOWFLAKE_DATABASE.<schema>, each replaced in one transaction.

    The embedded backend stages each sync in DuckDB (PyAirbyte keeps incremental state there)
    and publishes the full tables here: a failure leaves the previous rows in place, never half a load.
    """
    import duckdb

    copied: dict[str, int] = {}
    with duckdb.connect(str(duckdb_path), read_only=True) as source, connect(settings, query_tag("embedded-load")) as target:
        cursor = target.cursor()
        cursor.execute(f'create schema if not exists "{settings.snowflake_database}".{schema}')
        for table in tables:
            columns = source.execute(
                "select column_name, data_type from information_schema.columns "
                "where table_schema = ? and table_name = ? order by ordinal_position",
                [schema, table],
            ).fetchall()
            definition = ", ".join(f"{name} {_snowflake_type(data_type)}" for name, data_type in columns)
            qualified = f'"{settings.snowflake_database}".{schema}.{table}'
            cursor.execute(f"create table if not exists {qualified} ({definition})")
            rows = source.execute(f'select * from "{schema}"."{table}"')
            placeholders = ", ".join(["%s"] * len(columns))
            names = ", ".join(name for name, _ in columns)
            cursor.execute("begin")
            try:
                cursor.execute(f"delete from {qualified}")
                count = 0
                while batch := rows.fetchmany(_BATCH_ROWS):
                    cursor.executemany(f"insert into {qualified} ({names}) values ({placeholders})", [_bindable(row) for row in batch])
                    count += len(batch)
                cursor.execute("commit")
            except BaseException:
                cursor.execute("rollback")
                raise
            copied[table] = count
    return copied


def _snowflake_type(duckdb_type: str) -> str:
    if duckdb_type.startswith("DECIMAL"):
        return duckdb_type.replace("DECIMAL", "NUMBER")
    return _DUCKDB_TO_SNOWFLAKE.get(duckdb_type, "VARCHAR")


def _bindable(row: tuple) -> tuple:
    return tuple(json.dumps(value) if isinstance(value, (dict, list)) else value for value in row)


def missing_grants(settings: Settings, sources: list[tuple[str, str, str]]) -> list[str]:
    """Probe what all-etl needs, as its role: each problem with the GRANT that fixes it.

    `sources` are the (database, schema, table) the dbt project reads, i.e. what Airbyte loads.
    """
    from snowflake.connector.errors import ProgrammingError

    role = settings.snowflake_role or "<role of SNOWFLAKE_USER>"
    database, target = settings.snowflake_database, settings.snowflake_schema
    problems: list[str] = []
    with connect(settings, query_tag("doctor")) as connection:
        cursor = connection.cursor()
        try:
            cursor.execute(f'use warehouse "{settings.snowflake_warehouse}"')
        except ProgrammingError:
            problems.append(
                f"role {role} cannot use warehouse {settings.snowflake_warehouse}: "
                f"GRANT USAGE ON WAREHOUSE {settings.snowflake_warehouse} TO ROLE {role};"
            )
        schemas: dict[tuple[str, str], list[str]] = {}
        for source_database, schema, table in sources:
            schemas.setdefault(((source_database or database).upper(), schema.upper()), []).append(table)
        for (source_database, schema), tables in schemas.items():
            try:
                visible = cursor.execute(
                    f'select count(*) from "{source_database}".information_schema.schemata where upper(schema_name) = %s',
                    (schema,),
                ).fetchone()[0]
            except ProgrammingError:
                visible = 0
            if not visible:
                problems.append(
                    f"role {role} cannot see raw schema {source_database}.{schema} (not loaded yet, or no USAGE): "
                    f"GRANT USAGE ON DATABASE {source_database} TO ROLE {role}; GRANT USAGE ON SCHEMA {source_database}.{schema} TO ROLE {role};"
                )
                continue
            for table in tables:
                try:
                    cursor.execute(f'select * from "{source_database}".{schema}.{table} limit 0')
                except ProgrammingError:
                    problems.append(
                        f"role {role} cannot read {source_database}.{schema}.{table} (not loaded yet, or no SELECT): "
                        f"GRANT SELECT ON ALL TABLES IN SCHEMA {source_database}.{schema} TO ROLE {role}; "
                        f"GRANT SELECT ON FUTURE TABLES IN SCHEMA {source_database}.{schema} TO ROLE {role};"
                    )
        probe_schema = f'"{database}".{target}_ELT_DOCTOR_PROBE'
        try:
            cursor.execute(f"create schema if not exists {probe_schema}")
            cursor.execute(f"drop schema if exists {probe_schema}")
        except ProgrammingError:
            problems.append(
                f"role {role} cannot create schemas in {database} (dbt builds <schema>_staging and <schema>_marts): "
                f"GRANT CREATE SCHEMA ON DATABASE {database} TO ROLE {role};"
            )
        try:
            cursor.execute(f'create schema if not exists "{database}".{target}')
            cursor.execute(f'create or replace transient table "{database}".{target}.elt_doctor_probe (id int)')
            cursor.execute(f'drop table if exists "{database}".{target}.elt_doctor_probe')
        except ProgrammingError:
            problems.append(
                f"role {role} cannot create tables in {database}.{target}: "
                f"GRANT USAGE, CREATE TABLE, CREATE VIEW ON SCHEMA {database}.{target} TO ROLE {role};"
            )
    return problems


# Credits per hour of a standard warehouse, by WAREHOUSE_SIZE as query history reports it.
CREDITS_PER_HOUR = {
    "X-Small": 1, "Small": 2, "Medium": 4, "Large": 8, "X-Large": 16, "2X-Large": 32,
    "3X-Large": 64, "4X-Large": 128, "5X-Large": 256, "6X-Large": 512,
}
_NODE_IN_COMMENT = re.compile(r'"node_id":\s*"([^"]+)"')


def run_query_history(settings: Settings, flow_run_id: str, hours: int = 24) -> list[dict[str, Any]]:
    """This run's queries from INFORMATION_SCHEMA.QUERY_HISTORY (no ACCOUNT_USAGE latency), found by query tag."""
    tag = query_tag(flow_run_id)
    sql = (
        f'select query_id, query_text, query_tag, warehouse_size, total_elapsed_time, execution_time, bytes_scanned '
        f'from table("{settings.snowflake_database}".information_schema.query_history('
        f"end_time_range_start => dateadd('hour', -{int(hours)}, current_timestamp()), result_limit => 10000)) "
        "where query_tag = %s"
    )
    with connect(settings, query_tag(None)) as connection:
        cursor = connection.cursor()
        cursor.execute(sql, (tag,))
        columns = [column[0].upper() for column in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]


def cost_per_node(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queries, elapsed seconds, bytes scanned and estimated credits per dbt node, then a total row.

    dbt-snowflake prefixes every query with a comment naming its node; queries outside a node
    (hooks, schema creation, introspection) count under "(dbt overhead)". Credits are
    execution time × the warehouse size's hourly rate: an estimate that ignores the 60-second
    minimum after a resume and idle time before auto-suspend.
    """
    nodes: dict[str, dict[str, Any]] = {}
    for query in history:
        match = _NODE_IN_COMMENT.search(query.get("QUERY_TEXT") or "")
        node = match.group(1) if match else "(dbt overhead)"
        row = nodes.setdefault(node, {"node": node, "queries": 0, "elapsed_seconds": 0.0, "bytes_scanned": 0, "estimated_credits": 0.0})
        row["queries"] += 1
        row["elapsed_seconds"] += (query.get("TOTAL_ELAPSED_TIME") or 0) / 1000
        row["bytes_scanned"] += query.get("BYTES_SCANNED") or 0
        rate = CREDITS_PER_HOUR.get(query.get("WAREHOUSE_SIZE") or "", 0)
        row["estimated_credits"] += (query.get("EXECUTION_TIME") or 0) / 3_600_000 * rate
    rows = sorted(nodes.values(), key=lambda row: row["estimated_credits"], reverse=True)
    total = {
        "node": "TOTAL",
        "queries": sum(row["queries"] for row in rows),
        "elapsed_seconds": sum(row["elapsed_seconds"] for row in rows),
        "bytes_scanned": sum(row["bytes_scanned"] for row in rows),
        "estimated_credits": sum(row["estimated_credits"] for row in rows),
    }
    for row in [*rows, total]:
        row["elapsed_seconds"] = round(row["elapsed_seconds"], 3)
        row["estimated_credits"] = round(row["estimated_credits"], 6)
    return [*rows, total]
