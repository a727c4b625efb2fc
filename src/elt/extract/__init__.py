"""Extract-load: sync Airbyte connections through one interface with two backends."""

from elt.extract.base import ExtractBackend, ExtractReport, SyncFailure, SyncResult

__all__ = ["ExtractBackend", "ExtractReport", "SyncFailure", "SyncResult"]
