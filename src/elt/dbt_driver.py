"""One dbt process for every dbt command of a transform stage (`python -m elt.dbt_driver`).

Each line on stdin is a request, `{"arguments": [...], "cwd": ..., "env": {...}, "manifest":
true}`; the driver runs it in that folder with that environment, with dbt's programmatic runner,
its output on stdout as the `dbt` command prints it, then one line `END_MARKER {"return_code": n, "parse_seconds": s}`
(dbt's own exit codes: 0 done, 1 nodes failed, 2 dbt could not run; the seconds spent parsing
the project before this command, 0 when it ran on the earlier parse). A request with `"manifest":
true` runs on the project parsed once (partial parse kept in target/) by the first such request,
or by a `dbt parse` request; `dbt deps` forgets that parse, since new packages change the
project. `--warm-up` prepares dbt before the ready line (`_warm_up`). The driver ends when stdin
closes.

Why: importing dbt and parsing the project cost seconds (a 500-model project: 5-10 s here) in
every dbt process, and an `--only-changed` build runs freshness, a selection and the build
(bench/p5_only_changed.py). dbt-core is not safe to invoke twice at once in one process; the
driver runs one request at a time, in the project folder (dbt-duckdb resolves seed paths from it).

Imports nothing of elt: the driver's start-up is dbt's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

END_MARKER = "@@elt-dbt-driver-end@@"
READY_MARKER = "@@elt-dbt-driver-ready@@"  # dbt is imported


def main() -> None:
    from dbt.cli.exceptions import DbtUsageException
    from dbt.cli.main import dbtRunner
    from dbt.contracts.graph.manifest import Manifest

    if "--warm-up" in sys.argv[1:]:
        # Without a scratch folder (a read-only /tmp) the first request pays dbt's preparation instead.
        with contextlib.suppress(OSError):
            _warm_up(dbtRunner)
    print(READY_MARKER, flush=True)
    manifest: Manifest | None = None
    for line in sys.stdin:
        request = json.loads(line)
        os.chdir(request["cwd"])  # dbt-duckdb resolves seed paths from the working directory
        os.environ.clear()
        os.environ.update(request["env"])
        arguments = request["arguments"]
        return_code = None
        parse_seconds = 0.0
        parse_started = time.monotonic()
        if request.get("manifest") and manifest is None:
            # Not written to target/: the command that follows writes the manifest if it writes any.
            parsed = dbtRunner().invoke(["parse", "--quiet", "--no-write-json", *request.get("common", [])])
            if parsed.success and isinstance(parsed.result, Manifest):
                manifest = parsed.result
            else:
                return_code = 2
            parse_seconds = time.monotonic() - parse_started
        if return_code is None:
            result = dbtRunner(manifest=manifest if request.get("manifest") else None).invoke(arguments)
            if isinstance(result.exception, DbtUsageException):  # the dbt command prints these itself
                print(f"Error: {result.exception}")
            return_code = 0 if result.success else (2 if result.exception is not None else 1)
            if arguments[:1] == ["deps"]:
                manifest = None
            elif arguments[:1] == ["parse"] and isinstance(result.result, Manifest):
                manifest = result.result
                parse_seconds = time.monotonic() - parse_started
        _close_duckdb()
        sys.stdout.flush()
        sys.stderr.flush()
        ended = {"return_code": return_code, "parse_seconds": round(parse_seconds, 3)}
        print(f"{END_MARKER} {json.dumps(ended)}", flush=True)


def _warm_up(runner: type) -> None:
    """Parse an empty DuckDB project in a scratch folder, so that what dbt prepares on its first
    invocation (its config classes, the adapter) is ready before the first request (~1 s here).
    For a process started early (all-etl's, while it syncs): for any other the warm-up's parse of
    dbt's own macros would cost more than it saves. Its failure is not the project's: the first
    request reports whatever is wrong."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="elt-dbt-warm-up-") as folder:
        (Path(folder) / "dbt_project.yml").write_text("name: warm_up\nprofile: warm_up\nconfig-version: 2\n")
        (Path(folder) / "profiles.yml").write_text(
            "warm_up:\n  target: t\n  outputs:\n    t:\n      type: duckdb\n      path: ':memory:'\n"
        )
        options = ["--project-dir", folder, "--profiles-dir", folder, "--log-path", folder, "--target-path", folder]
        quiet = ["--log-level", "none", "--no-write-json", "--no-partial-parse", "--no-send-anonymous-usage-stats"]
        runner().invoke(["parse", *quiet, *options])
    _close_duckdb()


def _close_duckdb() -> None:
    """dbt-duckdb keeps the database open between invocations of one process (a class attribute
    its atexit hook clears); closed after each request, so that other processes (the embedded
    load, the run's reports, a test) may open the file while the driver waits."""
    connections = sys.modules.get("dbt.adapters.duckdb.connections")
    if connections is None:
        return
    manager = connections.DuckDBConnectionManager
    with manager._LOCK:
        environment, manager._ENV = manager._ENV, None
        if environment is not None:
            environment.close()


if __name__ == "__main__":
    main()
