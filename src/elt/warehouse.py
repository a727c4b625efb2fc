"""The warehouse, read back: row counts of what dbt built, and reachability for `elt doctor`."""

from __future__ import annotations

from contextlib import closing

from elt.errors import ConfigurationError, TransientError
from elt.settings import Settings, Warehouse


class WarehouseUnreachable(TransientError):
    pass


def mart_row_counts(settings: Settings) -> dict[str, int]:
    """Rows in every table of every schema whose name ends in `marts`, keyed `schema.table`."""
    if settings.warehouse is Warehouse.snowflake:
        return _snowflake_mart_row_counts(settings)
    import duckdb

    path = settings.path(settings.duckdb_path)
    if not path.exists():
        return {}
    with closing(duckdb.connect(str(path), read_only=True)) as connection:
        tables = connection.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_schema like '%marts' order by 1, 2"
        ).fetchall()
        return {
            f"{schema}.{table}": connection.execute(f'select count(*) from "{schema}"."{table}"').fetchone()[0]
            for schema, table in tables
        }


def _snowflake_mart_row_counts(settings: Settings) -> dict[str, int]:
    from elt import snowflake

    with closing(snowflake.connect(settings, snowflake.query_tag(None))) as connection:
        cursor = connection.cursor()
        tables = cursor.execute(
            f'select table_schema, table_name from "{settings.snowflake_database}".information_schema.tables '
            "where table_schema ilike '%marts' and table_type = 'BASE TABLE' order by 1, 2"
        ).fetchall()
        return {
            f"{schema}.{table}".lower(): cursor.execute(
                f'select count(*) from "{settings.snowflake_database}"."{schema}"."{table}"'
            ).fetchone()[0]
            for schema, table in tables
        }


def check_reachable(settings: Settings) -> None:
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
    from elt import snowflake

    try:
        with closing(snowflake.connect(settings)) as connection:
            connection.cursor().execute("select 1")
    except ConfigurationError:
        raise
    except Exception as exc:
        raise WarehouseUnreachable(f"Snowflake account {settings.snowflake_account}: {str(exc).splitlines()[0]}") from None
