"""A stand-in for the `dbt` package (dbt-core), for fast tests of the dbt process (src/elt/dbt_driver.py)
and of `elt.dbt_runner`, which talks to it: with this folder first on PYTHONPATH, the real
driver (`python -m elt.dbt_driver`) and the venv's real `dbt` command import it instead of dbt.

The real dbt takes seconds to import and parse (10-20 s a test in tests/test_dbt.py): too slow
to run for every mutant. What the driver and the `dbt` command use of dbt is small, and this
keeps its contract: `dbt.cli.main.dbtRunner(manifest=None).invoke(arguments)` returns a
`dbtRunnerResult(success, exception, result)` (a `Manifest` as the result of `parse`; success
False without an exception when nodes failed, with one when dbt could not run; a
`DbtUsageException` for a command line it refuses), prints its log on stdout, and writes its
files to the project's target/ (not with `--no-write-json`); `dbt.cli.main.cli()` is the
`dbt` command: the same, ending the process with dbt's exit code (0, 1 nodes failed, 2 could
not run).

What a command does comes from the JSON file named by FAKE_DBT_SCRIPT, read at each
invocation from the environment the driver gives the command: `{"<first argument>": {...}}`,
each entry with any of `print` (stdout lines), `stderr` (lines), `files` (name → JSON document
written to target/), `outcome` (`success`, `failed`, `error`, `usage`), `seconds` (time the
work takes), `wait_for` (a path: the command waits until it exists, at most `wait_seconds` or
WAIT_SECONDS, and fails if it does not appear) with `print_after` (lines printed once it does), `exit` (the process exits with that code mid-command) and
`signal` (the process is killed by that signal mid-command). A command without an entry
succeeds and prints nothing. Each invocation is appended to the file named by FAKE_DBT_LOG as
one JSON line: pid, the Python running it, `via` (`runner` or `cli`), arguments, working directory, whether it was
given a manifest, and its environment.
"""
