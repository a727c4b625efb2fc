"""Snowflake, the production warehouse (`SnowflakeWarehouse`): credentials for snowflake-connector-python
and dbt-snowflake, publishing staged tables, the grants probe and cost per run.

Auth is a key pair (SNOWFLAKE_PRIVATE_KEY as a PEM, as the base64 body of one, or as a path,
with SNOWFLAKE_PRIVATE_KEY_PASSPHRASE when encrypted) or a password. The key is normalised
once to unencrypted PKCS#8 DER: the connector takes the bytes, dbt-snowflake the base64 of
them (it reads a `private_key` not starting with '-' as base64 DER). Neither the key nor the
password is ever written to a file or a message.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pydantic import BaseModel, ConfigDict, SecretStr

from elt.errors import ConfigurationError, EltError, TransientError
from elt.settings import Settings
from elt.warehouse import MissingGrants, RunCost, Warehouse, WarehouseUnreachable, display_name

if TYPE_CHECKING:
    from snowflake.connector import SnowflakeConnection
    from snowflake.connector.cursor import SnowflakeCursor

DBT_KEY_VARIABLE = "ELT_SNOWFLAKE_PRIVATE_KEY_DER_BASE64"
QUERY_TAG_VARIABLE = "ELT_SNOWFLAKE_QUERY_TAG"
_ACCEPTED_FORMS = (
    "a PEM (the '-----BEGIN ... KEY-----' block), its base64 body with the header, footer and newlines "
    "removed, or the path to a .p8/.pem file"
)


class SnowflakeKeyError(ConfigurationError):
    pass


class SnowflakeUnreachable(TransientError):
    pass


class SnowflakeLoginRejected(ConfigurationError):
    pass


class QueryHistoryUnavailable(EltError):
    pass


def private_key_der(value: str, passphrase: str | None = None) -> bytes:
    """The key as unencrypted PKCS#8 DER, whichever accepted form it came in."""
    text = value.strip().replace("\\n", "\n")
    password = passphrase.encode() if passphrase else None
    if text.startswith("-----BEGIN") and "-----END" not in text:
        raise SnowflakeKeyError(_truncated_pem_message())
    if text.startswith("-----BEGIN"):
        return _normalise(lambda: serialization.load_pem_private_key(text.encode(), password), "PEM", passphrase)
    compact = "".join(text.split())
    if len(compact) > 64 and re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", compact):
        try:
            der = base64.b64decode(compact)
        except ValueError:  # binascii.Error: a character lost in a copy-paste
            raise SnowflakeKeyError(
                f"SNOWFLAKE_PRIVATE_KEY (base64 body) is truncated or damaged; expected {_ACCEPTED_FORMS}"
            ) from None
        return _normalise(lambda: serialization.load_der_private_key(der, password), "base64 body", passphrase)
    path = Path(text).expanduser()
    if _is_file(path):
        data = path.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return _normalise(lambda: serialization.load_pem_private_key(data, password), f"PEM file {path}", passphrase)
        return _normalise(lambda: serialization.load_der_private_key(data, password), f"DER file {path}", passphrase)
    if len(text) < 512 and (text.startswith(("/", "~", ".")) or text.endswith((".p8", ".pem", ".der"))):
        raise SnowflakeKeyError(f"SNOWFLAKE_PRIVATE_KEY looks like a path, but {path} is not a file; expected {_ACCEPTED_FORMS}")
    raise SnowflakeKeyError(f"SNOWFLAKE_PRIVATE_KEY is not a key; expected {_ACCEPTED_FORMS}")


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False where the value cannot be a file name at all: a part longer than
    the system allows raises OSError (ENAMETOOLONG), whose message would carry the whole value."""
    try:
        return path.is_file()
    except OSError:
        return False


def _truncated_pem_message() -> str:
    """An unquoted multi-line PEM in .env: python-dotenv keeps only its first line."""
    env_file = Path(".env")
    lines = env_file.read_text(errors="replace").splitlines() if env_file.is_file() else []
    if any(re.match(r"^\s*(export\s+)?(ELT_)?SNOWFLAKE_PRIVATE_KEY\s*=\s*-----BEGIN", line) for line in lines):
        return (
            'SNOWFLAKE_PRIVATE_KEY in .env: a multi-line key must be quoted (SNOWFLAKE_PRIVATE_KEY="-----BEGIN ..."), '
            "or give a path (SNOWFLAKE_PRIVATE_KEY=/path/to/rsa_key.p8)"
        )
    return f"SNOWFLAKE_PRIVATE_KEY is a PEM cut off after its first line (no END line); expected {_ACCEPTED_FORMS}"


def _normalise(load: Callable[[], PrivateKeyTypes], form: str, passphrase: str | None) -> bytes:
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
        raise SnowflakeKeyError(
            f"SNOWFLAKE_PRIVATE_KEY ({form}) is not a valid private key; expected {_ACCEPTED_FORMS}"
        ) from None
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class SnowflakeCredentials(BaseModel):
    """One Snowflake login, from the SNOWFLAKE_ settings. Secrets stay SecretStr (hidden in str()
    and repr()) until `to_connector_params()` hands them to the connector; dbt gets the same
    login from `dbt_output()` and `dbt_environment()`, its secrets through env_var().

    Like dlt's `SnowflakeCredentials.to_connector_params()`: the connector's arguments come from
    one place. The login fields are named as the connector's arguments, which dbt-snowflake's
    profile keys share; each is set by the variable SNOWFLAKE_<NAME>.
    """

    model_config = ConfigDict(frozen=True)

    account: str
    user: str
    warehouse: str
    database: str
    schema_name: str
    role: str | None = None
    password: SecretStr | None = None
    private_key: SecretStr | None = None
    private_key_passphrase: SecretStr | None = None
    host: str | None = None
    port: int | None = None
    protocol: str | None = None
    connect_timeout_seconds: float = 10

    @classmethod
    def from_settings(cls, settings: Settings) -> SnowflakeCredentials:
        """The login in the settings; ConfigurationError naming every variable missing (no connection made)."""
        values = {name: getattr(settings, f"snowflake_{name.removesuffix('_name')}") for name in cls.model_fields}
        missing = [f"SNOWFLAKE_{name.upper()}" for name in ("account", "user", "warehouse", "database") if not values[name]]
        if not (values["password"] or values["private_key"]):
            missing.append("SNOWFLAKE_PRIVATE_KEY or SNOWFLAKE_PASSWORD")
        if missing:
            raise ConfigurationError(f"ELT_WAREHOUSE=snowflake needs {', '.join(missing)}")
        return cls(**values)

    @property
    def login(self) -> dict[str, str | None]:
        """account, user, role, warehouse, database and schema, by the connector's (and dbt-snowflake's) names."""
        return {
            "account": self.account,
            "user": self.user,
            "role": self.role,
            "warehouse": self.warehouse,
            "database": self.database,
            "schema": self.schema_name,
        }

    @property
    def endpoint(self) -> dict[str, str | int]:
        """host, port and protocol where they are set (private link, a test server)."""
        return {
            name: value
            for name, value in {"host": self.host, "port": self.port, "protocol": self.protocol}.items()
            if value is not None
        }

    def describe(self) -> str:
        """Where the appliance connects, for messages: the account, and the host and port when they are set."""
        host = self.host or f"{self.account}.snowflakecomputing.com"
        port = self.port or (80 if self.protocol == "http" else 443)
        return f"Snowflake account {self.account} at {self.protocol or 'https'}://{host}:{port}"

    def private_key_der(self) -> bytes | None:
        """The key as unencrypted PKCS#8 DER (SnowflakeKeyError when it can't be read); None with password auth."""
        if not self.private_key:
            return None
        passphrase = self.private_key_passphrase.get_secret_value() if self.private_key_passphrase else None
        return private_key_der(self.private_key.get_secret_value(), passphrase)

    def _password(self) -> str:
        if self.password is None:  # from_settings refuses a login with neither key nor password
            raise ConfigurationError("ELT_WAREHOUSE=snowflake needs SNOWFLAKE_PRIVATE_KEY or SNOWFLAKE_PASSWORD")
        return self.password.get_secret_value()

    def to_connector_params(self, query_tag: str | None = None, probe: bool = False) -> dict[str, Any]:
        """Arguments for snowflake.connector.connect. `probe`: a connection for quick checks only,
        whose every socket read is bounded too (a host that accepts but never answers fails in
        seconds); a run's connections keep the connector's read timeout, as long queries need."""
        params: dict[str, Any] = {
            **self.login,
            **self.endpoint,
            "login_timeout": self.connect_timeout_seconds,
            "network_timeout": 120,
            "application": "elt-appliance",
        }
        key = self.private_key_der()
        if key is not None:
            params["private_key"] = key
        else:
            params["password"] = self._password()
        if query_tag:
            params["session_parameters"] = {"QUERY_TAG": query_tag}
        if probe:
            params["socket_timeout"] = self.connect_timeout_seconds
        return {key: value for key, value in params.items() if value is not None}

    def dbt_output(self, threads: int) -> dict[str, Any]:
        """The profile's snowflake output: every login field an env_var() reference, filled by dbt_environment."""
        output: dict[str, Any] = {
            "type": "snowflake",
            **{name: f"{{{{ env_var('SNOWFLAKE_{name.upper()}') }}}}" for name, value in self.login.items() if value},
            "query_tag": f"{{{{ env_var('{QUERY_TAG_VARIABLE}', 'elt') }}}}",
            "threads": threads,
            # One login attempt, bounded: an unreachable account fails in seconds, naming itself.
            "connect_timeout": math.ceil(self.connect_timeout_seconds),
            "connect_retries": 0,
        }
        if self.private_key:
            output["private_key"] = f"{{{{ env_var('{DBT_KEY_VARIABLE}') }}}}"
        else:
            output["password"] = "{{ env_var('SNOWFLAKE_PASSWORD') }}"
        return output | self.endpoint

    def dbt_environment(self) -> dict[str, str]:
        """The variables dbt_output refers to. The rendered profile has host, port and protocol
        inline; a project's own profiles.yml reads them here."""
        env = {
            f"SNOWFLAKE_{name.upper()}": str(value) for name, value in (self.login | self.endpoint).items() if value is not None
        }
        env["SNOWFLAKE_CONNECT_TIMEOUT_SECONDS"] = str(math.ceil(self.connect_timeout_seconds))
        key = self.private_key_der()
        if key is not None:
            env[DBT_KEY_VARIABLE] = base64.b64encode(key).decode()
        else:
            env["SNOWFLAKE_PASSWORD"] = self._password()
        return env


def _count(cursor: SnowflakeCursor, sql: str, params: tuple[str, ...] = ()) -> int:
    cursor.execute(sql, params)
    row = cursor.fetchone()
    assert isinstance(row, tuple)  # count(*) gives one row; a plain cursor gives tuples
    return int(row[0])


def connect(credentials: SnowflakeCredentials, query_tag: str | None = None, probe: bool = False) -> SnowflakeConnection:
    """A connection, after one login bounded by SNOWFLAKE_CONNECT_TIMEOUT_SECONDS; failing that,
    SnowflakeUnreachable naming the account, host and port (or SnowflakeLoginRejected)."""
    import snowflake.connector
    from snowflake.connector.errors import DatabaseError, InterfaceError, OperationalError

    params = credentials.to_connector_params(query_tag, probe)
    try:
        return snowflake.connector.connect(**params)
    except (DatabaseError, InterfaceError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        if not isinstance(exc, (OperationalError, InterfaceError)):  # reached, but the login was refused
            raise SnowflakeLoginRejected(
                f"{credentials.describe()} refused the login of {credentials.user}: {first_line} "
                "(check SNOWFLAKE_USER, SNOWFLAKE_ROLE and the key or password)"
            ) from None
        raise SnowflakeUnreachable(
            f"cannot connect to {credentials.describe()} as {credentials.user}: {first_line} "
            "(check SNOWFLAKE_ACCOUNT, SNOWFLAKE_HOST/SNOWFLAKE_PORT and the network; "
            f"SNOWFLAKE_CONNECT_TIMEOUT_SECONDS={credentials.connect_timeout_seconds:g})"
        ) from None


def query_tag(flow_run_id: str | None, stage: str | None = None) -> str:
    """The tag every query of a run carries (`flow_run_id`: the all-etl run's); dbt adds each
    node's id in its query comment, the embedded load says `"stage":"load"`."""
    tag = {"app": "elt-appliance", "flow_run_id": flow_run_id} | ({"stage": stage} if stage else {})
    return json.dumps(tag, separators=(",", ":"))


def root_flow_run_id() -> str | None:
    """The id of the all-etl run this code runs under (the top of the flow-run tree), if any."""
    from prefect.runtime import flow_run

    return str(flow_run.root_flow_run_id) if flow_run.id else None


_DUCKDB_TO_SNOWFLAKE = {
    "BIGINT": "NUMBER(38,0)",
    "INTEGER": "NUMBER(38,0)",
    "HUGEINT": "NUMBER(38,0)",
    "DOUBLE": "FLOAT",
    "FLOAT": "FLOAT",
    "BOOLEAN": "BOOLEAN",
    "VARCHAR": "VARCHAR",
    "DATE": "DATE",
    "TIME": "TIME",  # PyAirbyte's type for a string of format "time"
    "TIMESTAMP": "TIMESTAMP_NTZ",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMP_TZ",
    "JSON": "VARCHAR",  # kept as text; PARSE_JSON it in a staging model when needed
}
_BATCH_ROWS = 5000


def replace_tables_from_duckdb(
    credentials: SnowflakeCredentials, duckdb_path: Path, schema: str, tables: list[str]
) -> dict[str, int]:
    """Copy whole tables from a DuckDB file into SNOWFLAKE_DATABASE.<schema>, each replaced in one transaction.

    The embedded backend stages each sync in DuckDB (PyAirbyte keeps incremental state there)
    and publishes the full tables here: a failure leaves the previous rows in place, never half a load.
    """
    import duckdb

    copied: dict[str, int] = {}
    tag = query_tag(root_flow_run_id(), stage="load")
    with duckdb.connect(str(duckdb_path), read_only=True) as source, connect(credentials, tag) as target:
        cursor = target.cursor()
        cursor.execute(f'create schema if not exists "{credentials.database}".{schema}')
        for table in tables:
            columns = source.execute(
                "select column_name, data_type from information_schema.columns "
                "where table_schema = ? and table_name = ? order by ordinal_position",
                [schema, table],
            ).fetchall()
            definition = ", ".join(f"{name} {_snowflake_type(data_type)}" for name, data_type in columns)
            qualified = f'"{credentials.database}".{schema}.{table}'
            cursor.execute(f"create table if not exists {qualified} ({definition})")
            # A column the source sends since an earlier sync created the table. Before `begin`:
            # Snowflake commits at every DDL statement.
            cursor.execute(f"describe table {qualified}")
            present = {str(row[0]).upper() for row in cursor.fetchall()}
            for name, data_type in columns:
                if name.upper() not in present:
                    cursor.execute(f"alter table {qualified} add column {name} {_snowflake_type(data_type)}")
            rows = source.execute(f'select * from "{schema}"."{table}"')
            placeholders = ", ".join(["%s"] * len(columns))
            names = ", ".join(name for name, _ in columns)
            cursor.execute("begin")
            try:
                cursor.execute(f"delete from {qualified}")
                count = 0
                while batch := rows.fetchmany(_BATCH_ROWS):
                    cursor.executemany(
                        f"insert into {qualified} ({names}) values ({placeholders})", [_bindable(row) for row in batch]
                    )
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


@dataclass
class GrantReport:
    problems: list[str] = field(default_factory=list)  # each with the GRANT that fixes it
    not_loaded_yet: list[str] = field(default_factory=list)  # raw schemas the first run creates
    unread_tables: int = 0  # source tables not probed (their schema is not loaded yet)


def missing_grants(
    credentials: SnowflakeCredentials,
    sources: list[tuple[str, str, str]],
    first_run_creates: frozenset[str] | set[str] = frozenset(),
) -> GrantReport:
    """Probe what all-etl needs, as its role: each problem with the GRANT that fixes it.

    `sources` are the (database, schema, table) the dbt project reads, i.e. what Airbyte loads.
    `first_run_creates`: raw schemas (upper-case) the embedded backend creates on its first
    run; their absence is not a problem.
    """
    from snowflake.connector.errors import ProgrammingError

    role = credentials.role or "<role of SNOWFLAKE_USER>"
    database, target = credentials.database, credentials.schema_name
    report = GrantReport()
    problems = report.problems
    with connect(credentials, query_tag("doctor")) as connection:
        cursor = connection.cursor()
        try:
            cursor.execute(f'use warehouse "{credentials.warehouse}"')
        except ProgrammingError:
            problems.append(
                f"role {role} cannot use warehouse {credentials.warehouse}: "
                f"GRANT USAGE ON WAREHOUSE {credentials.warehouse} TO ROLE {role};"
            )
        schemas: dict[tuple[str, str], list[str]] = {}
        for source_database, schema, table in sources:
            schemas.setdefault(((source_database or database).upper(), schema.upper()), []).append(table)
        for (source_database, schema), tables in schemas.items():
            try:
                visible = _count(
                    cursor,
                    f'select count(*) from "{source_database}".information_schema.schemata where upper(schema_name) = %s',
                    (schema,),
                )
            except ProgrammingError:
                visible = 0
            if not visible and schema in first_run_creates and source_database == database.upper():
                report.not_loaded_yet.append(f"{source_database}.{schema}")
                report.unread_tables += len(tables)
                continue
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
    return report


# Credits per hour of a standard warehouse, by WAREHOUSE_SIZE as query history reports it.
CREDITS_PER_HOUR = {
    "X-Small": 1,
    "Small": 2,
    "Medium": 4,
    "Large": 8,
    "X-Large": 16,
    "2X-Large": 32,
    "3X-Large": 64,
    "4X-Large": 128,
    "5X-Large": 256,
    "6X-Large": 512,
}
_NODE_IN_COMMENT = re.compile(r'"node_id":\s*"([^"]+)"')


def run_query_history(credentials: SnowflakeCredentials, flow_run_id: str, hours: int = 24) -> list[dict[str, Any]]:
    """This run's queries from INFORMATION_SCHEMA.QUERY_HISTORY (no ACCOUNT_USAGE latency), found
    by query tag; QueryHistoryUnavailable says why when the history can't be read."""
    from snowflake.connector.errors import Error

    tag_prefix = query_tag(flow_run_id)[:-1]  # the load's tag adds a "stage" key after flow_run_id
    sql = (
        f"select query_id, query_text, query_tag, warehouse_size, total_elapsed_time, execution_time, bytes_scanned "
        f'from table("{credentials.database}".information_schema.query_history('
        f"end_time_range_start => dateadd('hour', -{int(hours)}, current_timestamp()), result_limit => 10000)) "
        "where query_tag = %s or startswith(query_tag, %s)"
    )
    try:
        with connect(credentials, query_tag(None)) as connection:
            cursor = connection.cursor()
            cursor.execute(sql, (tag_prefix + "}", tag_prefix + ","))
            columns = [column[0].upper() for column in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    except (Error, SnowflakeUnreachable) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise QueryHistoryUnavailable(
            f"query history unavailable: {credentials.database}.INFORMATION_SCHEMA.QUERY_HISTORY could not be read "
            f"as role {credentials.role or '(default)'}: {reason}"
        ) from None


def cost_per_node(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queries, elapsed seconds, bytes scanned and estimated credits per dbt node, then a total row.

    dbt-snowflake prefixes every query with a comment naming its node; queries outside a node
    (hooks, schema creation, introspection) count under "(dbt overhead)", the embedded
    backend's publishing of raw tables under "(embedded load)". Credits are
    execution time × the warehouse size's hourly rate: an estimate that ignores the 60-second
    minimum after a resume and idle time before auto-suspend.
    """
    nodes: dict[str, dict[str, Any]] = {}
    for query in history:
        match = _NODE_IN_COMMENT.search(query.get("QUERY_TEXT") or "")
        if match:
            node = match.group(1)
        elif '"stage":"load"' in (query.get("QUERY_TAG") or ""):
            node = "(embedded load)"
        else:
            node = "(dbt overhead)"
        row = nodes.setdefault(
            node, {"node": node, "queries": 0, "elapsed_seconds": 0.0, "bytes_scanned": 0, "estimated_credits": 0.0}
        )
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


def cost_line(rows: list[dict[str, Any]]) -> str:
    """The run's total from cost_per_node's rows, on one line."""
    total = rows[-1]
    return (
        f"~{total['estimated_credits']:.4f} Snowflake credits (estimate: {total['queries']} queries, "
        f"{total['elapsed_seconds']:.1f}s; artifact snowflake-cost)"
    )


class SnowflakeWarehouse(Warehouse):
    """Snowflake: dbt builds in SNOWFLAKE_DATABASE; the embedded backend stages each sync in a
    DuckDB file and publishes its tables here."""

    name = "Snowflake"

    @property
    def location(self) -> str:
        settings = self.settings
        return f"Snowflake {settings.snowflake_account} {settings.snowflake_database}.{settings.snowflake_schema}"

    @property
    def lock_path(self) -> Path:
        settings = self.settings
        parts = (settings.snowflake_account, settings.snowflake_database, settings.snowflake_schema)
        name = re.sub(r"[^a-z0-9_.-]+", "_", "-".join(str(part) for part in parts).lower())
        return settings.path(settings.data_dir) / "run-locks" / f"snowflake-{name}.lock"

    @property
    def _identity(self) -> str:
        settings = self.settings
        return f"snowflake:{settings.snowflake_account}:{settings.snowflake_host}:{settings.snowflake_port}:{settings.snowflake_user}"

    @property
    def credentials(self) -> SnowflakeCredentials:
        return SnowflakeCredentials.from_settings(self.settings)

    def check_settings(self) -> None:
        super().check_settings()
        self.credentials.private_key_der()

    def _open(self) -> None:
        try:
            with closing(connect(self.credentials, probe=True)) as connection:
                connection.cursor().execute("select 1")
        except SnowflakeUnreachable as exc:
            raise WarehouseUnreachable(str(exc)) from None

    checks_grants = True

    def check_grants(
        self, sources: list[tuple[str, str, str]], first_run_creates: frozenset[str] | set[str] = frozenset()
    ) -> str:
        credentials = self.credentials
        report = missing_grants(credentials, sources, first_run_creates)
        if report.problems:
            raise MissingGrants(report.problems)
        detail = (
            f"role {credentials.role or '(default)'} can use {credentials.warehouse}, "
            f"read {len(sources) - report.unread_tables} source table(s) and build in {credentials.database}.{credentials.schema_name}"
        )
        if report.not_loaded_yet:
            detail += f"; raw schema {', '.join(report.not_loaded_yet)} not loaded yet (the first run creates it)"
        return detail

    @property
    def staging_path(self) -> Path:
        return self.settings.path(self.settings.data_dir) / "airbyte-staging.duckdb"

    def publish_staged(self, staged: Path, schema: str, tables: list[str]) -> None:
        replace_tables_from_duckdb(self.credentials, staged, schema, tables)

    def schema_location(self, schema: str) -> str:
        return f"Snowflake {self.settings.snowflake_database}.{schema}"

    def dbt_output(self) -> dict[str, Any]:
        return self.credentials.dbt_output(self.settings.dbt_threads)

    def dbt_environment(self) -> dict[str, str]:
        env = self.credentials.dbt_environment()
        flow_run_id = root_flow_run_id()
        if flow_run_id:  # outside a run (elt doctor) the profile's default tag applies
            env[QUERY_TAG_VARIABLE] = query_tag(flow_run_id)
        return env

    def _row_counts(self, relations: list[str]) -> dict[str, int]:
        with closing(connect(self.credentials, query_tag(root_flow_run_id()))) as connection:
            cursor = connection.cursor()
            return {
                display_name(relation, unquoted_upper=True): _count(cursor, f"select count(*) from {relation}")
                for relation in relations
            }

    def run_cost(self) -> RunCost:
        """From Snowflake's query history, by the run's query tag; QueryHistoryUnavailable says why it can't be read."""
        flow_run_id = root_flow_run_id()
        if flow_run_id is None:
            raise QueryHistoryUnavailable("not inside a flow run: no query tag to find this run's queries by")
        rows = cost_per_node(run_query_history(self.credentials, flow_run_id))
        return RunCost(rows, cost_line(rows), "Snowflake queries of this run (load and dbt nodes), with estimated credits")
