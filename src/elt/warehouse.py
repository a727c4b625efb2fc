"""The warehouse: one interface, a DuckDB and a Snowflake implementation, chosen once from the settings.

Everything that differs between the two lives behind `Warehouse`: the dbt output and
environment, connecting, mart row counts, the reachability and grants checks, publishing the
tables the embedded backend stages in DuckDB, and what a run cost. `warehouse_for` is the one
place that asks which warehouse is configured (ELT_WAREHOUSE); ELT_DBT_TARGET only names the
dbt target.

>>> warehouse_for(load_settings(warehouse="duckdb")).name
'DuckDB'
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elt.errors import ConfigurationError, EltError, TransientError
from elt.settings import Settings, load_settings
from elt.settings import Warehouse as WarehouseKind

if TYPE_CHECKING:
    from elt.dbt_runner import DbtRun


class WarehouseUnreachable(TransientError):
    pass


class MissingGrants(EltError):
    """What the run's role lacks, each problem with the GRANT that fixes it."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} missing grant(s) or object(s):\n" + "\n".join(problems))


@dataclass(frozen=True)
class RunCost:
    """What the warehouse charged for one all-etl run: a table artifact's rows and one line."""

    rows: list[dict[str, Any]]
    line: str
    description: str


TABLE_MATERIALIZATIONS = frozenset({"table", "incremental"})

# What the last check_reachable found wrong, per warehouse: later checks of `elt doctor` that
# need the same connection say "not checked" instead of failing the same way again.
_last_problem: dict[str, str] = {}


class Warehouse(ABC):
    """The warehouse Airbyte loads into and dbt builds in."""

    name: str  # for messages: "DuckDB", "Snowflake"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # --- identity -------------------------------------------------------------------------
    @property
    @abstractmethod
    def location(self) -> str:
        """Where the data is, for messages: the DuckDB file, or the Snowflake account, database and schema."""

    @property
    @abstractmethod
    def lock_path(self) -> Path:
        """The file whose lock one all-etl run holds (src/elt/run_lock.py)."""

    @property
    @abstractmethod
    def _identity(self) -> str:
        """What tells two configured warehouses apart, for the doctor's remembered problems."""

    # --- before a run ---------------------------------------------------------------------
    def check_settings(self) -> None:
        """Every setting it needs is there and readable; no connection made. Raises ConfigurationError."""
        other = {kind.value for kind in WarehouseKind} - {self.settings.warehouse.value}
        if self.settings.effective_dbt_target in other:
            raise ConfigurationError(
                f"ELT_DBT_TARGET={self.settings.effective_dbt_target} but ELT_WAREHOUSE={self.settings.warehouse.value}: "
                f"set ELT_WAREHOUSE={self.settings.effective_dbt_target} (ELT_WAREHOUSE chooses the warehouse; "
                "ELT_DBT_TARGET only names the dbt target)"
            )

    def check_reachable(self) -> None:
        """Open the warehouse once; raise naming the setting (or the account, host and port) to fix."""
        _last_problem.pop(self._identity, None)
        try:
            self.check_settings()
            self._open()
        except ConfigurationError:
            _last_problem[self._identity] = "warehouse settings unusable"
            raise
        except WarehouseUnreachable:
            _last_problem[self._identity] = "warehouse unreachable"
            raise

    def known_problem(self) -> str | None:
        """Why check_reachable failed in this process ("warehouse unreachable", ...), if it did."""
        return _last_problem.get(self._identity)

    @abstractmethod
    def _open(self) -> None:
        """Connect once and run `select 1`; WarehouseUnreachable when that fails."""

    checks_grants = False  # whether check_grants has anything to probe

    def check_grants(
        self, sources: list[tuple[str, str, str]], first_run_creates: frozenset[str] | set[str] = frozenset()
    ) -> str:
        """What the run's role may do, as one line; MissingGrants listing each problem and its fix."""
        return "no grants to check"

    # --- extract-load ---------------------------------------------------------------------
    @property
    @abstractmethod
    def staging_path(self) -> Path:
        """The DuckDB file the embedded backend's PyAirbyte writes into."""

    def publish_staged(self, staged: Path, schema: str, tables: list[str]) -> None:
        """Make the tables a sync staged in `staged` (a DuckDB file) the warehouse's, each whole or not at all."""

    def schema_location(self, schema: str) -> str:
        """A schema of this warehouse, for messages."""
        return f"{self.name} {self.location} schema {schema}"

    # --- transform ------------------------------------------------------------------------
    @abstractmethod
    def dbt_output(self) -> dict[str, Any]:
        """The output of the profile the appliance renders; every secret an env_var() reference."""

    def dbt_environment(self) -> dict[str, str]:
        """The variables dbt_output (or a project's own profiles.yml) reads."""
        return {}

    def prepare_for_dbt(self) -> None:
        """What dbt needs before it connects."""

    def settings_reading_a_copy(self, folder: Path) -> Settings:
        """Settings under which dbt reads this warehouse without holding what the next run needs
        (the dbt-docs service)."""
        return self.settings

    # --- after a run ----------------------------------------------------------------------
    def mart_row_counts(self, run: DbtRun | None) -> dict[str, int]:
        """Rows in each table model this dbt run built, keyed by its relation (`database.schema.table`).

        Only this run's models, from run_results.json and the manifest: another project building
        in the same warehouse, or an earlier run's tables, are not this run's. Views are left out
        (counting one runs its query).
        """
        built = [
            node.relation_name
            for node in (run.results if run else [])
            if node.unique_id.startswith("model.")
            and node.status == "success"
            and node.materialized in TABLE_MATERIALIZATIONS
            and node.relation_name
        ]
        return self._row_counts(built) if built else {}

    @abstractmethod
    def _row_counts(self, relations: list[str]) -> dict[str, int]:
        """`select count(*)` of each relation (as dbt quotes it), keyed by its display name."""

    def run_cost(self) -> RunCost | None:
        """What the all-etl run this code runs under cost; None where queries cost nothing."""
        return None


def warehouse_for(settings: Settings | None = None) -> Warehouse:
    """The configured warehouse (ELT_WAREHOUSE): the one place that asks which."""
    settings = settings or load_settings()
    if settings.warehouse is WarehouseKind.snowflake:
        from elt.warehouse_snowflake import SnowflakeWarehouse

        return SnowflakeWarehouse(settings)
    from elt.warehouse_duckdb import DuckDBWarehouse

    return DuckDBWarehouse(settings)


_IDENTIFIER = re.compile(r'"(?:[^"]|"")*"|[^.]+')


def display_name(relation: str, unquoted_upper: bool = False) -> str:
    """`"db"."schema".table` as the warehouse names it (Snowflake stores unquoted identifiers upper-case)."""
    return ".".join(
        piece[1:-1].replace('""', '"') if piece.startswith('"') else (piece.upper() if unquoted_upper else piece)
        for piece in _IDENTIFIER.findall(relation)
    )
