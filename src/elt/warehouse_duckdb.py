"""DuckDB, the embedded warehouse: one file (ELT_DUCKDB_PATH) that PyAirbyte loads and dbt builds in."""

from __future__ import annotations

import shutil
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elt.settings import Settings
from elt.warehouse import Warehouse, WarehouseUnreachable, display_name

if TYPE_CHECKING:
    import duckdb


class DuckDBWarehouse(Warehouse):
    name = "DuckDB"

    @property
    def path(self) -> Path:
        return self.settings.path(self.settings.duckdb_path)

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".run.lock")

    @property
    def _identity(self) -> str:
        return f"duckdb:{self.path}"

    def _open(self) -> None:
        import duckdb

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(duckdb.connect(str(self.path))) as connection:
                connection.execute("select 1")
        except Exception as exc:  # noqa: BLE001 - duckdb raises IOException, PermissionError, lock errors...
            raise WarehouseUnreachable(f"ELT_DUCKDB_PATH={self.path}: cannot open the DuckDB file: {exc}") from None

    @property
    def staging_path(self) -> Path:
        return self.path  # PyAirbyte writes into the warehouse itself: nothing to publish

    def schema_location(self, schema: str) -> str:
        return f"DuckDB {self.path} schema {schema}"

    def dbt_output(self) -> dict[str, Any]:
        return {
            "type": "duckdb",
            "path": str(self.path),
            "schema": self.settings.dbt_schema,
            "threads": self.settings.dbt_threads,
        }

    def prepare_for_dbt(self) -> None:
        """dbt-duckdb creates the database file but not its folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def settings_reading_a_copy(self, folder: Path) -> Settings:
        """A copy of the file (and its write-ahead log): DuckDB locks a file even for a reader."""
        copy = folder / "warehouse.duckdb"
        shutil.copy2(self.path, copy)
        if Path(f"{self.path}.wal").exists():
            shutil.copy2(f"{self.path}.wal", f"{copy}.wal")
        return self.settings.model_copy(update={"duckdb_path": copy})

    def _row_counts(self, relations: list[str]) -> dict[str, int]:
        import duckdb

        if not self.path.exists():
            return {}
        with closing(duckdb.connect(str(self.path), read_only=True)) as connection:
            attached = {name for (name,) in connection.execute("select database_name from duckdb_databases()").fetchall()}
            return {
                display_name(relation): _count(connection, f"select count(*) from {relation}")
                for relation in relations
                if display_name(relation).split(".")[0] in attached  # built by a project profile into another DuckDB file
            }


def _count(connection: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = connection.execute(sql).fetchone()
    assert row is not None  # count(*) gives one row
    return int(row[0])
