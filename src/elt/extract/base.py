"""What every extract-load backend returns, whichever system ran the sync."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from elt.errors import ConfigurationError, TerminalError


@dataclass(frozen=True)
class SyncResult:
    """One connection's finished sync. An Airbyte server reports rows per job, PyAirbyte per stream."""

    connection: str
    rows: int
    seconds: float
    rows_per_stream: dict[str, int] | None = None
    bytes_synced: int | None = None
    job_id: str | None = None
    job_url: str | None = None


@dataclass(frozen=True)
class SyncFailure:
    connection: str
    error: str


@dataclass
class ExtractReport:
    synced: list[SyncResult] = field(default_factory=list)
    failed: list[SyncFailure] = field(default_factory=list)

    @property
    def rows_per_stream(self) -> dict[str, int]:
        """Rows keyed `connection.stream`, or `connection` alone where only a total is known."""
        rows: dict[str, int] = {}
        for result in self.synced:
            if result.rows_per_stream is None:
                rows[result.connection] = result.rows
            else:
                rows.update({f"{result.connection}.{stream}": count for stream, count in result.rows_per_stream.items()})
        return rows


class ExtractFailed(TerminalError):
    def __init__(self, report: ExtractReport) -> None:
        self.report = report
        parts = "; ".join(f"{failure.connection}: {failure.error}" for failure in report.failed)
        total = len(report.failed) + len(report.synced)
        super().__init__(f"{len(report.failed)} of {total} connections failed to sync: {parts}")


class UnknownConnections(ConfigurationError):
    def __init__(self, unknown: list[str], known: list[str]) -> None:
        super().__init__(f"no connection named {', '.join(unknown)}; known connections: {', '.join(known) or 'none'}")


class ExtractBackend(Protocol):
    def connection_names(self) -> list[str]:
        """Every connection this backend can sync."""

    def sync(self, connection: str, *, full_refresh: bool) -> SyncResult:
        """Run one connection's sync to completion; raise on failure."""

    def cancel_started_jobs(self) -> None:
        """Stop every sync this backend started that has not finished (the flow run is being cancelled)."""
