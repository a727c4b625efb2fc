"""P3: `make demo`'s run (`elt run`: source-faker → DuckDB → git → dbt) against the sum of its parts.

In one benchmark run, side by side (issue #12's definition):

- the parts run alone: the connector's own `read` of the same streams with the same config
  and the configured catalog, output to /dev/null, and plain `dbt build` of the same project;
- `elt run` with the temporary Prefect server `make demo` has (PREFECT_API_URL unset): a first
  run (no Prefect database, no cached catalog; venv and connector installed) and a second one
  (what a scheduled run looks like);
- `elt run` against a Prefect server already running (the appliance's case);
- the second run and the running-server run again with ELT_DBT_START=after-syncs (dbt's
  process started when the syncs end: less memory at the peak, dbt's import after them).

Targets: second run ≤ 2.0× the parts with the temporary server, ≤ 1.5× with a running server;
first run ≤ 60 s; peak memory of a run ≤ 600 MB, judged as the PSS summed over the run's
processes (what they hold between them); the RSS sum, which counts a page shared by several
processes once in each, is printed beside it. Results land in bench/out/p3.md.

    .venv/bin/python bench/p3_embedded_all_etl.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass
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
AFTER_SYNCS = {"ELT_DBT_START": "after-syncs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of parts, second run and running-server run; medians are judged"
    )
    options = parser.parse_args()
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
    # Each round: the parts (the first run has installed the connector, cached the catalog and
    # loaded the tables), a second run with the temporary server, a run against a running server.
    rounds: list[Round] = []
    for number in range(1, options.repeat + 1):
        read = _connector_read(settings)
        dbt = measure(
            [str(BIN / "dbt"), "build", "--profiles-dir", "."],
            cwd=REPO_ROOT / "dbt",
            env=env | {"ELT_DUCKDB_PATH": str(settings.path(settings.duckdb_path))},
            log=OUT / "p3_dbt.log",
        )
        if dbt.return_code != 0:
            raise SystemExit(f"dbt build failed; see {OUT / 'p3_dbt.log'}")
        print(f"round {number}: parts: read {read.seconds:.1f} s + dbt build {dbt.seconds:.1f} s", flush=True)
        second = _elt_run("second", env)
        second_after = _elt_run("second-after-syncs", env | AFTER_SYNCS)
        with prefect_server(startup_seconds=900) as api_url:
            running = _elt_run("running", env | {"PREFECT_API_URL": api_url})
            running_after = _elt_run("running-after-syncs", env | AFTER_SYNCS | {"PREFECT_API_URL": api_url})
        rounds.append(Round(read, dbt, second, running, second_after, running_after))

    parts = statistics.median(r.parts for r in rounds)

    def verdict(met: bool) -> str:
        return "met" if met else "**MISSED**"

    def rounds_met(ratios: list[float], target: float) -> str:
        return "" if len(ratios) == 1 else f" ({sum(ratio <= target for ratio in ratios)} of {len(ratios)} rounds)"

    def judged(name: str, runs: list[tuple[Measurement, dict[str, float]]], target: float) -> tuple:
        wall = statistics.median(run[0].seconds for run in runs)
        ratios = [run[0].seconds / r.parts for run, r in zip(runs, rounds, strict=True)]
        return (
            name,
            _median_run(runs),
            wall,
            f"≤ {target}× parts",
            verdict(wall <= target * parts) + rounds_met(ratios, target),
        )

    runs = [
        (
            "first run, temporary server",
            first,
            first[0].seconds,
            f"≤ {FIRST_RUN_SECONDS} s",
            verdict(first[0].seconds <= FIRST_RUN_SECONDS),
        ),
        judged("second run, temporary server", [r.second for r in rounds], PARTS_TARGET),
        judged("second run, running server", [r.running for r in rounds], RUNNING_SERVER_TARGET),
        judged("second run, temporary server, after-syncs", [r.second_after for r in rounds], PARTS_TARGET),
        judged("second run, running server, after-syncs", [r.running_after for r in rounds], RUNNING_SERVER_TARGET),
    ]
    rows = []
    for name, (result, stages), wall, target, met in runs:
        rest = result.seconds - sum(stages.values())
        rows.append(
            [
                name,
                f"{wall:.1f} s",
                f"{wall / parts:.2f}×",
                target,
                met,
                f"{result.peak_pss_mb:.0f} MB ({verdict(result.peak_pss_mb <= PEAK_MB)})",
                f"{result.peak_mb:.0f} MB",
                f"{rest:.1f} s",
                *(f"{stages.get(stage, 0):.1f} s" for stage in STAGES),
            ]
        )
    read_seconds = statistics.median(r.read.seconds for r in rounds)
    dbt_seconds = statistics.median(r.dbt.seconds for r in rounds)
    medians = "" if len(rounds) == 1 else f"medians of {len(rounds)} rounds, "
    per_round = ""
    if len(rounds) > 1:
        per_round = (
            "\n\nPer round (parts; then the second run, the running-server run and each after-syncs: wall and ÷ that "
            "round's parts): "
            + "; ".join(
                f"{r.parts:.1f} s; "
                + ", ".join(
                    f"{run[0].seconds:.1f} s {run[0].seconds / r.parts:.2f}×"
                    for run in (r.second, r.running, r.second_after, r.running_after)
                )
                for r in rounds
            )
            + "."
        )
    report = (
        f"P3 embedded all-etl — {machine()}, load average {_load()}\n\n"
        f"Parts run alone ({medians}ratios against their sum): connector `read` to /dev/null {read_seconds:.1f} s "
        f"({rounds[0].read.peak_mb:.0f} MB), plain `dbt build` {dbt_seconds:.1f} s ({rounds[0].dbt.peak_mb:.0f} MB): "
        f"{parts:.1f} s. Stage columns: the run whose wall is the median. after-syncs: ELT_DBT_START=after-syncs."
        + per_round
        + "\n\n"
        + table(
            [
                "run",
                "wall",
                "÷ parts",
                "target",
                "",
                f"peak memory, PSS (≤ {PEAK_MB} MB)",
                "peak memory, RSS summed",
                "start-up, shutdown, the rest",
                *STAGES,
            ],
            rows,
        )
        + "\n"
    )
    (OUT / "p3.md").write_text(report)
    print("\n" + report)


@dataclass
class Round:
    read: Measurement
    dbt: Measurement
    second: tuple[Measurement, dict[str, float]]
    running: tuple[Measurement, dict[str, float]]
    second_after: tuple[Measurement, dict[str, float]]
    running_after: tuple[Measurement, dict[str, float]]

    @property
    def parts(self) -> float:
        return self.read.seconds + self.dbt.seconds


def _median_run(runs: list[tuple[Measurement, dict[str, float]]]) -> tuple[Measurement, dict[str, float]]:
    return sorted(runs, key=lambda run: run[0].seconds)[(len(runs) - 1) // 2]


def _elt_run(name: str, env: dict[str, str]) -> tuple[Measurement, dict[str, float]]:
    log = OUT / f"p3_run_{name}.log"
    result = measure([str(BIN / "elt"), "run"], cwd=REPO_ROOT, env=env, log=log)
    text = log.read_text()
    if result.return_code != 0:
        raise SystemExit(f"elt run ({name}) failed; see {log}")
    line = text.split("  time     ", 1)[1].splitlines()[0]
    stages = {stage: float(seconds) for stage, seconds in re.findall(r"([a-z-]+) ([0-9.]+)s", line)}
    print(f"{name}: {result.seconds:.1f} s, PSS {result.peak_pss_mb:.0f} MB, RSS {result.peak_mb:.0f} MB, {stages}", flush=True)
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
