"""What a long-lived process would give P3's running-server case (issue #12), measured before
building it: `elt run` as a fresh process against `elt run` forked from a process that has
imported Prefect, the flows and PyAirbyte already (a "zygote"), side by side, against one
running Prefect server, `--repeat` rounds in turn (2 by default), after one warm-up run each.

This is a measurement, not the feature: the fork here is the bench's own, with nothing a
worker would need (the flow run's environment and file descriptors handed over, stale code,
cancellation). Results land in bench/out/p3_warm_process.md.

    .venv/bin/python bench/p3_warm_process.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import traceback

import click
from _harness import BIN, OUT, REPO_ROOT, machine, measure, prefect_server, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    repeat = parser.parse_args().repeat
    OUT.mkdir(parents=True, exist_ok=True)
    with prefect_server(startup_seconds=900) as api_url:
        os.environ["PREFECT_API_URL"] = api_url
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        os.chdir(REPO_ROOT)
        started = time.monotonic()
        from elt import cli
        from elt.extract.embedded import _import_pyairbyte

        _import_pyairbyte()
        imported = time.monotonic() - started
        if threading.active_count() != 1:
            raise SystemExit(f"{threading.active_count()} threads after the imports: forking would be unsafe")
        print(f"warm process: imports {imported:.1f} s", flush=True)

        fresh: list[float] = []
        forked: list[float] = []
        for round_ in range(repeat + 1):
            result = measure([str(BIN / "elt"), "run"], cwd=REPO_ROOT, env=dict(os.environ), log=OUT / "p3_warm_fresh.log")
            if result.return_code != 0:
                raise SystemExit(f"elt run failed; see {OUT / 'p3_warm_fresh.log'}")
            seconds = _forked_run(cli)
            print(
                f"round {round_}{' (warm-up)' if round_ == 0 else ''}: fresh {result.seconds:.1f} s, forked {seconds:.1f} s",
                flush=True,
            )
            if round_:
                fresh.append(result.seconds)
                forked.append(seconds)

    rows = [
        ["`elt run`, a fresh process", f"{statistics.median(fresh):.1f} s"],
        ["`elt run` forked from a warm process", f"{statistics.median(forked):.1f} s"],
    ]
    report = "\n".join(
        [
            f"# P3 against a running server: fresh process or forked from a warm one, {repeat} rounds ({machine()}, "
            f"load average {', '.join(f'{value:.1f}' for value in os.getloadavg())})",
            "",
            f"The warm process's imports (paid once): {imported:.1f} s.",
            "",
            table(["run", "wall (median)"], rows),
            "",
            f"forked ÷ fresh: {statistics.median(forked) / statistics.median(fresh):.2f}×",
        ]
    )
    (OUT / "p3_warm_process.md").write_text(report + "\n")
    print(report)


def _forked_run(cli) -> float:
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        log = os.open(OUT / "p3_warm_forked.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            cli.app(["run"], standalone_mode=False)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except click.exceptions.Exit as exit_:
            code = exit_.exit_code
        except Exception:  # noqa: BLE001 - the child exits 1 on any error, its traceback in the log
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the forked elt run failed; see {OUT / 'p3_warm_forked.log'}")
    return seconds


if __name__ == "__main__":
    main()
