"""The warehouse volume fills up mid-build: the run fails saying so, and the warehouse stays readable.

The DuckDB file lives on a real 24 MB tmpfs (mounting needs root, as CI and the appliance's worker
host have); a model that writes ~600 MB fills it. Everything else (checkout, Prefect) is elsewhere,
as on the appliance, where only the warehouse volume holds the DuckDB file.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from tests.conftest import BIN, GitRemote, PrefectServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)"),
]

FILLS_THE_VOLUME = "select range as id, repeat('x', 200) || range::varchar as pad from range(3000000)\n"


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "warehouse-volume"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _run(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "elt"), "run", "--skip-extract"], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_full_warehouse_volume_fails_the_run_and_keeps_the_built_marts(
    prefect_server: PrefectServer, tiny_remote: GitRemote, appliance_env: Path, small_volume: Path
) -> None:
    warehouse = small_volume / "warehouse.duckdb"
    env = prefect_server.env() | {
        "ELT_HOME": str(appliance_env),
        "ELT_DUCKDB_PATH": str(warehouse),
        "ELT_GIT_REPO": str(tiny_remote.bare),
    }
    first = _run(env, appliance_env)
    assert first.returncode == 0, first.stderr[-3000:]

    tiny_remote.commit("dbt/models/big.sql", FILLS_THE_VOLUME, "a model larger than the volume")
    full = _run(env, appliance_env)

    assert full.returncode == 1
    last_line = full.stderr.strip().splitlines()[-1]
    assert last_line.startswith("all-etl Failed: dbt build failed on 1 node(s): model.tiny_shop.big")
    assert f'Could not write file "{warehouse}": No space left on device' in last_line
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        assert connection.execute("select customer, order_count from main_marts.customer_totals order by 1").fetchall() == [
            ("ada", 2),
            ("grace", 1),
        ]
        tables = {row[0] for row in connection.execute("select table_name from information_schema.tables").fetchall()}
    assert "big" not in tables, "the half-written model must not be left in the warehouse"
