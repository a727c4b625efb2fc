"""P5: an `--only-changed` transform against the full build, after new rows landed in one source.

The generated project (bench/generate_project.py, `sources=10`): staging models read 10 raw
tables that carry `_airbyte_extracted_at` as their loaded_at_field, with a freshness block, as
Airbyte lands them; each raw table feeds one tenth of the project. One process runs, inside a
parent flow as all-etl does (Prefect's start-up paid once, as in P1):

1. the transform stage as all-etl runs it by default: freshness check, a full `dbt build`, its
   state saved for the next `--only-changed` run;
2. new rows land in one raw table (`raw.table_0`, with a newer `_airbyte_extracted_at`);
3. the transform stage with `only_changed=True` (what `elt run --only-changed` and the all-etl
   parameter run).

Every dbt invocation and every step --only-changed adds is timed inside the process, by wrapping
the project's own functions (nothing else changes). Targets, against the full `dbt build`'s
wall time: the `--only-changed` stage ≤ 0.25×; the plan (the issue's "freshness query, selection,
state handling": the stage's time but its build's and the project's parse, which the first dbt
command of any stage pays, the full stage's included; printed beside it) ≤ 0.10×. The bench fails if what was built is not
exactly what the changed table feeds (its models and their tests), or anything else ran.

    .venv/bin/python bench/p5_only_changed.py [--sizes 100 500] [--with-1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import UTC, datetime, timedelta

from _harness import OUT, machine, measure, prefect_server, table
from generate_project import domain_models, generate, load_raw_tables

SOURCES = 10
CHANGED_TABLE = 0
ONLY_CHANGED_TARGET, PLAN_TARGET = 0.25, 0.10

# Runs in its own process: the two transform stages inside one parent flow, each timed by phase.
STAGE_SCRIPT = """
import json, sys, time
from pathlib import Path
import duckdb
from prefect import flow
from elt import alerts, dbt_runner, dbt_state, reporting
from elt.flows import transform
from elt.warehouse_duckdb import DuckDBWarehouse

project, database, changed_table = sys.argv[1], sys.argv[2], int(sys.argv[3])
phases = []  # (what, seconds) in the order they ended


def timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            phases.append((label(*args, **kwargs), time.monotonic() - started))

    setattr(owner, name, wrapper)


timed(dbt_runner, "run_dbt", lambda dbt, arguments, **_: "dbt " + " ".join(arguments[:2] if arguments[0] == "source" else arguments[:1]))
timed(dbt_runner.Dbt, "run_captured", lambda dbt, *arguments, **_: "dbt " + arguments[0] + " (captured)")
timed(dbt_runner, "check_freshness", lambda *_, **__: "freshness check")
timed(dbt_state, "plan_build", lambda *_, **__: "plan_build")
timed(reporting, "publish_plan", lambda *_, **__: "publish_plan")
timed(dbt_state, "keep_state", lambda *_, **__: "keep_state")
timed(reporting, "publish_dbt_run", lambda *_, **__: "publish_dbt_run")
timed(alerts, "label_run_with_commit", lambda *_, **__: "label_run_with_commit")
timed(DuckDBWarehouse, "prepare_for_dbt", lambda *_, **__: "prepare_for_dbt")
timed(dbt_runner.Dbt, "parse", lambda *_, **__: "parse (if not yet)")
close_dbt = dbt_runner.Dbt.close


def close_and_record_the_parse(dbt):
    # The project's parse, inside the stage's first dbt command: the full stage pays it too.
    if dbt.parse_seconds:
        phases.append(("the project's parse", dbt.parse_seconds))
    close_dbt(dbt)


dbt_runner.Dbt.close = close_and_record_the_parse


def stage(only_changed, before=lambda: None):
    # As all-etl runs it: dbt's process started before the syncs (here `before`, the rows landing),
    # the stage starting once dbt is imported, as it does after syncs that take longer than that.
    import threading

    from elt.settings import load_settings

    phases.clear()
    with dbt_runner.dbt_started_early(load_settings()):
        early = dbt_runner._early_drivers[threading.get_ident()]
        before()
        early.stdout.readline()  # the driver's ready line: dbt imported
        started = time.monotonic()
        run = transform(project, only_changed=only_changed, commit="generated")
        seconds = time.monotonic() - started
        adopted = threading.get_ident() not in dbt_runner._early_drivers
    return {
        "seconds": seconds,
        "early_process_used": adopted,
        "phases": list(phases),
        "results": {node.unique_id: node.status for node in run.results},
        "plan": [[node.action, node.unique_id, node.reason] for node in run.plan.nodes] if run.plan else None,
        "plan_note": run.plan.note if run.plan else None,
    }


def new_rows():
    with duckdb.connect(database) as connection:
        connection.execute(
            f"insert into raw.table_{changed_table} select range, now() from range(2000, 2100)"
        )


def plain_build():
    # `dbt build` of the whole project as a user types it: one dbt process, its start-up and parse included.
    import subprocess

    from elt.settings import load_settings

    with dbt_runner.dbt_for(load_settings(), dbt_runner.DbtProject.at(Path(project))) as dbt:
        started = time.monotonic()
        completed = subprocess.run(dbt.command("build"), cwd=project, env=dbt.env, capture_output=True, text=True)
        seconds = time.monotonic() - started
    if completed.returncode != 0:
        sys.exit("plain dbt build failed:\\n" + completed.stdout[-3000:])
    return seconds


@flow(name="bench-all-etl")
def parent():
    plain = plain_build()
    full = stage(only_changed=False)
    full["plain_build_seconds"] = plain
    return {"full": full, "only_changed": stage(only_changed=True, before=new_rows)}


print("P5_RESULT " + json.dumps(parent()))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--with-1000", action="store_true", help="also run 1,000 models")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size, each from scratch; the medians are printed")
    options = parser.parse_args()
    sizes = [*options.sizes, *([1000] if options.with_1000 and 1000 not in options.sizes else [])]

    rows, phase_rows, failures = [], [], []
    medians = []
    with prefect_server() as api_url:
        for size in sizes:
            ratios = []
            for attempt in range(1, options.repeat + 1):
                result = run_size(size, api_url)
                full, changed = result["full"], result["only_changed"]
                full_build = full["seconds"]
                plain = full["plain_build_seconds"]
                build = _phase(changed, "dbt build")
                parse = _phase(changed, "the project's parse")
                with_parse = changed["seconds"] - build
                plan = with_parse - parse
                if not (full["early_process_used"] and changed["early_process_used"]):
                    failures.append(f"{size} models: the transform did not use the dbt process started before it")
                problems = check_nodes(size, full, changed)
                failures += [f"{size} models: {problem}" for problem in problems]
                ran = sum(action == "run" for action, _, _ in changed["plan"])
                only_ratio, plan_ratio = changed["seconds"] / full_build, plan / full_build
                ratios.append((only_ratio, plan_ratio))
                rows.append(
                    [
                        size if options.repeat == 1 else f"{size} ({attempt} of {options.repeat})",
                        f"{plain:.1f} s",
                        f"{full_build:.1f} s",
                        f"{changed['seconds']:.1f} s",
                        _judged(only_ratio, ONLY_CHANGED_TARGET, "{:.2f}×"),
                        f"{plan:.1f} s (+ parse {parse:.1f} s: {with_parse / full_build:.1%})",
                        _judged(plan_ratio, PLAN_TARGET, "{:.1%}"),
                        f"{ran} / {len(changed['plan']) - ran}" + ("" if not problems else " (WRONG)"),
                    ]
                )
                phase_rows.append([rows[-1][0], f"{full['seconds']:.1f} s", _phases(full), _phases(changed)])
                print(rows[-1], flush=True)
            if options.repeat > 1:
                only_median = statistics.median(only for only, _ in ratios)
                plan_median = statistics.median(plan for _, plan in ratios)
                medians.append(
                    [
                        size,
                        options.repeat,
                        _judged(only_median, ONLY_CHANGED_TARGET, "{:.2f}×"),
                        _judged(plan_median, PLAN_TARGET, "{:.1%}"),
                        f"{sum(only <= ONLY_CHANGED_TARGET and plan <= PLAN_TARGET for only, plan in ratios)} of {len(ratios)}",
                    ]
                )
                print(medians[-1], flush=True)

    report = (
        f"P5 --only-changed — {machine()}; sizes run: {', '.join(str(size) for size in sizes)} models\n\n"
        + table(
            [
                "models",
                "plain dbt build",
                "full stage",
                "--only-changed stage",
                "ratio",
                "plan (stage − its dbt build − the project's parse)",
                "share of the full stage",
                "nodes built / skipped",
            ],
            rows,
        )
        + (
            "\n\nMedians of the runs above (each run a fresh warehouse, state and both stages):\n\n"
            + table(["models", "runs", "ratio, median", "plan share, median", "runs meeting both targets"], medians)
            if medians
            else ""
        )
        + "\n\nThe ratios are of the --only-changed stage to the full stage (a freshness check and a"
        " full build), both run as all-etl runs them: their dbt commands in one dbt process"
        " (src/elt/dbt_driver.py) that all-etl starts before its syncs, so dbt's import overlaps the"
        " syncs; each stage here starts once dbt is imported (syncs that take longer than the import),"
        " and pays the project's parse. *Plain dbt build*: `dbt build` of everything as a user types"
        " it, one process with dbt's import, in the same run before the stages, for scale."
        "\n\nWhere the time goes (seconds per step, in order):\n\n"
        + table(["models", "full stage", "full stage's steps", "--only-changed stage's steps"], phase_rows)
        + "\n"
    )
    (OUT / "p5.md").write_text(report)
    print("\n" + report)
    if failures:
        sys.exit("P5 built the wrong nodes:\n" + "\n".join(failures))


def run_size(size: int, api_url: str) -> dict:
    project = generate(size, OUT / f"p5_{size}", sources=SOURCES)
    home = OUT / f"p5_{size}_home"
    database = home / "warehouse.duckdb"
    if home.exists():
        import shutil

        shutil.rmtree(home)
    home.mkdir(parents=True)
    load_raw_tables(database, SOURCES, datetime.now(UTC) - timedelta(hours=2))
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "ELT_HOME": str(home),  # the saved dbt state goes under <home>/data/dbt-state
        "ELT_DUCKDB_PATH": str(database),
        "ELT_WAREHOUSE": "duckdb",
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    log = OUT / f"p5_{size}.log"
    measured = measure(
        [sys.executable, "-c", STAGE_SCRIPT, str(project), str(database), str(CHANGED_TABLE)], cwd=home, env=env, log=log
    )
    text = log.read_text()
    if measured.return_code != 0 or "P5_RESULT " not in text:
        sys.exit(f"P5 on {size} models failed; see {log}")
    return json.loads(text.rsplit("P5_RESULT ", 1)[1].splitlines()[0])


def check_nodes(size: int, full: dict, changed: dict) -> list[str]:
    """What the --only-changed stage planned and what dbt ran must both be exactly what raw.table_0
    feeds: its domain's models and their tests; the full stage must have built everything."""
    models = domain_models(size, SOURCES, CHANGED_TABLE)
    tested = {model for model in models if not model.startswith("int_")}
    expected = models | {f"{test}_{model}_id" for model in tested for test in ("unique", "not_null")}
    planned = {_name(node) for action, node, _ in changed["plan"] if action == "run"}
    ran = {_name(node) for node in changed["results"]}
    problems = []
    if len(full["results"]) != len(changed["plan"]):
        problems.append(f"the full build ran {len(full['results'])} nodes, the plan lists {len(changed['plan'])}")
    for what, names in (("planned to run", planned), ("dbt ran", ran)):
        if names != expected:
            problems.append(
                f"{what} {len(names)} nodes, expected {len(expected)}; extra: {sorted(names - expected)[:10]},"
                f" missing: {sorted(expected - names)[:10]}"
            )
    not_ok = {
        node: status for node, status in {**full["results"], **changed["results"]}.items() if status not in ("success", "pass")
    }
    if not_ok:
        problems.append(f"nodes did not succeed: {dict(list(not_ok.items())[:10])}")
    return problems


def _judged(value: float, target: float, shown: str) -> str:
    return f"**{shown.format(value)}** (≤ {shown.format(target)}: {'met' if value <= target else 'MISSED'})"


def _name(unique_id: str) -> str:
    return unique_id.split(".")[2]


def _phase(stage: dict, name: str) -> float:
    (seconds,) = [seconds for what, seconds in stage["phases"] if what == name]
    return seconds


def _phases(stage: dict) -> str:
    return ", ".join(f"{what} {seconds:.1f}" for what, seconds in stage["phases"])


if __name__ == "__main__":
    main()
