"""P1: the transform stage of all-etl against plain `dbt build`, and prefect-dbt's PrefectDbtRunner.

Same generated project, same profile, a fresh DuckDB file for every run. The target column is
the stage as all-etl runs it: timed inside a flow whose process has already started Prefect
(that start-up is paid once per run, whatever the stages; P3 reports it), with the peak memory
of the whole process tree. A second column runs the stage alone in a fresh process, Prefect's
start-up included. Prints wall time and peak memory (process tree) side by
side with ratios to plain dbt. Target at 500 models: ≤ 1.10× wall, ≤ 1.5× peak memory.

    .venv/bin/python bench/p1_transform_overhead.py [--sizes 100 500 1000] [--repeat 1] [--no-runner]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _harness import BIN, OUT, REPO_ROOT, Measurement, machine, measure, prefect_server, table
from generate_project import generate

PREFECT_DBT = OUT / "prefect-dbt"
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-runner", action="store_true", help="skip PrefectDbtRunner (it takes ~5x as long)")
    options = parser.parse_args()
    if not options.no_runner:
        install_prefect_dbt()

    rows = []
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
                commands["PrefectDbtRunner"] = [sys.executable, "-c", RUNNER_SCRIPT, str(project), str(profiles)]
            results: dict[str, list] = {name: [] for name in commands}
            for attempt in range(options.repeat):
                for name, command in commands.items():
                    database.unlink(missing_ok=True)
                    run_env = env | ({"PYTHONPATH": str(PREFECT_DBT)} if name == "PrefectDbtRunner" else {})
                    log = OUT / f"p1_{size}_{name.replace(' ', '_').replace(',', '')}_{attempt}.log"
                    result = measure(command, cwd=project, env=run_env, log=log)
                    if result.return_code != 0:
                        sys.exit(f"{name} on {size} models failed; see {log}")
                    if name == "transform stage in all-etl":
                        # The stage's own time, from the running flow (Prefect's start-up is the whole run's).
                        stage = float(log.read_text().rsplit("STAGE_SECONDS ", 1)[1].split()[0])
                        result = Measurement(stage, result.peak_mb, 0)
                    results[name].append(result)
                    print(f"{size} models, {name}: {result.seconds:.1f} s, {result.peak_mb:.0f} MB", flush=True)
            best = {name: min(runs, key=lambda run: run.seconds) for name, runs in results.items()}
            plain = best["dbt build"]
            row = [size, f"{plain.seconds:.1f} s / {plain.peak_mb:.0f} MB"]
            for name in list(commands)[1:]:
                run = best[name]
                row.append(
                    f"{run.seconds:.1f} s / {run.peak_mb:.0f} MB ({run.seconds / plain.seconds:.2f}× wall, {run.peak_mb / plain.peak_mb:.2f}× memory)"
                )
            rows.append(row)

    header = ["models", "dbt build", *list(commands)[1:]]
    report = f"P1 transform overhead — {machine()}\n\n{table(header, rows)}\n"
    (OUT / "p1.md").write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    main()
