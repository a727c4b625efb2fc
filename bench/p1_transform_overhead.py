"""P1: the transform stage of all-etl against plain `dbt build`, and prefect-dbt's PrefectDbtRunner and PrefectDbtOrchestrator.

Same generated project, same profile, a fresh DuckDB file for every run. The target column is
the stage as all-etl runs it: timed inside a flow whose process has already started Prefect
(that start-up is paid once per run, whatever the stages; P3 reports it), with the peak memory
of the whole process tree. A second column runs the stage alone in a fresh process, Prefect's
start-up included. Then prefect-dbt 0.7.25 as shipped, each in a fresh process inside a flow:
PrefectDbtRunner, and PrefectDbtOrchestrator per wave and per node (one worker: DuckDB takes one
writer). Prints wall time and peak memory (process tree) side by side with ratios to plain dbt.
A run still going after --cap-minutes is stopped and its column left out (and not run at larger
sizes); a run that did not build every model reports no time. Target: ≤ 1.10× wall at every
size, ≤ 1.5× peak memory at 500 models.

    .venv/bin/python bench/p1_transform_overhead.py [--sizes 100 500 1000] [--repeat 1] [--no-runner] [--no-orchestrator] [--no-per-node]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from _harness import BIN, OUT, REPO_ROOT, Measurement, machine, measure, prefect_server, table
from generate_project import generate

PREFECT_DBT = OUT / "prefect-dbt"
ORCHESTRATOR_FLOW = Path(__file__).with_name("p1_orchestrator_flow.py")
RUNNER = "PrefectDbtRunner"
PER_WAVE = "PrefectDbtOrchestrator per-wave"
PER_NODE = "PrefectDbtOrchestrator per-node (concurrency 1)"
RUNNER_SCRIPT = """
import sys
from prefect import flow
from prefect_dbt import PrefectDbtRunner, PrefectDbtSettings

@flow
def build():
    PrefectDbtRunner(settings=PrefectDbtSettings(project_dir=sys.argv[1], profiles_dir=sys.argv[2])).invoke(["build"])

build()
"""
COLD_SCRIPT = "import sys; from elt.flows import transform; transform(sys.argv[1])"
# The stage as all-etl runs it: inside a flow whose process has already started Prefect.
STAGE_SCRIPT = """
import sys, time
from prefect import flow
from elt.flows import transform

@flow(name="bench-all-etl")
def parent(project):
    started = time.monotonic()
    transform(project)
    return time.monotonic() - started

print(f"STAGE_SECONDS {parent(sys.argv[1]):.2f}")
"""


def install_prefect_dbt() -> None:
    """prefect-dbt as shipped, overlaid on the project's venv (its own deps are all there but two)."""
    if (PREFECT_DBT / "prefect_dbt").exists():
        return
    subprocess.run(
        [
            str(BIN / "uv"),
            "pip",
            "install",
            "--quiet",
            "--python",
            sys.executable,
            "--target",
            str(PREFECT_DBT),
            "--no-deps",
            "prefect-dbt==0.7.25",
            "sgqlc>=16",
            "graphql-core",
            "prefect-shell>=0.3.2",
        ],
        check=True,
    )


def built_models(database: Path) -> int:
    """How many of the generated project's models (stg_, int_, mart_ relations) the DuckDB file holds."""
    if not database.exists():
        return 0
    with duckdb.connect(str(database), read_only=True) as connection:
        row = connection.execute(
            "select count(distinct table_name) from information_schema.tables"
            " where regexp_matches(table_name, '^(stg|int|mart)_[0-9]+$')"
        ).fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-runner", action="store_true", help="skip PrefectDbtRunner (it takes ~5x as long)")
    parser.add_argument("--no-orchestrator", action="store_true", help="skip PrefectDbtOrchestrator per-wave and per-node")
    parser.add_argument(
        "--no-per-node", action="store_true", help="skip PrefectDbtOrchestrator per-node (over 15 min from 500 models)"
    )
    parser.add_argument("--cap-minutes", type=float, default=15, help="stop a run after this long and leave its column out")
    options = parser.parse_args()
    if not (options.no_runner and options.no_orchestrator):
        install_prefect_dbt()
    cap = f"> {options.cap_minutes:g} min"

    rows = []
    over_cap: dict[str, int] = {}  # column → the size at which a run exceeded the cap
    loads: list[float] = []
    with prefect_server() as api_url:
        for size in options.sizes:
            project = generate(size, OUT / f"p1_{size}")
            database = OUT / f"p1_{size}.duckdb"
            profiles = project / "profiles"
            profiles.mkdir()
            (profiles / "profiles.yml").write_text(
                f"generated:\n  target: duckdb\n  outputs:\n    duckdb: {{type: duckdb, path: '{database}', schema: main, threads: 4}}\n"
            )
            env = {
                **os.environ,
                "PREFECT_API_URL": api_url,
                "ELT_DUCKDB_PATH": str(database),
                "ELT_HOME": str(REPO_ROOT),
                "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            }
            commands = {
                "dbt build": [str(BIN / "dbt"), "build", "--project-dir", str(project), "--profiles-dir", str(profiles)],
                "transform stage in all-etl": [sys.executable, "-c", STAGE_SCRIPT, str(project)],
                "transform stage, cold process": [sys.executable, "-c", COLD_SCRIPT, str(project)],
            }
            if not options.no_runner:
                commands[RUNNER] = [sys.executable, "-c", RUNNER_SCRIPT, str(project), str(profiles)]
            if not options.no_orchestrator:
                for name, mode in ((PER_WAVE, "per_wave"), (PER_NODE, "per_node")):
                    if not (name == PER_NODE and options.no_per_node):
                        commands[name] = [sys.executable, str(ORCHESTRATOR_FLOW), str(project), str(profiles), mode]
            results: dict[str, list[Measurement]] = {name: [] for name in commands}
            left_out: dict[str, str] = {}  # column → why it has no time at this size
            for attempt in range(options.repeat):
                for name, command in commands.items():
                    if name in over_cap:
                        left_out[name] = f"{cap} at {over_cap[name]:,} models: not run"
                        continue
                    database.unlink(missing_ok=True)
                    run_env = env | ({"PYTHONPATH": str(PREFECT_DBT)} if name.startswith("Prefect") else {})
                    log = (
                        OUT
                        / f"p1_{size}_{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}_{attempt}.log"
                    )
                    load = os.getloadavg()[0]
                    loads.append(load)
                    started = time.strftime("%H:%M:%S", time.gmtime())
                    result = measure(command, cwd=project, env=run_env, log=log, timeout=options.cap_minutes * 60)
                    built = built_models(database)
                    if result.timed_out:
                        over_cap[name] = size
                        left_out[name] = f"{cap}, left out"
                    elif result.return_code != 0:
                        left_out[name] = f"failed (exit {result.return_code}; see {log.name})"
                    elif built != size:
                        left_out[name] = f"built {built} of {size} models, left out"
                    else:
                        if name == "transform stage in all-etl":
                            # The stage's own time, from the running flow (Prefect's start-up is the whole run's).
                            stage = float(log.read_text().rsplit("STAGE_SECONDS ", 1)[1].split()[0])
                            result = Measurement(stage, result.peak_mb, 0)
                        results[name].append(result)
                    outcome = left_out.get(name) if not results[name] else f"{result.seconds:.1f} s, {result.peak_mb:.0f} MB"
                    print(
                        f"{size} models, {name}: {outcome} ({built} models built; started {started} UTC, load {load:.2f})",
                        flush=True,
                    )
                    if name == "dbt build" and not results[name]:
                        sys.exit(f"plain dbt build on {size} models did not succeed ({left_out[name]}); see {log}")
            best = {name: min(runs, key=lambda run: run.seconds) for name, runs in results.items() if runs}
            plain = best["dbt build"]
            row = [f"{size:,}", f"{plain.seconds:.1f} s / {plain.peak_mb:.0f} MB"]
            for name in list(commands)[1:]:
                run = best.get(name)
                if run is None:
                    row.append(left_out[name])
                    continue
                row.append(
                    f"{run.seconds:.1f} s / {run.peak_mb:.0f} MB ({run.seconds / plain.seconds:.2f}× wall, {run.peak_mb / plain.peak_mb:.2f}× memory)"
                )
            rows.append(row)

    header = ["models", "dbt build", *list(commands)[1:]]
    load_range = f"load average (1 min) {min(loads):.2f}–{max(loads):.2f} at the runs' starts"
    report = f"P1 transform overhead — {machine()}, {load_range}\n\n{table(header, rows)}\n"
    (OUT / "p1.md").write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
