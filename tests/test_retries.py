"""Retries follow the exception tree: a sync is retried only when its error is a TransientError."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from elt.extract.embedded import EmbeddedSyncFailed, EmbeddedSyncUnreachable
from elt.flows import retry_if_transient, sync_connection
from elt.warehouse import WarehouseUnreachable
from elt.warehouse_snowflake import SnowflakeLoginRejected


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (EmbeddedSyncUnreachable("connection 'faker' (source-faker) failed: connection refused"), True),
        (WarehouseUnreachable("cannot connect to Snowflake"), True),
        (EmbeddedSyncFailed("connection 'faker' (source-faker) failed: count: not a number"), False),
        (SnowflakeLoginRejected("refused the login of loader"), False),
        (ValueError("a bug, not the network"), False),
    ],
)
def test_only_transient_errors_are_retried(error: Exception, retried: bool) -> None:
    """Network trouble is retried; bad credentials, bad config and bugs fail at once."""
    assert retry_if_transient(sync_connection, None, Failed(data=error)) is retried  # type: ignore[arg-type]


def test_a_completed_sync_is_not_retried() -> None:
    assert retry_if_transient(sync_connection, None, Completed(data=1)) is False  # type: ignore[arg-type]
