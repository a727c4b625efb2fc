"""P3: `make demo`'s run (`elt run`: source-faker → DuckDB → git → dbt) against the sum of its parts.

In one benchmark run, side by side (issue #12's definition):

- the parts run alone: the connector's own `read` of the same streams with the same config
  and the configured catalog, output to /dev/null, and plain `dbt build` of the same project;
- `elt run` with the temporary Prefect server `make demo` has (PREFECT_API_URL unset): a first
  run (no Prefect database, no cached catalog; venv and connector installed) and a second one
  (what a scheduled run looks like);
- `elt run` against a Prefect server already running (the appliance's case).

Targets: second run ≤ 2.0× the parts with the temporary server, ≤ 1.5× with a running server;
first run ≤ 60 s; peak memory of a run ≤ 600 MB. Results land in bench/out/p3.md.

    .venv/bin/python bench/p3_embedded_all_etl.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from _harness import BIN, OUT, REPO_ROOT, Measurement, machine, measure, prefect_server, table

from elt.extract.connections import load_connections, resolve_config
from elt.extract.embedded import ensure_connector, find_connector
from elt.settings import load_settings

PARTS_TARGET = 2.0
RUNNING_SERVER_TARGET = 1.5
FIRST_RUN_SECONDS = 60
PEAK_MB = 600
STAGES = ("extract-load", "update-code", "transform")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    settings = load_settings(home=REPO_ROOT)
    data = settings.path(settings.data_dir)
    home = OUT / "p3-prefect-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900",  # a loaded machine
    }
    env.pop("PREFECT_API_URL", None)

    # A first run: venv and connector ready, nothing Prefect or the catalog cache kept from an earlier one.
    connections_file = settings.path(settings.airbyte_connections_file)
    for spec in load_connections(connections_file):
        ensure_connector(spec, settings.path(settings.connectors_dir), connections_file)
    shutil.rmtree(home, ignore_errors=True)
    for kept in ("airbyte-catalogs", "prefect"):
        shutil.rmtree(data / kept, ignore_errors=True)
    first = _elt_run("first", env)
    # The parts, once the first run has installed the connector, cached the catalog and loaded the tables.
    read = _connector_read(settings)
    dbt = measure(
        [str(BIN / "dbt"), "build", "--profiles-dir", "."],
        cwd=REPO_ROOT / "dbt",
        env=env | {"ELT_DUCKDB_PATH": str(settings.path(settings.duckdb_path))},
        log=OUT / "p3_dbt.log",
    )
    if dbt.return_code != 0:
        raise SystemExit(f"dbt build failed; see {OUT / 'p3_dbt.log'}")
    parts = read.seconds + dbt.seconds
    print(f"parts: read {read.seconds:.1f} s + dbt build {dbt.seconds:.1f} s = {parts:.1f} s", flush=True)
    second = _elt_run("second", env)
    with prefect_server(startup_seconds=900) as api_url:
        running = _elt_run("running", env | {"PREFECT_API_URL": api_url})

    def verdict(met: bool) -> str:
        return "met" if met else "**MISSED**"

    runs = [
        ("first run, temporary server", first, f"≤ {FIRST_RUN_SECONDS} s", verdict(first[0].seconds <= FIRST_RUN_SECONDS)),
        (
            "second run, temporary server",
            second,
            f"≤ {PARTS_TARGET}× parts",
            verdict(second[0].seconds <= PARTS_TARGET * parts),
        ),
        (
            "second run, running server",
            running,
            f"≤ {RUNNING_SERVER_TARGET}× parts",
            verdict(running[0].seconds <= RUNNING_SERVER_TARGET * parts),
        ),
    ]
    rows = []
    for name, (result, stages), target, met in runs:
        rest = result.seconds - sum(stages.values())
        rows.append(
            [
                name,
                f"{result.seconds:.1f} s",
                f"{result.seconds / parts:.2f}×",
                target,
                met,
                f"{result.peak_mb:.0f} MB ({verdict(result.peak_mb <= PEAK_MB)})",
                f"{rest:.1f} s",
                *(f"{stages.get(stage, 0):.1f} s" for stage in STAGES),
            ]
        )
    report = (
        f"P3 embedded all-etl — {machine()}, load average {_load()}\n\n"
        f"Parts run alone: connector `read` to /dev/null {read.seconds:.1f} s ({read.peak_mb:.0f} MB), "
        f"plain `dbt build` {dbt.seconds:.1f} s ({dbt.peak_mb:.0f} MB): {parts:.1f} s.\n\n"
        + table(
            [
                "run",
                "wall",
                "÷ parts",
                "target",
                "",
                f"peak memory (≤ {PEAK_MB} MB)",
                "start-up, shutdown, the rest",
                *STAGES,
            ],
            rows,
        )
        + "\n"
    )
    (OUT / "p3.md").write_text(report)
    print("\n" + report)


def _elt_run(name: str, env: dict[str, str]) -> tuple[Measurement, dict[str, float]]:
    log = OUT / f"p3_run_{name}.log"
    result = measure([str(BIN / "elt"), "run"], cwd=REPO_ROOT, env=env, log=log)
    text = log.read_text()
    if result.return_code != 0:
        raise SystemExit(f"elt run ({name}) failed; see {log}")
    line = text.split("  time     ", 1)[1].splitlines()[0]
    stages = {stage: float(seconds) for stage, seconds in re.findall(r"([a-z-]+) ([0-9.]+)s", line)}
    print(f"{name}: {result.seconds:.1f} s, {result.peak_mb:.0f} MB, {stages}", flush=True)
    return result, stages


def _connector_read(settings) -> Measurement:
    """source-faker's own `read` of the configured streams, as `elt run` configures it, to /dev/null."""
    connections_file = settings.path(settings.airbyte_connections_file)
    (spec,) = [spec for spec in load_connections(connections_file) if spec.enabled]
    executable = find_connector(spec, settings.path(settings.connectors_dir), connections_file)
    assert executable is not None, "the elt runs above install the connector"
    catalog_file = settings.path(settings.data_dir) / "airbyte-catalogs" / f"{spec.name}.catalog.json"
    discovered = json.loads(catalog_file.read_text())["catalog"]
    configured = {
        "streams": [
            {"stream": stream, "sync_mode": "full_refresh", "destination_sync_mode": "overwrite"}
            for stream in discovered["streams"]
            if spec.streams == "*" or stream["name"] in spec.streams
        ]
    }
    with tempfile.TemporaryDirectory(prefix="p3-read-") as folder:
        config, catalog = Path(folder) / "config.json", Path(folder) / "catalog.json"
        config.write_text(json.dumps(resolve_config(spec, settings.environment())))
        catalog.write_text(json.dumps(configured))
        result = measure([str(executable), "read", "--config", str(config), "--catalog", str(catalog)], cwd=Path(folder))
    if result.return_code != 0:
        raise SystemExit(f"{executable} read failed (exit {result.return_code})")
    return result


def _load() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
