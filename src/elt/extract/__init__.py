"""Extract-load: sync Airbyte connections through one interface with two backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from elt.errors import ConfigurationError
from elt.extract.base import ExtractBackend, ExtractReport, SyncFailure, SyncResult
from elt.settings import AirbyteBackend

if TYPE_CHECKING:
    from elt.settings import Settings

__all__ = ["ExtractBackend", "ExtractReport", "SyncFailure", "SyncResult", "backend_for", "refuse_tag"]


def backend_for(settings: Settings, tag: str | None = None) -> ExtractBackend:
    """The configured backend (ELT_AIRBYTE_BACKEND): the one place that asks which.
    `tag` (--tag): only the server's connections carrying it; the embedded backend refuses it."""
    refuse_tag(settings, tag)
    if settings.airbyte_backend is AirbyteBackend.embedded:
        from elt.extract.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    from elt.extract.server import ServerBackend

    return ServerBackend(settings, tag=tag)


def refuse_tag(settings: Settings, tag: str | None) -> None:
    """Airbyte tags live in the Airbyte server; the embedded connections file has none, so a tag
    there would silently sync every connection."""
    if tag and settings.airbyte_backend is AirbyteBackend.embedded:
        raise ConfigurationError(
            f"--tag {tag}: tags select connections of an Airbyte server (ELT_AIRBYTE_BACKEND=server), "
            "but ELT_AIRBYTE_BACKEND=embedded; name the connections with --connection instead"
        )
