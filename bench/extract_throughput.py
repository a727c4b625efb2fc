"""Extract throughput (issue #12): the embedded extract-load stage against PyAirbyte alone, at
200,000 rows, and both against the connector's own emit rate.

In one benchmark run, side by side, each a fresh process, `--repeat` rounds (1 by default) in
turn, on source-faker's `users` stream with `count: 200000` (200,000 rows), full refresh:

- the connector's own `read` of that stream to /dev/null: the floor for this connector;
- PyAirbyte alone, as its documentation uses it: `import airbyte`, `get_source` on the same
  connector executable and config, `read` into a `DuckDBCache`;
- the stage: `EmbeddedBackend.sync`, what all-etl's extract-load runs per connection (its
  PyAirbyte import with only the DuckDB cache, the read into the sync's own cache, then the
  published table in the warehouse).

Target: the stage ≤ 1.1× PyAirbyte alone. Results land in bench/out/extract_throughput.md.

    .venv/bin/python bench/extract_throughput.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import OUT, REPO_ROOT, Measurement, machine, measure, table

from elt.extract.connections import load_connections, resolve_config
from elt.extract.embedded import ensure_connector
from elt.settings import load_settings

TARGET = 1.1
CONNECTIONS = """
connections:
  - name: faker
    source:
      connector: source-faker
      pip: airbyte-source-faker==7.2.1
      config: {{count: {rows}, seed: 42, parallelism: 1}}
    streams: [users]
    destination: {{schema: raw_faker}}
"""
PYAIRBYTE_ALONE = """
import json, os, sys, warnings
os.environ.setdefault("AIRBYTE_OFFLINE_MODE", "1")  # no registry here; the connector is given
os.environ.setdefault("NO_LIVE_PROGRESS", "1")
warnings.simplefilter("ignore")
import airbyte as ab
executable, config, db = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
source = ab.get_source("source-faker", config=config, local_executable=executable, install_if_missing=False)
source.select_streams(["users"])
result = source.read(cache=ab.DuckDBCache(db_path=db), force_full_refresh=True, write_strategy="replace")
print(result._progress_tracker.stream_read_counts["users"])
"""
STAGE = """
import sys
from pathlib import Path
from elt.extract.embedded import EmbeddedBackend
from elt.settings import load_settings
settings = load_settings(home=Path(sys.argv[1]), connectors_dir=Path(sys.argv[2]))
print(EmbeddedBackend(settings).sync("faker", full_refresh=True).rows)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=1)
    arguments = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    repo_settings = load_settings(home=REPO_ROOT)
    connectors = repo_settings.path(repo_settings.connectors_dir)

    with tempfile.TemporaryDirectory(prefix="extract-throughput-") as folder:
        home = Path(folder)
        (home / "airbyte").mkdir()
        connections_file = home / "airbyte" / "connections.yaml"
        connections_file.write_text(CONNECTIONS.format(rows=arguments.rows))
        settings = load_settings(home=home, connectors_dir=connectors)
        (spec,) = load_connections(connections_file)
        executable = ensure_connector(spec, connectors, connections_file)
        config = resolve_config(spec, settings.environment())
        config_file, catalog_file = home / "config.json", home / "catalog.json"
        config_file.write_text(json.dumps(config))
        catalog_file.write_text(json.dumps({"streams": [_configured_users(executable, config_file, home)]}))

        runs: dict[str, list[Measurement]] = {"connector `read` to /dev/null": [], "PyAirbyte alone": [], "the stage": []}
        for round_ in range(arguments.repeat):
            floor, alone, stage = runs.values()
            floor.append(
                _checked(
                    "read",
                    [str(executable), "read", "--config", str(config_file), "--catalog", str(catalog_file)],
                    home,
                    round_,
                )
            )
            database = home / "alone.duckdb"
            database.unlink(missing_ok=True)
            alone.append(
                _checked(
                    "pyairbyte",
                    [sys.executable, "-c", PYAIRBYTE_ALONE, str(executable), json.dumps(config), str(database)],
                    home,
                    round_,
                    expect_rows=arguments.rows,
                )
            )
            shutil.rmtree(home / "data", ignore_errors=True)
            stage.append(
                _checked(
                    "stage",
                    [sys.executable, "-c", STAGE, str(home), str(connectors)],
                    home,
                    round_,
                    expect_rows=arguments.rows,
                )
            )

    medians = {name: statistics.median(m.seconds for m in measured) for name, measured in runs.items()}
    floor_seconds, alone_seconds, stage_seconds = medians.values()
    ratio = stage_seconds / alone_seconds
    rows = [
        [
            name,
            f"{seconds:.1f} s",
            f"{arguments.rows / seconds:,.0f}",
            f"{seconds / floor_seconds:.2f}×",
            f"{statistics.median(m.peak_mb for m in runs[name]):.0f} MB",
        ]
        for name, seconds in medians.items()
    ]
    report = "\n".join(
        [
            f"# Extract throughput, {arguments.rows:,} rows, {arguments.repeat} round(s) ({machine()}, "
            f"load average {', '.join(f'{value:.1f}' for value in os.getloadavg())})",
            "",
            table(["", "wall (median)", "rows/s", "÷ connector's read", "peak memory"], rows),
            "",
            f"the stage ÷ PyAirbyte alone: {ratio:.2f}× (target ≤ {TARGET}×: {'met' if ratio <= TARGET else '**MISSED**'})",
        ]
    )
    (OUT / "extract_throughput.md").write_text(report + "\n")
    print(report)


def _configured_users(executable: Path, config_file: Path, folder: Path) -> dict:
    log = OUT / "extract_throughput_discover.log"
    measured = measure([str(executable), "discover", "--config", str(config_file)], cwd=folder, log=log)
    if measured.return_code != 0:
        raise SystemExit(f"{executable} discover failed; see {log}")
    for line in log.read_text().splitlines():
        message = json.loads(line) if line.startswith("{") else {}
        for stream in message.get("catalog", {}).get("streams", []):
            if stream["name"] == "users":
                return {"stream": stream, "sync_mode": "full_refresh", "destination_sync_mode": "overwrite"}
    raise SystemExit(f"{executable} discover offered no users stream; see {log}")


def _checked(name: str, command: list[str], cwd: Path, round_: int, expect_rows: int | None = None) -> Measurement:
    log = OUT / f"extract_throughput_{name}.{round_}.log"
    result = measure(command, cwd=cwd, log=log if expect_rows else None)
    if result.return_code != 0:
        raise SystemExit(f"{name} failed (exit {result.return_code}); see {log}")
    if expect_rows is not None:
        counted = int(log.read_text().split()[-1])
        if counted != expect_rows:
            raise SystemExit(f"{name} read {counted} rows, not {expect_rows}; see {log}")
    print(f"{name}: {result.seconds:.1f} s, {result.peak_mb:.0f} MB", flush=True)
    return result


if __name__ == "__main__":
    main()
