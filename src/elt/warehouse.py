"""The warehouse, read back: row counts of what dbt built, and reachability for `elt doctor`."""

from __future__ import annotations

import re
from contextlib import closing
from typing import TYPE_CHECKING

from elt.errors import ConfigurationError, TransientError
from elt.settings import Settings, Warehouse

if TYPE_CHECKING:
    from elt.dbt_runner import DbtRun


class WarehouseUnreachable(TransientError):
    pass


TABLE_MATERIALIZATIONS = frozenset({"table", "incremental"})


def mart_row_counts(settings: Settings, run: "DbtRun | None") -> dict[str, int]:
    """Rows in each table model this dbt run built, keyed by its relation (`database.schema.table`).

    Only this run's models, from run_results.json and the manifest: another project building
    in the same warehouse, or an earlier run's tables, are not this run's. Views are left out
    (counting one runs its query).
    """
    built = [
        node.relation_name for node in (run.results if run else [])
        if node.unique_id.startswith("model.") and node.status == "success"
        and node.materialized in TABLE_MATERIALIZATIONS and node.relation_name
    ]
    if not built:
        return {}
    if settings.warehouse is Warehouse.snowflake:
        return _snowflake_row_counts(settings, built)
    import duckdb

    path = settings.path(settings.duckdb_path)
    if not path.exists():
        return {}
    with closing(duckdb.connect(str(path), read_only=True)) as connection:
        attached = {name for (name,) in connection.execute("select database_name from duckdb_databases()").fetchall()}
        return {
            _display_name(relation): connection.execute(f"select count(*) from {relation}").fetchone()[0]
            for relation in built
            if _display_name(relation).split(".")[0] in attached  # built by a project profile into another DuckDB file
        }


def _snowflake_row_counts(settings: Settings, relations: list[str]) -> dict[str, int]:
    from elt import warehouse_snowflake

    with closing(warehouse_snowflake.connect(settings, warehouse_snowflake.query_tag(warehouse_snowflake.root_flow_run_id()))) as connection:
        cursor = connection.cursor()
        return {
            _display_name(relation, unquoted_upper=True): cursor.execute(f"select count(*) from {relation}").fetchone()[0]
            for relation in relations
        }


_IDENTIFIER = re.compile(r'"(?:[^"]|"")*"|[^.]+')


def _display_name(relation: str, unquoted_upper: bool = False) -> str:
    """`"db"."schema".table` as the warehouse names it (Snowflake stores unquoted identifiers upper-case)."""
    return ".".join(
        piece[1:-1].replace('""', '"') if piece.startswith('"') else (piece.upper() if unquoted_upper else piece)
        for piece in _IDENTIFIER.findall(relation)
    )


# What the last check_reachable found wrong, per warehouse: later checks of `elt doctor` that
# need the same connection say "not checked" instead of failing the same way again.
_last_problem: dict[str, str] = {}


def _identity(settings: Settings) -> str:
    if settings.warehouse is Warehouse.duckdb:
        return f"duckdb:{settings.path(settings.duckdb_path)}"
    return f"snowflake:{settings.snowflake_account}:{settings.snowflake_host}:{settings.snowflake_port}:{settings.snowflake_user}"


def check_reachable(settings: Settings) -> None:
    """Open the warehouse once; raise naming the setting (or the account, host and port) to fix."""
    _last_problem.pop(_identity(settings), None)
    try:
        _open(settings)
    except ConfigurationError:
        _last_problem[_identity(settings)] = "warehouse settings unusable"
        raise
    except WarehouseUnreachable:
        _last_problem[_identity(settings)] = "warehouse unreachable"
        raise


def known_problem(settings: Settings) -> str | None:
    """Why the warehouse check failed in this process ("warehouse unreachable", ...), if it did."""
    return _last_problem.get(_identity(settings))


def _open(settings: Settings) -> None:
    if settings.warehouse is Warehouse.duckdb:
        import duckdb

        path = settings.path(settings.duckdb_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with closing(duckdb.connect(str(path))) as connection:
                connection.execute("select 1")
        except Exception as exc:  # duckdb raises IOException, PermissionError, lock errors...
            raise WarehouseUnreachable(f"ELT_DUCKDB_PATH={path}: cannot open the DuckDB file: {exc}") from None
        return
    from elt import warehouse_snowflake

    try:
        with closing(warehouse_snowflake.connect(settings, probe=True)) as connection:
            connection.cursor().execute("select 1")
    except warehouse_snowflake.SnowflakeUnreachable as exc:
        raise WarehouseUnreachable(str(exc)) from None
