"""dbt's results read back as data, without running dbt: target/run_results.json and manifest.json
as dbt 1.11 writes them, dbt's text log lines as it prints them, and the messages a user reads.
The dbt process (src/elt/dbt_driver.py, and the `dbt` command) runs for real, with a stand-in
for the dbt library first on its PYTHONPATH (tests/fakes/dbt_library, `FakeDbtLibrary`).
tests/test_dbt.py runs the real dbt for the same paths (10-20 s a test); these take
milliseconds, so `make mutation` can run them for every mutant of dbt_runner.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from elt import dbt_runner
from elt.dbt_runner import DbtBuildFailed, DbtInvocationError, DbtLogLevels, DbtProject, DbtRun, NodeResult


def _node(unique_id: str, status: str, message: str | None = None) -> NodeResult:
    return NodeResult(unique_id, status, 0.5, message, None)


def test_build_failure_names_every_failed_node_with_its_cause() -> None:
    run = DbtRun(
        "build",
        Path("/p"),
        1,
        results=[
            _node("seed.shop.orders", "success"),
            _node(
                "model.shop.broken",
                "error",
                'Runtime Error in model broken (models/broken.sql)\n  Binder Error: column "x" not found',
            ),
            _node("model.shop.after", "skipped"),
            _node("test.shop.not_null_orders_id", "fail", "Got 2 results, configured to fail if != 0"),
            _node("model.shop.crashed", "runtime error", None),
            _node("test.shop.warned", "warn", "Got 1 result"),
        ],
    )
    with pytest.raises(DbtBuildFailed) as error:
        dbt_runner.raise_if_failed(run)
    assert str(error.value) == (
        "dbt build failed on 3 node(s): "
        'model.shop.broken (error: Binder Error: column "x" not found); '
        "test.shop.not_null_orders_id (fail: Got 2 results, configured to fail if != 0); "
        "model.shop.crashed (runtime error: no message)"
    )
    assert [node.unique_id for node in error.value.failed] == [
        "model.shop.broken",
        "test.shop.not_null_orders_id",
        "model.shop.crashed",
    ]


def test_failed_nodes_win_over_the_exit_code_and_a_clean_run_is_returned() -> None:
    clean = DbtRun("build", Path("/p"), 0, results=[_node("model.shop.a", "success"), _node("test.shop.t", "warn")])
    assert dbt_runner.raise_if_failed(clean) is clean
    with pytest.raises(DbtBuildFailed, match=r"^dbt run failed on 1 node\(s\): model\.shop\.a \(error: boom\)$"):
        dbt_runner.raise_if_failed(DbtRun("run", Path("/p"), 0, results=[_node("model.shop.a", "error", "boom")]))


def test_dbt_that_could_not_run_says_why_in_one_line() -> None:
    run = DbtRun(
        "build",
        Path("/p"),
        2,
        output_tail=["Running with dbt=1.11.2", "Encountered an error:", "Parsing Error", "  models/x.sql: bad jinja"],
        error_lines=["Encountered an error:", "Parsing Error", "models/x.sql: bad jinja", "models/x.sql: bad jinja"],
    )
    with pytest.raises(DbtInvocationError) as error:
        dbt_runner.raise_if_failed(run)
    assert str(error.value) == "dbt build in /p could not run: models/x.sql: bad jinja"
    crashed = DbtRun("ls", Path("/p"), 1, output_tail=["a", "b", "c", "d", "Killed", "https://docs.getdbt.com"])
    with pytest.raises(DbtInvocationError, match=r"^dbt ls in /p could not run: c: d: Killed$"):
        dbt_runner.raise_if_failed(crashed)
    with pytest.raises(DbtInvocationError, match=r"^dbt ls in /p could not run: the dbt process was killed \(signal 9\)$"):
        dbt_runner.raise_if_failed(DbtRun("ls", Path("/p"), -9))
    with pytest.raises(DbtInvocationError, match=r"^dbt ls in /p could not run: exit code 2$"):
        dbt_runner.raise_if_failed(DbtRun("ls", Path("/p"), 2))


@pytest.mark.parametrize(
    ("message", "short"),
    [
        (None, "no message"),
        ("\n  \n", "no message"),
        ("Runtime Error in model broken (models/broken.sql)\n  Binder Error: nope\n  LINE 1", "Binder Error: nope"),
        ("Database Error in model m (models/m.sql)", "Database Error in model m (models/m.sql)"),
        ("x" * 400, "x" * 300),
    ],
)
def test_short_message_is_the_line_that_says_what_went_wrong(message: str | None, short: str) -> None:
    assert _node("model.shop.m", "error", message).short_message == short


@pytest.mark.parametrize(
    ("status", "failed"),
    [
        ("error", True),
        ("fail", True),
        ("runtime error", True),
        ("warn", False),
        ("skipped", False),
        ("success", False),
        ("pass", False),
    ],
)
def test_which_statuses_are_failures(status: str, failed: bool) -> None:
    assert _node("model.shop.m", status).failed is failed


def test_log_levels_follow_each_event_and_collect_its_error_lines() -> None:
    """Lines as dbt 1.11 prints them: an event is a timestamped line and the untimestamped lines after it."""
    lines = [
        "12:00:01  Running with dbt=1.11.2",
        "12:00:02  1 of 3 START sql table model main.a ........ [RUN]",
        "12:00:03  1 of 3 ERROR creating sql table model main.a ........ [ERROR in 0.1s]",
        "12:00:03  2 of 3 WARN 1 not_null_a_id ........ [WARN 1]",
        "12:00:04  Completed with 1 error, 0 partial successes, and 1 warning:",
        "12:00:04  ",
        "12:00:04  Runtime Error in model a (models/a.sql)",
        "  Binder Error: nope",
        "",
        "12:00:05  [WARNING]: Deprecated functionality",
        "  more about it",
        "12:00:06  Done. PASS=1 WARN=1 ERROR=1 SKIP=0 TOTAL=3",
        "\x1b[0m12:00:07  Could not connect to the warehouse",
    ]
    levels = DbtLogLevels()
    assert [levels.of(line) for line in lines] == [
        logging.INFO,
        logging.INFO,
        logging.ERROR,
        logging.WARNING,
        logging.ERROR,
        logging.INFO,
        logging.ERROR,
        logging.ERROR,
        logging.ERROR,
        logging.WARNING,
        logging.WARNING,
        logging.INFO,
        logging.ERROR,
    ]
    assert levels.error_lines == [
        "1 of 3 ERROR creating sql table model main.a ........ [ERROR in 0.1s]",
        "Completed with 1 error, 0 partial successes, and 1 warning:",
        "Runtime Error in model a (models/a.sql)",
        "Binder Error: nope",
        "Could not connect to the warehouse",
    ]


def test_dbt_debug_failed_checks_are_errors_to_the_end() -> None:
    levels = DbtLogLevels()
    lines = [
        "12:00:01  Connection test: [ERROR]",
        "12:00:02  1 check failed:",
        "12:00:02  dbt was unable to connect",
        "12:00:03  Profile x",
    ]
    assert [levels.of(line) for line in lines] == [logging.ERROR] * 4
    assert dbt_runner.failure_cause(lines) == "dbt was unable to connect: Profile x"


@pytest.mark.parametrize(
    "first",
    [
        "Encountered an error:",
        "3 of 9 FAIL 2 not_null_x",
        "Failure in test t (models/s.yml)",
        "Error in model m (models/m.sql)",
        "Completed with 12 errors",
        "Database Error",
        "Compilation Error",
        "Dependency Error",
        "Runtime Error",
        "Parsing Error",
    ],
)
def test_error_events_dbt_prints(first: str) -> None:
    assert DbtLogLevels().of(f"10:11:12  {first}") == logging.ERROR


@pytest.mark.parametrize("line", ["Completed with 0 errors", "Completed successfully", "1 of 2 OK created", "Finished running"])
def test_lines_that_are_not_errors(line: str) -> None:
    assert DbtLogLevels().of(f"10:11:12  {line}") == logging.INFO


def test_failure_cause_drops_the_framing_and_keeps_three_lines() -> None:
    lines = [
        "10:00:00  Encountered an error:",
        "Runtime Error",
        "  Could not find profile named 'x'",
        "  https://docs.getdbt.com/docs/configure-your-profile",
        "  Traceback (most recent call last):",
        '  File "dbt/main.py", line 1',
        "  ^^^^",
        "  return 1",
        "  raise X",
        "  Check your database credentials and try again.",
        "  Could not find profile named 'x'",
        "  second cause",
        "  third cause",
        "  fourth cause",
    ]
    assert dbt_runner.failure_cause(lines, 2) == "Could not find profile named 'x': second cause: third cause"
    assert dbt_runner.failure_cause([], 2) == "exit code 2"
    assert dbt_runner.failure_cause(["10:00:00  a", "10:00:01  b"], 1) == "a: b"


def test_build_arguments_leave_out_what_is_stale_beside_the_users_exclude() -> None:
    assert dbt_runner.build_arguments() == ["build"]
    assert dbt_runner.build_arguments(stale=["source:a.b+", "source:a.c+"]) == ["build", "--exclude", "source:a.b+ source:a.c+"]
    assert dbt_runner.build_arguments("marts", full_refresh=True) == ["build", "--select", "marts", "--full-refresh"]
    assert dbt_runner.build_arguments(exclude="legacy") == ["build", "--exclude", "legacy"]


def _written(project: Path, results: list[dict], nodes: dict | None) -> DbtProject:
    target = project / "target"
    target.mkdir(parents=True)
    (project / "dbt_project.yml").write_text("name: shop\nprofile: shop\n")
    (target / "run_results.json").write_text(json.dumps({"results": results}))
    if nodes is not None:
        (target / "manifest.json").write_text(json.dumps({"nodes": nodes}))
    return DbtProject.at(project)


def test_run_results_are_read_with_the_manifests_relation_and_materialization(tmp_path: Path) -> None:
    """The fields dbt 1.11 writes; relation_name falls back to the manifest's, as for seeds."""
    project = _written(
        tmp_path,
        [
            {
                "unique_id": "model.shop.orders",
                "status": "success",
                "execution_time": 1.23456,
                "message": "OK",
                "adapter_response": {"rows_affected": 7},
                "relation_name": '"w"."main"."orders"',
            },
            {"unique_id": "seed.shop.raw", "status": "success", "execution_time": None, "message": None, "adapter_response": {}},
            {"unique_id": "test.shop.t", "status": "fail"},
        ],
        {
            "model.shop.orders": {"relation_name": "ignored", "config": {"materialized": "incremental"}},
            "seed.shop.raw": {"relation_name": '"w"."main"."raw"', "config": {"materialized": "seed"}},
        },
    )
    assert dbt_runner._read_run_results(project, written_after=0.0) == [
        NodeResult("model.shop.orders", "success", 1.235, "OK", 7, '"w"."main"."orders"', "incremental"),
        NodeResult("seed.shop.raw", "success", 0.0, None, None, '"w"."main"."raw"', "seed"),
        NodeResult("test.shop.t", "fail", 0.0, None, None, None, None),
    ]


def test_run_results_without_a_manifest_still_give_each_node(tmp_path: Path) -> None:
    project = _written(tmp_path, [{"unique_id": "model.shop.a", "status": "error", "message": "boom"}], None)
    assert dbt_runner._read_run_results(project, written_after=0.0) == [NodeResult("model.shop.a", "error", 0.0, "boom", None)]


def test_run_results_left_by_an_earlier_run_are_not_this_runs(tmp_path: Path) -> None:
    """dbt stopped before writing its own: the file is older than this run's start, so no results."""
    project = _written(tmp_path, [{"unique_id": "model.shop.a", "status": "success"}], {})
    written = project.run_results_path.stat().st_mtime
    os.utime(project.run_results_path, (written - 10, written - 10))
    assert dbt_runner._read_run_results(project, written_after=written - 5) == []
    assert dbt_runner._read_run_results(project, written_after=written - 10) != []
    project.run_results_path.unlink()
    assert dbt_runner._read_run_results(project, written_after=0.0) == []


def test_project_profile_name_and_packages(tmp_path: Path) -> None:
    (tmp_path / "dbt_project.yml").write_text("name: shop\nprofile: shop_warehouse\n")
    project = DbtProject.at(tmp_path)
    assert project.profile_name == "shop_warehouse" and not project.has_packages
    (tmp_path / "dependencies.yml").write_text("packages: []\n")
    assert project.has_packages
    (tmp_path / "dbt_project.yml").write_text("name: shop\n")
    with pytest.raises(dbt_runner.ConfigurationError, match=rf"^{tmp_path / 'dbt_project.yml'}: no 'profile' key$"):
        _ = project.profile_name


def test_a_line_before_any_event_is_info_and_long_causes_are_cut() -> None:
    assert DbtLogLevels().of("no timestamp yet") == logging.INFO
    assert dbt_runner.failure_cause(["10:00:00  Encountered an error:", "  " + "y" * 400]) == "y" * 300


def test_results_files_without_their_lists_give_no_nodes(tmp_path: Path) -> None:
    """A run_results.json without results, or a manifest without nodes, as a crashed dbt may leave them."""
    project = _written(tmp_path, [{"unique_id": "model.shop.a", "status": "success"}], {})
    (tmp_path / "target" / "manifest.json").write_text("{}")
    assert dbt_runner._read_run_results(project, written_after=0.0) == [NodeResult("model.shop.a", "success", 0.0, None, None)]
    project.run_results_path.write_text("{}")
    assert dbt_runner._read_run_results(project, written_after=0.0) == []


def test_folder_without_a_project_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(dbt_runner.ConfigurationError) as error:
        DbtProject.at(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: no dbt_project.yml; set ELT_DBT_PROJECT_DIR (or --project-dir) to the dbt project's folder in the repo"
    )


def _freshness(table: str, status: str, loaded: str | None = "2026-11-28T10:00:59.5+00:00") -> dbt_runner.SourceFreshness:
    criteria = {"warn_after": {"count": 1, "period": "day"}, "error_after": {"count": 48, "period": "hour"}}
    return dbt_runner.SourceFreshness(f"source.shop.faker.{table}", status, loaded, criteria, error="boom")


def test_a_stale_source_fails_a_clean_build_and_is_named_beside_failed_nodes() -> None:
    """Freshness as target/sources.json gives it: the last load in UTC to the minute, the threshold passed."""
    stale, late = _freshness("users", "error"), _freshness("products", "warn", "2026-11-28T12:30:00+02:00")
    unchecked, fresh = _freshness("orders", "runtime error"), _freshness("carts", "pass", "0001-01-01T00:00:00+00:00")
    assert late.line == "source faker.products is stale: last loaded 2026-11-28 10:30 UTC, warn_after 1 day"
    assert fresh.line == "source faker.carts is fresh: last loaded never"
    assert _freshness("carts", "pass", None).line == "source faker.carts is fresh: last loaded never"  # no max_loaded_at
    clean = DbtRun("build", Path("/p"), 0, results=[_node("model.shop.a", "success")], freshness=[late, fresh])
    assert dbt_runner.raise_if_failed(clean) is clean
    with pytest.raises(dbt_runner.DbtSourcesStale) as error:
        dbt_runner.raise_if_failed(DbtRun("build", Path("/p"), 0, freshness=[stale, late, unchecked]))
    assert str(error.value) == (
        "source faker.users is stale: last loaded 2026-11-28 10:00 UTC, error_after 48 hours; "
        "source faker.orders freshness could not be checked: boom"
    )
    failed = DbtRun("build", Path("/p"), 1, results=[_node("model.shop.a", "error", "bad")], freshness=[stale])
    with pytest.raises(DbtBuildFailed) as build_error:
        dbt_runner.raise_if_failed(failed)
    assert str(build_error.value) == (
        "dbt build failed on 1 node(s): model.shop.a (error: bad); "
        "source faker.users is stale: last loaded 2026-11-28 10:00 UTC, error_after 48 hours"
    )
    failed.freshness = [stale, unchecked]
    with pytest.raises(DbtBuildFailed) as build_error:
        dbt_runner.raise_if_failed(failed)
    assert str(build_error.value) == (
        "dbt build failed on 1 node(s): model.shop.a (error: bad); "
        "source faker.users is stale: last loaded 2026-11-28 10:00 UTC, error_after 48 hours; "
        "source faker.orders freshness could not be checked: boom"
    )


def test_the_summary_of_a_completed_run_lists_the_sources_that_were_not_fresh() -> None:
    from elt.reporting import EtlSummary, render_summary

    run = DbtRun("build", Path("/p"), 0, results=[_node("model.shop.a", "success")])
    run.freshness = [_freshness("products", "warn"), _freshness("carts", "pass")]
    assert (
        "`dbt build`: 1 success\n\n- source faker.products is stale: last loaded 2026-11-28 10:00 UTC, warn_after 1 day\n\n"
        in (render_summary(EtlSummary(dbt_run=run)))
    )


@pytest.mark.parametrize(
    ("arguments", "writes"),
    [
        (["build", "--select", "a"], True),
        (["parse"], True),
        (["source", "freshness"], True),
        (["compile"], True),
        (["ls", "--select", "a"], False),
        (["show", "--inline", "select 1"], False),
        (["run-operation", "grant"], False),
        (["build", "--target-path", "/elsewhere"], False),
        (["compile", "--target-path=/elsewhere"], False),
        (["compile", "--target-path=/t=1"], False),  # an `=` in the value too
        (["run", "--no-write-json"], False),
    ],
)
def test_which_commands_leave_the_manifest_they_ran_on_in_the_projects_target(arguments: list[str], writes: bool) -> None:
    """What tells a Dbt its project's target/manifest.json is its own parse (`parsed`)."""
    assert dbt_runner._writes_manifest(arguments) is writes


def test_the_parse_before_a_command_gets_where_it_writes_and_what_it_renders() -> None:
    arguments = ["docs", "generate", "--target-path", "/t", "--log-path=/l", "--vars", "{a: 1}", "--select", "a", "--vars"]
    assert dbt_runner._parse_options(arguments) == ["--target-path", "/t", "--log-path=/l", "--vars", "{a: 1}"]
    assert dbt_runner._parse_options(["compile", "--target-path"]) == []  # no value: nothing to pass on
    assert dbt_runner._parse_options(["compile", "--target-path", "/t"]) == ["--target-path", "/t"]  # the last two
    assert dbt_runner._parse_options(["compile", '--vars={a: "b=c"}']) == ['--vars={a: "b=c"}']  # an `=` in the value too


def test_an_ended_dbt_process_has_its_pipes_closed_and_is_reaped_in_the_background() -> None:
    """`cat` stands in for the dbt process (it too exits when its input closes)."""
    import subprocess
    import time

    driver = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    dbt_runner._end_driver(driver)
    assert driver.stdin is not None and driver.stdin.closed and driver.stdout is not None and driver.stdout.closed
    deadline = time.monotonic() + 30
    while driver.returncode is None and time.monotonic() < deadline:  # set by the reaping thread's wait()
        time.sleep(0.01)
    assert driver.returncode == 0


def test_a_dbt_process_that_does_not_exit_when_its_input_closes_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import time

    monkeypatch.setattr(dbt_runner, "DBT_EXIT_SECONDS", 0.2)
    driver = subprocess.Popen(["sleep", "900"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        dbt_runner._end_driver(driver)
        deadline = time.monotonic() + 30
        while driver.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert driver.returncode == -9
    finally:
        driver.kill()
        driver.wait()


class ScriptedDbt:
    """Stands in for dbt_runner.Dbt: every command prints `lines`, leaves `files` (name → JSON) in
    the project's target/ as dbt does, and exits `return_code`; `asked` keeps each command's arguments."""

    def __init__(self, project: DbtProject, lines: list[str], return_code: int = 0, files: dict | None = None) -> None:
        self.project = project
        self.lines = lines
        self.return_code = return_code
        self.files = files or {}
        self.asked: list[list[str]] = []
        self.last_return_code = 0

    def invoke(self, arguments: list[str]):
        import time

        self.asked.append(list(arguments))
        time.sleep(0.02)  # a file's time is the kernel's coarse clock, which may lag time.time() by a tick
        (self.project.path / "target").mkdir(exist_ok=True)
        for name, document in self.files.items():
            (self.project.path / "target" / name).write_text(json.dumps(document))
        yield from (line + "\n" for line in self.lines)
        self.last_return_code = self.return_code

    def run_captured(self, *arguments: str, timeout: float | None = None):
        import subprocess

        lines = list(self.invoke(list(arguments)))
        return subprocess.CompletedProcess(["dbt", *arguments], self.last_return_code, "".join(lines), "")


def _project(tmp_path: Path, *yaml_files: str) -> DbtProject:
    (tmp_path / "dbt_project.yml").write_text("name: shop\nprofile: shop\n")
    for number, text in enumerate(yaml_files):
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / f"sources_{number}.yml").write_text(text)
    return DbtProject.at(tmp_path)


def test_a_dbt_command_is_logged_as_dbt_prints_it_and_returns_its_nodes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each line at its level without dbt's timestamp, START lines and blank ones left out of the
    log (START lines are kept in the tail), the nodes from the run_results.json it wrote."""
    project = _project(tmp_path)
    lines = [
        "12:00:01  Running with dbt=1.11.2",
        "12:00:02  1 of 2 START sql table model main.a ........ [RUN]",
        "12:00:03  1 of 2 ERROR creating sql table model main.a ........ [ERROR in 0.1s]",
        "12:00:03  ",
        "",
        "12:00:04  2 of 2 WARN 1 not_null_a_id ........ [WARN 1]",
    ]
    results = {"results": [{"unique_id": "model.shop.a", "status": "error", "message": "boom"}]}
    dbt = ScriptedDbt(project, lines, return_code=1, files={"run_results.json": results})
    log = logging.getLogger("tests.dbt")
    with caplog.at_level(logging.INFO, logger="tests.dbt"):
        run = dbt_runner.run_dbt(dbt, ["build", "--select", "a"], log=log)  # type: ignore[arg-type]
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.INFO, "Running dbt build --select a"),
        (logging.INFO, "Running with dbt=1.11.2"),
        (logging.ERROR, "1 of 2 ERROR creating sql table model main.a ........ [ERROR in 0.1s]"),
        (logging.WARNING, "2 of 2 WARN 1 not_null_a_id ........ [WARN 1]"),
    ]
    assert run == DbtRun(
        "build",
        project.path,
        1,
        results=[NodeResult("model.shop.a", "error", 0.0, "boom", None)],
        output_tail=[line[10:] for line in lines if line[10:].strip()],
        error_lines=["1 of 2 ERROR creating sql table model main.a ........ [ERROR in 0.1s]"],
    )


def test_the_tail_of_a_long_output_is_its_last_40_lines(tmp_path: Path) -> None:
    lines = [f"12:00:01  line {number}" for number in range(100)]
    run = dbt_runner.run_dbt(ScriptedDbt(_project(tmp_path), lines), ["run"])  # type: ignore[arg-type]
    assert run.output_tail == [f"line {number}" for number in range(60, 100)] and run.results == []


LISTED_SOURCES = [
    "12:00:01  Running with dbt=1.11.2",
    json.dumps(
        {"unique_id": "source.shop.faker.users", "name": "users", "meta": {}, "config": {"meta": {"airbyte_connection": "faker"}}}
    ),
    json.dumps(
        {
            "unique_id": "source.shop.faker.products",
            "name": "products",
            "meta": {"airbyte_connection": ["faker", "crm"], "owner": "a"},
            "config": {"meta": {"owner": "b"}},
        }
    ),
    json.dumps({"unique_id": "source.shop.crm.leads", "name": "leads", "meta": {"airbyte_connection": "crm"}, "config": None}),
    json.dumps({"unique_id": "source.shop.web.events", "name": "events", "meta": None}),
    # Names holding dots (a table `users.v2`, a source `mobile.app`), and fnmatch's wildcards.
    json.dumps({"unique_id": "source.shop.faker.users.v2", "name": "users.v2", "meta": {"airbyte_connection": "faker_v2"}}),
    json.dumps({"unique_id": "source.shop.mobile.app.hits[1]*", "name": "hits[1]*", "meta": {"airbyte_connection": "app"}}),
    json.dumps({"name": "not a node"}),
    "{not json",
    json.dumps(["a list"]),
]


def test_sources_are_listed_with_the_meta_of_their_config_and_their_own(tmp_path: Path) -> None:
    dbt = ScriptedDbt(_project(tmp_path), LISTED_SOURCES)
    sources = dbt_runner.list_sources(dbt)  # type: ignore[arg-type]
    assert dbt.asked == [
        [
            "ls",
            "--resource-type",
            "source",
            "--output",
            "json",
            "--output-keys",
            "unique_id database schema name meta config",
            "--quiet",
        ]
    ]
    assert [(source["unique_id"], source["meta"]) for source in sources] == [
        ("source.shop.faker.users", {"airbyte_connection": "faker"}),
        ("source.shop.faker.products", {"owner": "a", "airbyte_connection": ["faker", "crm"]}),  # its own meta wins
        ("source.shop.crm.leads", {"airbyte_connection": "crm"}),
        ("source.shop.web.events", {}),
        ("source.shop.faker.users.v2", {"airbyte_connection": "faker_v2"}),
        ("source.shop.mobile.app.hits[1]*", {"airbyte_connection": "app"}),
    ]


def test_what_a_failed_connection_feeds_is_named_by_source_with_everything_downstream(tmp_path: Path) -> None:
    dbt = ScriptedDbt(_project(tmp_path), LISTED_SOURCES)
    assert dbt_runner.downstream_of_connections(dbt, ["crm"]) == ["source:faker.products+", "source:crm.leads+"]  # type: ignore[arg-type]
    assert dbt_runner.downstream_of_connections(dbt, ["faker"]) == ["source:faker.users+", "source:faker.products+"]  # type: ignore[arg-type]
    assert dbt_runner.downstream_of_connections(dbt, ["web"]) == []  # type: ignore[arg-type]
    # dbt splits a source selector at each dot: a dot in a name is `?` (see source_selector).
    assert dbt_runner.downstream_of_connections(dbt, ["faker_v2", "app"]) == [  # type: ignore[arg-type]
        "source:faker.users?v2+",
        "source:mobile?app.hits[[]1][*]+",
    ]


@pytest.mark.parametrize(
    ("source_name", "table", "others"),
    [
        ("faker", "users", ["user", "users2", "Users"]),
        ("faker", "users.v2", ["users", "v2", "users.v3"]),
        ("mobile.app", "hits", ["hit", "hits2"]),
        ("web", "hits[1]*", ["hits1", "hits[1]", "hits[1]x"]),
        ("web", "a?b", ["axb"]),
        ("web", "page views,daily", []),
    ],
)
def test_a_source_selector_selects_that_table_as_dbt_reads_it(source_name: str, table: str, others: list[str]) -> None:
    """As dbt 1.11's SourceSelectorMethod reads `source:` (dbt/graph/selector_methods.py): the
    value split at each dot into source and table (three parts: package first), each matched
    with fnmatch (case-sensitive on Linux); a selection's value ends at a space (a union) or a
    comma (an intersection). tests/test_dbt.py checks one against dbt itself.
    The table is selected, and no other table of the source but one differing only where the
    name has a dot, space or comma (the cost of `?`, said in source_selector)."""
    from fnmatch import fnmatchcase

    selector = dbt_runner.source_selector(source_name, table)
    assert selector.startswith("source:") and selector.endswith("+") and not {" ", ","} & set(selector)
    parts = selector.removeprefix("source:").removesuffix("+").split(".")
    assert len(parts) == 2
    assert fnmatchcase(source_name, parts[0]) and fnmatchcase(table, parts[1])
    assert not any(fnmatchcase(other, parts[1]) for other in others)
    if "." in table:
        assert fnmatchcase(table.replace(".", "_"), parts[1])  # what `?` costs


def test_sources_that_cannot_be_listed_say_why(tmp_path: Path) -> None:
    project = _project(tmp_path)
    dbt = ScriptedDbt(project, ["12:00:01  Encountered an error:", "12:00:01  Parsing Error: bad yaml"], return_code=2)
    with pytest.raises(DbtInvocationError) as raised:
        dbt_runner.list_sources(dbt)  # type: ignore[arg-type]
    assert str(raised.value) == f"dbt ls in {project.path} could not list sources: Parsing Error: bad yaml"
    killed = ScriptedDbt(project, ["12:00:01  Running with dbt=1.11.2"], return_code=-9)
    with pytest.raises(DbtInvocationError) as raised:
        dbt_runner.list_sources(killed)  # type: ignore[arg-type]
    assert str(raised.value) == f"dbt ls in {project.path} could not list sources: the dbt process was killed (signal 9)"


FRESHNESS_YAML = """
sources:
  - name: faker
    config: {freshness: {error_after: {count: 48, period: hour}}, loaded_at_field: _loaded_at}
    tables: [{name: users}, {name: products}]
"""
CHECKED_MANIFEST = {
    "sources": {
        "source.shop.faker.users": {
            "source_name": "faker",
            "name": "users",
            "config": {"freshness": {"error_after": {"count": 48}}},
        },
        "source.shop.faker.products": {"source_name": "faker", "name": "products", "freshness": {"warn_after": {"count": 1}}},
        "source.shop.faker.orders": {
            "source_name": "faker",
            "name": "orders",
            "config": {"freshness": {"warn_after": {"count": None}}},
        },
        "source.shop.crm.leads": {"source_name": "crm", "name": "leads", "config": {"freshness": {"error_after": {"count": 2}}}},
    }
}


def test_freshness_is_read_per_source_and_a_selected_source_without_a_result_is_a_runtime_error(tmp_path: Path) -> None:
    """dbt 1.11 leaves a source it could not check out of sources.json (dbt-core#12812): it is a
    runtime error with the line dbt logged after its header. Left-out sources are not checked."""
    project = _project(tmp_path, FRESHNESS_YAML)
    sources = {
        "results": [
            {
                "unique_id": "source.shop.faker.users",
                "status": "error",
                "max_loaded_at": "2026-11-28T10:00:00",
                "criteria": {"error_after": {"count": 48, "period": "hour"}},
            },
            {
                "unique_id": "source.shop.faker.orders",
                "status": "runtime error",
                "error": "\n  Database Error\n  no such column\n",
            },
        ]
    }
    lines = [
        "12:00:01  Runtime Error in source products (models/sources_0.yml)",
        "  Catalog Error: Table with name products does not exist!",
        "12:00:02  Done.",
    ]
    dbt = ScriptedDbt(project, lines, return_code=1, files={"sources.json": sources, "manifest.json": CHECKED_MANIFEST})
    checked = dbt_runner.check_freshness(dbt, ["source:crm.leads+", "source:web.events+"])  # type: ignore[arg-type]
    assert dbt.asked == [["source", "freshness", "--exclude", "source:crm.leads+ source:web.events+"]]
    assert checked == [
        dbt_runner.SourceFreshness("source.shop.faker.orders", "runtime error", None, {}, "Database Error", "orders"),
        dbt_runner.SourceFreshness(
            "source.shop.faker.products",
            "runtime error",
            error="Catalog Error: Table with name products does not exist!",
            table="products",
        ),
        dbt_runner.SourceFreshness(
            "source.shop.faker.users",
            "error",
            "2026-11-28T10:00:00",
            {"error_after": {"count": 48, "period": "hour"}},
            table="users",
        ),
    ]
    dbt = ScriptedDbt(project, ["12:00:01  Done."], files={"sources.json": {"results": []}, "manifest.json": CHECKED_MANIFEST})
    assert [source.error for source in dbt_runner.check_freshness(dbt)] == [  # type: ignore[arg-type]
        "dbt wrote no result for it (the transform's log says why)",
        "dbt wrote no result for it (the transform's log says why)",
        "dbt wrote no result for it (the transform's log says why)",
    ]
    assert dbt.asked == [["source", "freshness"]]


def test_a_project_without_a_freshness_block_is_not_checked_at_all(tmp_path: Path) -> None:
    """Not even one dbt invocation (its start-up and parse cost seconds). A `freshness` under
    target/ or logs/ (dbt's own output) or in a non-YAML file does not count."""
    project = _project(tmp_path, "sources:\n  - name: faker\n    tables: [{name: users}]\n")
    for folder in ("target", "logs"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "copy.yml").write_text(FRESHNESS_YAML)
    (tmp_path / "models" / "notes.md").write_text("freshness")
    (tmp_path / "models" / "dir.yml").mkdir()
    dbt = ScriptedDbt(project, [])
    assert dbt_runner.check_freshness(dbt) == [] and dbt.asked == []  # type: ignore[arg-type]
    (tmp_path / "models" / "more.yaml").write_text(FRESHNESS_YAML)
    assert dbt_runner.declares_freshness(project)


def test_a_freshness_check_that_wrote_nothing_is_nothing_to_check_or_says_why_it_could_not_run(tmp_path: Path) -> None:
    project = _project(tmp_path, FRESHNESS_YAML)
    assert dbt_runner.check_freshness(ScriptedDbt(project, ["12:00:01  Nothing to do."])) == []  # type: ignore[arg-type]
    failed = ScriptedDbt(project, ["12:00:01  Encountered an error:", "12:00:01  Could not connect"], return_code=2)
    with pytest.raises(DbtInvocationError) as raised:
        dbt_runner.check_freshness(failed)  # type: ignore[arg-type]
    assert str(raised.value) == f"dbt source freshness in {project.path} could not run: Could not connect"
    for silent, cause in [
        (ScriptedDbt(project, [], return_code=2), "exit code 2"),
        (ScriptedDbt(project, ["12:00:01  Running with dbt=1.11.2"], return_code=-9), "the dbt process was killed (signal 9)"),
        (
            ScriptedDbt(project, ["12:00:01  Running with dbt=1.11.2", "Segmentation fault"], return_code=1),
            "Running with dbt=1.11.2: Segmentation fault",
        ),
    ]:  # no error event: the return code, or what it printed last
        with pytest.raises(DbtInvocationError) as raised:
            dbt_runner.check_freshness(silent)  # type: ignore[arg-type]
        assert str(raised.value) == f"dbt source freshness in {project.path} could not run: {cause}"


def test_dbts_blank_events_are_neither_logged_nor_read_as_part_of_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dbt prints an empty event as its timestamp and two spaces. It was logged as a bare
    `12:00:04` and, inside an error event, became part of the error: `could not run: 12:00:04:
    Runtime Error in model a ...`."""
    lines = [
        "12:00:01  Running with dbt=1.11.2",
        "12:00:04  Encountered an error:",
        "12:00:04  ",
        "12:00:04  Runtime Error in model a (models/a.sql)",
        "  Binder Error: nope",
        "12:00:04  ",
    ]
    project = _project(tmp_path)
    with caplog.at_level(logging.INFO, logger="tests.dbt"):
        run = dbt_runner.run_dbt(ScriptedDbt(project, lines, return_code=2), ["build"], log=logging.getLogger("tests.dbt"))  # type: ignore[arg-type]
    assert "12:00:04" not in caplog.messages and run.output_tail[-1] == "  Binder Error: nope"
    with pytest.raises(DbtInvocationError) as raised:
        dbt_runner.raise_if_failed(run)
    assert (
        str(raised.value)
        == f"dbt build in {project.path} could not run: Runtime Error in model a (models/a.sql): Binder Error: nope"
    )


def test_every_dbt_command_names_the_project_the_profiles_folder_and_the_target(tmp_path: Path) -> None:
    project = _project(tmp_path)
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "prod", {})
    assert dbt.command("build", "--select", "a") == [
        dbt_runner.dbt_executable(),
        "build",
        "--select",
        "a",
        "--project-dir",
        str(project.path),
        "--profiles-dir",
        str(tmp_path / "profiles"),
        "--target",
        "prod",
    ]
    assert Path(dbt_runner.dbt_executable()).name == "dbt" and Path(dbt_runner.dbt_executable()).is_file()
    dbt.close()  # no dbt process started: nothing to end


def test_dbt_runs_without_usage_stats_colours_or_a_narrow_printer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from elt.settings import load_settings

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    monkeypatch.setenv("KEPT_FROM_THE_RUN", "yes")
    env = dbt_runner.dbt_environment(load_settings())
    assert {
        name: env[name] for name in ("DBT_SEND_ANONYMOUS_USAGE_STATS", "DBT_USE_COLORS", "DBT_PRINTER_WIDTH", "KEPT_FROM_THE_RUN")
    } == {
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_USE_COLORS": "false",
        "DBT_PRINTER_WIDTH": "120",
        "KEPT_FROM_THE_RUN": "yes",
    }


def test_the_rendered_profiles_folder_lives_while_its_block_runs_and_old_ones_of_dead_processes_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The profile under the project's profile name and the target, in a temporary folder named
    after this process; a folder left by a process that has ended is removed, others stay."""
    import subprocess
    import tempfile

    import yaml

    from elt.settings import load_settings

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()
    of_ended = tmp_path / f"elt-profiles-{ended.pid}-abcd1234"
    of_live = tmp_path / f"elt-profiles-{os.getpid()}-efgh5678"
    not_a_pid = tmp_path / "elt-profiles-x-1234"
    for folder in (of_ended, of_live, not_a_pid):
        folder.mkdir()
    (tmp_path / "project").mkdir()
    project = _project(tmp_path / "project")
    with dbt_runner.profiles_dir(load_settings(), project) as rendered:
        assert rendered.name.startswith(f"elt-profiles-{os.getpid()}-") and rendered.parent == tmp_path
        profile = yaml.safe_load((rendered / "profiles.yml").read_text())
        assert list(profile) == ["shop"] and profile["shop"]["target"] == "duckdb"
        assert profile["shop"]["outputs"]["duckdb"]["type"] == "duckdb"
    assert not rendered.exists() and not of_ended.exists() and of_live.exists() and not_a_pid.exists()


def test_the_projects_own_profiles_are_used_when_told_and_their_absence_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from elt.errors import ConfigurationError
    from elt.settings import load_settings

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    monkeypatch.setenv("ELT_DBT_USE_PROJECT_PROFILES", "true")
    (tmp_path / "project").mkdir()
    project = _project(tmp_path / "project")
    with pytest.raises(ConfigurationError) as raised, dbt_runner.profiles_dir(load_settings(), project):
        pass
    assert str(raised.value) == f"{project.path}: ELT_DBT_USE_PROJECT_PROFILES is set but the project has no profiles.yml"
    (project.path / "profiles.yml").write_text("shop: {}\n")
    with dbt_runner.profiles_dir(load_settings(), project) as folder:
        assert folder == project.path


def test_each_unchecked_source_gets_the_line_after_its_own_header_and_long_lines_are_cut(tmp_path: Path) -> None:
    """Two sources dbt wrote no result for: users' header comes first, its cause on the next line
    (over 300 characters: cut at 300); products' header is dbt's last error line, with nothing
    after it to name. An error in sources.json is cut at 300 characters too."""
    project = _project(tmp_path, FRESHNESS_YAML)
    long_cause = "Catalog Error: " + "x" * 400
    lines = [
        "12:00:01  Runtime Error in source users (models/sources_0.yml)",
        f"  {long_cause}",
        "12:00:01  Runtime Error in source products (models/sources_0.yml)",
        "12:00:02  Done.",
    ]
    long_error = "Database Error " + "y" * 400
    sources = {"results": [{"unique_id": "source.shop.crm.leads", "status": "runtime error", "error": f"\n  {long_error}\n"}]}
    dbt = ScriptedDbt(project, lines, return_code=1, files={"sources.json": sources, "manifest.json": CHECKED_MANIFEST})
    assert (
        {source.unique_id: source.error for source in dbt_runner.check_freshness(dbt)}
        == {  # type: ignore[arg-type]
            "source.shop.crm.leads": long_error[:300],
            "source.shop.faker.products": "dbt wrote no result for it (the transform's log says why)",
            "source.shop.faker.users": long_cause[:300],
        }
    )


def test_a_freshness_check_logs_to_the_runs_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    project = _project(tmp_path, FRESHNESS_YAML)
    dbt = ScriptedDbt(project, ["12:00:01  Nothing to do."])
    with caplog.at_level(logging.INFO):
        dbt_runner.check_freshness(dbt, log=logging.getLogger("tests.freshness"))  # type: ignore[arg-type]
    assert [record.getMessage() for record in caplog.records if record.name == "tests.freshness"] == [
        "Running dbt source freshness",
        "Nothing to do.",
    ]


def test_a_yaml_file_that_is_not_utf8_still_declares_its_freshness(tmp_path: Path) -> None:
    """A latin-1 description (é as one byte) does not stop the check, nor skip it."""
    project = _project(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sources.yml").write_bytes(("# Café\n" + FRESHNESS_YAML).encode("latin-1"))
    assert dbt_runner.declares_freshness(project)


def test_settings_given_in_code_make_the_profile_and_dbts_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the environment's settings: the warehouse the caller's settings name is the one dbt is given."""
    import yaml

    from elt.settings import load_settings

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    other = tmp_path / "other.duckdb"
    profile = yaml.safe_load(dbt_runner.render_profile(load_settings(duckdb_path=str(other)), "shop"))
    assert profile["shop"]["outputs"]["duckdb"]["path"] == str(other)
    snowflake = load_settings(
        warehouse="snowflake",
        snowflake_account="acme-x1",
        snowflake_user="loader",
        snowflake_password="pw",
        snowflake_database="DB",
        snowflake_warehouse="WH",
    )
    env = dbt_runner.dbt_environment(snowflake)
    assert (env["SNOWFLAKE_ACCOUNT"], env["SNOWFLAKE_USER"], env["SNOWFLAKE_PASSWORD"]) == ("acme-x1", "loader", "pw")


# The dbt process (src/elt/dbt_driver.py) for real, with a stand-in for the dbt library.

FAKE_DBT_LIBRARY = Path(__file__).parent / "fakes" / "dbt_library"
RESPONSE_SECONDS = 30  # a dbt process that has not answered by then is killed: the test fails


class FakeDbtLibrary:
    """tests/fakes/dbt_library first on the dbt process's PYTHONPATH: the real driver (`python -m
    elt.dbt_driver`, started by dbt_runner) and the venv's real `dbt` command run, and the dbt
    they import is the stand-in, which keeps dbtRunner's contract (its docstring), does what
    `script` says for each command, and writes down every invocation (`calls`). The real dbt
    takes 10-20 s a test (tests/test_dbt.py)."""

    def __init__(self, folder: Path, script: dict) -> None:
        self.script_path = folder / "fake-dbt-script.json"
        self.log_path = folder / "fake-dbt-calls.jsonl"
        self.script(script)

    def script(self, script: dict) -> None:
        self.script_path.write_text(json.dumps(script))

    def variables(self) -> dict[str, str]:
        return {
            "PYTHONPATH": os.pathsep.join([str(FAKE_DBT_LIBRARY), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "FAKE_DBT_SCRIPT": str(self.script_path),
            "FAKE_DBT_LOG": str(self.log_path),
        }

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **self.variables(), **extra}

    def calls(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def seen(self) -> list[tuple[str, list[str], bool]]:
        """Each invocation as (via, arguments, given the parsed manifest)."""
        return [(call["via"], call["arguments"], call["manifest"]) for call in self.calls()]

    @contextmanager
    def in_environment(self) -> Iterator[None]:
        """On this process's environment for the block (what dbt_environment() and dbt_started_early read)."""
        saved = {name: os.environ.get(name) for name in self.variables()}
        os.environ.update(self.variables())
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def bounded() -> Iterator[None]:
    """Every process this test starts is killed if it is still running after RESPONSE_SECONDS:
    a dbt process that never answers ends the command (and fails the test) instead of hanging it."""
    import signal
    import threading

    def kill_children() -> None:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                for child in (task / "children").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(child), signal.SIGKILL)

    fired = threading.Event()
    timer = threading.Timer(RESPONSE_SECONDS, lambda: (fired.set(), kill_children()))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if fired.is_set():
        pytest.fail(f"a process of this test was still running after {RESPONSE_SECONDS} s, and was killed")


def _project_in(tmp_path: Path) -> DbtProject:
    (tmp_path / "project").mkdir()
    return _project(tmp_path / "project")


def _common(dbt: dbt_runner.Dbt) -> list[str]:
    return ["--project-dir", str(dbt.project.path), "--profiles-dir", str(dbt.profiles_dir), "--target", dbt.target]


def _ended(dbt: dbt_runner.Dbt) -> int:
    """Close the Dbt and wait for its dbt process's exit code."""
    driver = dbt._driver
    assert driver is not None
    dbt.close()
    return driver.wait(timeout=RESPONSE_SECONDS)


def test_commands_run_one_after_the_other_in_one_dbt_process_in_the_project_with_its_environment(
    tmp_path: Path, bounded: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The first command starts the process, which parses the project first (with the command's
    project, profiles folder and target); each command after runs on that parse, in the project
    folder, with the Dbt's environment and nothing else; the process ends when the Dbt closes."""
    project = _project_in(tmp_path)
    results = {"results": [{"unique_id": "model.shop.a", "status": "error", "message": "boom"}]}
    fake = FakeDbtLibrary(
        tmp_path,
        {
            "build": {
                "print": ["12:00:01  Running with dbt=1.11.2", "12:00:03  1 of 1 ERROR creating sql table model main.a"],
                "files": {"run_results.json": results},
                "outcome": "failed",
            },
            "ls": {"print": ["source.shop.faker.users", "source.shop.faker.orders"]},
        },
    )
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "prod", fake.env(ELT_TEST_MARK="this dbt's"))
    with caplog.at_level(logging.INFO, logger="tests.dbt"):
        run = dbt_runner.run_dbt(dbt, ["build", "--select", "a"], log=logging.getLogger("tests.dbt"))
    assert [record.getMessage() for record in caplog.records] == [
        "Running dbt build --select a",
        "Running with dbt=1.11.2",
        "1 of 1 ERROR creating sql table model main.a",
    ]
    assert (run.return_code, run.results) == (1, [NodeResult("model.shop.a", "error", 0.0, "boom", None)])
    with pytest.raises(DbtBuildFailed, match=r"^dbt build failed on 1 node\(s\): model\.shop\.a \(error: boom\)$"):
        dbt_runner.raise_if_failed(run)
    listed = dbt.run_captured("ls", "--quiet")
    assert (listed.args, listed.returncode, listed.stdout, listed.stderr) == (
        ["dbt", "ls", "--quiet"],
        0,
        "source.shop.faker.users\nsource.shop.faker.orders\n",
        "",
    )
    assert fake.seen() == [
        ("runner", ["parse", "--quiet", "--no-write-json", *_common(dbt)], False),
        ("runner", ["build", "--select", "a", *_common(dbt)], True),
        ("runner", ["ls", "--quiet", *_common(dbt)], True),
    ]
    calls = fake.calls()
    assert {call["pid"] for call in calls} != {os.getpid()} and len({call["pid"] for call in calls}) == 1
    assert all(call["cwd"] == str(project.path) and call["env"] == dbt.env for call in calls)
    assert _ended(dbt) == 0


def test_a_project_is_parsed_once_per_dbt_process_and_again_after_deps_or_a_new_process(tmp_path: Path, bounded: None) -> None:
    """`parse()` parses unless the process's parse is in target/: after `parse`, or a command that
    writes its manifest there and got as far as running nodes (exit code 0 or 1, not 2). `deps`
    (new packages change the project) and a new process forget it. The seconds spent parsing add up."""
    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(tmp_path, {"parse": {"seconds": 0.05}, "build": {"outcome": "error"}, "run": {"outcome": "failed"}})
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
    dbt.parse()
    assert fake.seen() == [("runner", ["parse", "--quiet", *_common(dbt)], False)]
    assert dbt.parsed and dbt.parse_seconds >= 0.05
    parsed_in = dbt.parse_seconds
    dbt.parse()
    dbt_runner.run_dbt(dbt, ["build"])  # could not run (2): the parse stays the process's
    dbt_runner.run_dbt(dbt, ["ls"])
    assert fake.seen()[1:] == [("runner", ["build", *_common(dbt)], True), ("runner", ["ls", *_common(dbt)], True)]
    assert dbt.parsed and dbt.parse_seconds == parsed_in  # both ran on the parse the process has
    dbt_runner.run_dbt(dbt, ["deps"])
    assert fake.seen()[3] == ("runner", ["deps", *_common(dbt)], False) and not dbt.parsed
    dbt.parse()
    assert len(fake.seen()) == 5 and dbt.parse_seconds >= parsed_in + 0.05
    assert _ended(dbt) == 0
    dbt.parse()  # a new process: parsed again
    assert [arguments[0] for _, arguments, _ in fake.seen()] == ["parse", "build", "ls", "deps", "parse", "parse"]
    assert len({call["pid"] for call in fake.calls()}) == 2
    assert _ended(dbt) == 0

    fresh = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
    dbt_runner.run_dbt(fresh, ["build"])  # could not run: it wrote no manifest of its own
    assert not fresh.parsed
    dbt_runner.run_dbt(fresh, ["run", "--target-path", str(tmp_path / "elsewhere")])  # its manifest went elsewhere
    assert not fresh.parsed
    dbt_runner.run_dbt(fresh, ["run"])  # nodes failed (1): it parsed, and wrote the manifest
    assert fresh.parsed
    fake.script({"build": {"outcome": "success"}})
    other = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
    dbt_runner.run_dbt(other, ["build"])
    assert other.parsed
    assert _ended(fresh) == 0 and _ended(other) == 0


def test_a_parse_that_fails_says_why_in_one_line(tmp_path: Path, bounded: None) -> None:
    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(
        tmp_path,
        {"parse": {"print": ["12:00:01  Encountered an error:", "12:00:01  Parsing Error: bad yaml"], "outcome": "error"}},
    )
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
    with pytest.raises(DbtInvocationError) as raised:
        dbt.parse()
    assert str(raised.value) == f"dbt parse in {project.path} could not run: Parsing Error: bad yaml"
    assert not dbt.parsed
    fake.script({"parse": {"print": ["12:00:01  Running with dbt=1.11.2"], "signal": 9}})
    with pytest.raises(DbtInvocationError) as raised:
        dbt.parse()
    assert str(raised.value) == f"dbt parse in {project.path} could not run: the dbt process was killed (signal 9)"
    assert not dbt.parsed
    dbt.close()


def test_a_dbt_process_that_dies_mid_command_gives_its_exit_code_and_the_next_command_a_new_process(
    tmp_path: Path, bounded: None
) -> None:
    """What it printed on stderr before it died is part of the output (a crash's traceback)."""
    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(
        tmp_path,
        {
            "build": {
                "print": ["12:00:01  Running with dbt=1.11.2"],
                "stderr": ["Traceback (most recent call last):", "MemoryError"],
                "exit": 3,
            }
        },
    )
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
    dbt.parse()
    run = dbt_runner.run_dbt(dbt, ["build"])
    assert (run.return_code, run.output_tail) == (
        3,
        ["Running with dbt=1.11.2", "Traceback (most recent call last):", "MemoryError"],
    )
    with pytest.raises(DbtInvocationError, match=r"could not run: Running with dbt=1\.11\.2: MemoryError$"):
        dbt_runner.raise_if_failed(run)
    assert not dbt.parsed
    fake.script({"build": {"exit": 0}})  # exited without ending the command: dbt could not run it
    assert dbt_runner.run_dbt(dbt, ["build"]).return_code == 2
    fake.script({"build": {"signal": 9}})
    killed = dbt_runner.run_dbt(dbt, ["build"])
    with pytest.raises(DbtInvocationError, match=r"could not run: the dbt process was killed \(signal 9\)$"):
        dbt_runner.raise_if_failed(killed)
    fake.script({"build": {"print": ["12:00:09  Done."]}})
    assert dbt_runner.run_dbt(dbt, ["build"]).output_tail == ["Done."]
    dbt.parse()  # the last build's parse
    pids = [call["pid"] for call in fake.calls()]
    assert [arguments[0] for _, arguments, _ in fake.seen()] == ["parse", "build"] * 4  # each new process parses first
    assert len(set(pids)) == 4 and pids[-2] == pids[-1]  # one process per death, and the last one lives on
    assert _ended(dbt) == 0


def test_a_command_whose_output_is_not_read_to_the_end_ends_its_dbt_process(tmp_path: Path, bounded: None) -> None:
    """The rest of its output would be read as the next command's: the process is killed, the
    command is not taken for a success, and the next command runs in a new process."""
    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(tmp_path, {"build": {"print": ["12:00:01  one", "12:00:02  two", "12:00:03  three"]}})
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
    assert dbt_runner.run_dbt(dbt, ["ls"]).return_code == 0
    lines = dbt.invoke(["build"])
    assert next(lines) == "12:00:01  one\n"
    driver = dbt._driver
    assert driver is not None
    lines.close()
    assert dbt.last_return_code == 2
    fake.script({"build": {"print": ["12:00:04  four"]}})
    assert dbt_runner.run_dbt(dbt, ["build"]).output_tail == ["four"]
    assert driver.wait(timeout=RESPONSE_SECONDS) == -9
    assert len({call["pid"] for call in fake.calls()}) == 2
    assert _ended(dbt) == 0


def test_dbts_lines_come_as_dbt_prints_them_not_when_the_command_ends(tmp_path: Path, bounded: None) -> None:
    """The command prints a line, then waits (for a file this test makes once it has read the
    line). Without PYTHONUNBUFFERED, which this machine sets and a deployment may not."""
    project = _project_in(tmp_path)
    go = tmp_path / "go"
    fake = FakeDbtLibrary(
        tmp_path, {"build": {"print": ["12:00:01  1 of 1 START"], "wait_for": str(go), "print_after": ["12:00:02  Done."]}}
    )
    env = fake.env()
    env.pop("PYTHONUNBUFFERED", None)
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", env)
    lines = dbt.invoke(["build"])
    assert next(lines) == "12:00:01  1 of 1 START\n"
    go.touch()
    assert list(lines) == ["12:00:02  Done.\n"] and dbt.last_return_code == 0
    assert _ended(dbt) == 0


def test_a_dbt_command_with_a_timeout_runs_as_the_dbt_command_that_the_timeout_ends(tmp_path: Path, bounded: None) -> None:
    """`run_captured(..., timeout=)` runs the venv's `dbt` command (not the dbt process), in the
    project folder with the Dbt's environment; its output and stderr apart, its exit code."""
    import subprocess

    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(
        tmp_path, {"debug": {"print": ["12:00:01  Connection test: [ERROR]"], "stderr": ["a warning"], "outcome": "failed"}}
    )
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env(ELT_TEST_MARK="this dbt's"))
    completed = dbt.run_captured("debug", timeout=RESPONSE_SECONDS)
    assert (completed.returncode, completed.stdout, completed.stderr) == (
        1,
        "12:00:01  Connection test: [ERROR]\n",
        "a warning\n",
    )
    assert completed.args == dbt.command("debug")
    [call] = fake.calls()
    assert (call["via"], call["arguments"], call["cwd"], call["env"]) == (
        "cli",
        ["debug", *_common(dbt)],
        str(project.path),
        dbt.env,
    )
    fake.script({"debug": {"wait_for": str(tmp_path / "never"), "wait_seconds": 5}})
    with pytest.raises(subprocess.TimeoutExpired):
        dbt.run_captured("debug", timeout=0.5)
    assert dbt._driver is None  # no dbt process was started


def test_dbt_started_early_serves_the_first_dbt_of_its_thread_with_that_dbts_environment(tmp_path: Path, bounded: None) -> None:
    """The process starts warmed up, before the project is known; the command still gets its own
    Dbt's environment. A Dbt of another thread starts its own; one that died is not used."""
    import threading

    from elt.settings import load_settings

    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(tmp_path, {})
    with fake.in_environment():
        settings = load_settings()
        with dbt_runner.dbt_started_early(settings):
            elsewhere = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
            thread = threading.Thread(target=lambda: dbt_runner.run_dbt(elsewhere, ["ls"]))
            thread.start()
            thread.join(timeout=RESPONSE_SECONDS)
            dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env(ELT_TEST_MARK="this dbt's"))
            dbt_runner.run_dbt(dbt, ["build"])
    calls = fake.calls()
    assert [call["arguments"][0] for call in calls if call["pid"] == elsewhere._driver.pid] == ["parse", "ls"]  # type: ignore[union-attr]
    early = [call for call in calls if call["pid"] == dbt._driver.pid]  # type: ignore[union-attr]
    warm_up, parse, build = early
    assert warm_up["arguments"][:2] == ["parse", "--log-level"] and "elt-dbt-warm-up-" in warm_up["arguments"][-1]
    assert (parse["arguments"][0], build["arguments"][0], build["env"]) == ("parse", "build", dbt.env)
    assert len(calls) == 5 and _ended(dbt) == 0 and _ended(elsewhere) == 0

    with fake.in_environment(), dbt_runner.dbt_started_early(load_settings()):
        unused = dbt_runner._early_drivers[threading.get_ident()]
    # Ended with the block: its input closed (0), or its output did before it could say it is ready (1).
    assert unused.wait(timeout=RESPONSE_SECONDS) in (0, 1)

    with fake.in_environment(), dbt_runner.dbt_started_early(load_settings()):
        died = dbt_runner._early_drivers[threading.get_ident()]
        died.kill()
        died.wait(timeout=RESPONSE_SECONDS)
        dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
        assert dbt_runner.run_dbt(dbt, ["build"]).return_code == 0 and dbt._driver is not died
    assert _ended(dbt) == 0


def test_dbt_started_later_starts_one_process_when_the_block_says_and_none_if_it_never_does(
    tmp_path: Path, bounded: None
) -> None:
    """With ELT_DBT_START=after-syncs all-etl starts dbt's process when its embedded syncs end
    (`now=False`, then the `start` it yields): nothing runs before; `start` twice is one process, which the first Dbt
    takes; a block that never calls it starts none."""
    import threading

    from elt.settings import load_settings

    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(tmp_path, {})
    thread = threading.get_ident()
    with fake.in_environment(), dbt_runner.dbt_started_early(load_settings(), now=False) as start:
        assert thread not in dbt_runner._early_drivers
        start()
        early = dbt_runner._early_drivers[thread]
        start()
        assert dbt_runner._early_drivers[thread] is early
        dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", fake.env())
        dbt_runner.run_dbt(dbt, ["build"])
        start()  # after the Dbt took it: no second process
        assert dbt._driver is early and thread not in dbt_runner._early_drivers
    assert [call["arguments"][0] for call in fake.calls()] == ["parse", "parse", "build"]  # the warm-up, then the Dbt's
    assert _ended(dbt) == 0

    with fake.in_environment(), dbt_runner.dbt_started_early(load_settings(), now=False):
        assert thread not in dbt_runner._early_drivers
    assert thread not in dbt_runner._early_drivers and len(fake.calls()) == 3


def test_the_project_is_the_folder_the_settings_name_in_the_repos_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from elt.git_repo import RepoSource
    from elt.settings import load_settings

    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["git", "init", "-q", str(home)], check=True)
    monkeypatch.setenv("ELT_HOME", str(home))
    settings = load_settings()
    assert dbt_runner.project_folder(settings) == home.resolve() / "dbt"  # ELT_GIT_REPO unset: the checkout holding ELT_HOME
    assert dbt_runner.project_folder(settings, project_dir="transform") == home.resolve() / "transform"
    source = RepoSource("git@example.com:shop/analytics.git", tmp_path / "checkout", "main")
    assert dbt_runner.project_folder(settings, source) == tmp_path / "checkout" / "dbt"
    monkeypatch.setenv("ELT_DBT_PROJECT_DIR", "analytics/dbt")
    assert dbt_runner.project_folder(load_settings(), source) == tmp_path / "checkout" / "analytics" / "dbt"


def test_dbt_for_gives_the_settings_profile_target_and_environment_and_ends_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bounded: None
) -> None:
    import yaml

    from elt.settings import load_settings

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(tmp_path, {})
    with fake.in_environment():
        settings = load_settings()
        with dbt_runner.dbt_for(settings, project) as dbt:
            assert dbt_runner.run_dbt(dbt, ["build"]).return_code == 0
            profile = yaml.safe_load((dbt.profiles_dir / "profiles.yml").read_text())
            driver = dbt._driver
        environment = dbt_runner.dbt_environment(settings)
    assert list(profile) == ["shop"] and dbt.target == settings.effective_dbt_target == "duckdb"
    assert [call["env"] for call in fake.calls()] == [environment, environment]  # the parse first, then the build
    assert driver is not None and driver.wait(timeout=RESPONSE_SECONDS) == 0 and not dbt.profiles_dir.exists()


def test_dbt_found_on_the_path_runs_on_the_python_beside_it_or_else_on_elts_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bounded: None
) -> None:
    """Where elt's Python has no dbt beside it (a system Python, dbt installed elsewhere), the dbt
    command is the one on PATH, and the dbt process runs on the Python beside that dbt, or on
    elt's own Python when there is none (the driver needs only the standard library). Without a
    dbt anywhere, the message says how to install it."""
    import sys

    from elt.errors import ConfigurationError

    venv_bin = Path(sys.executable).parent
    own = tmp_path / "elts-python"
    own.mkdir()
    (own / "python").symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(own / "python"))
    project = _project_in(tmp_path)
    fake = FakeDbtLibrary(tmp_path, {})
    elt_folder = str(Path(dbt_runner.__file__).resolve().parents[1])  # the driver's `elt`, whichever Python runs it
    env = fake.env(PYTHONPATH=os.pathsep.join([fake.variables()["PYTHONPATH"], elt_folder]))

    monkeypatch.setenv("PATH", str(venv_bin))
    assert dbt_runner.dbt_executable() == str(venv_bin / "dbt")
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", env)
    assert dbt_runner.run_dbt(dbt, ["ls"]).return_code == 0
    assert _ended(dbt) == 0

    dbt_alone = tmp_path / "dbt-alone"
    dbt_alone.mkdir()
    (dbt_alone / "dbt").write_text("#!/bin/sh\nexit 2\n")
    (dbt_alone / "dbt").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "nothing-here"), str(dbt_alone)]))
    assert dbt_runner.dbt_executable() == str(dbt_alone / "dbt")
    dbt = dbt_runner.Dbt(project, tmp_path / "profiles", "duckdb", env)
    assert dbt_runner.run_dbt(dbt, ["ls"]).return_code == 0
    assert _ended(dbt) == 0
    assert [call["executable"] for call in fake.calls()] == [str(venv_bin / "python")] * 2 + [str(own / "python")] * 2

    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigurationError) as raised:
        dbt_runner.dbt_executable()
    assert str(raised.value) == "the dbt command was not found; install the project with `make venv`"


def test_a_dbt_process_that_will_not_exit_does_not_hold_up_the_exit_of_elts_process() -> None:
    """The wait for it (up to DBT_EXIT_SECONDS) runs in a daemon thread: a Python that ended a
    dbt process (a `sleep` here, which does not exit when its input closes) exits at once."""
    import signal
    import subprocess
    import sys

    code = (
        "import subprocess\n"
        "from elt import dbt_runner\n"
        "dbt_runner.DBT_EXIT_SECONDS = 600\n"
        "driver = subprocess.Popen(['sleep', '900'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
        "print(driver.pid, flush=True)\n"
        "dbt_runner._end_driver(driver)\n"
    )
    python = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert python.stdout is not None
    sleeper = int(python.stdout.readline())
    try:
        assert python.wait(timeout=RESPONSE_SECONDS) == 0
    finally:
        python.kill()
        python.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(sleeper, signal.SIGKILL)  # orphaned: whoever adopted it reaps it


def test_times_are_shown_in_utc_on_a_machine_set_to_another_zone() -> None:
    """dbt writes max_loaded_at in UTC, naive or with an offset; a machine whose zone is not UTC
    (here 9 hours east) shows it in UTC all the same."""
    import time

    saved = os.environ.get("TZ")
    os.environ["TZ"] = "JST-9"
    time.tzset()
    try:
        assert dbt_runner.utc_minute("2026-11-28T10:00:00") == "2026-11-28 10:00 UTC"
        assert dbt_runner.utc_minute("2026-11-28T12:30:00+02:00") == "2026-11-28 10:30 UTC"
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_a_source_left_out_whose_name_holds_a_dot_is_not_checked_for_freshness(tmp_path: Path) -> None:
    """The selectors of downstream_of_connections, as `--exclude`, and the sources it leaves out
    of the check known by them (not reported as sources dbt could not check)."""
    gated = {"config": {"freshness": {"error_after": {"count": 48}}}}
    manifest = {
        "sources": {
            "source.shop.faker.users.v2": {"source_name": "faker", "name": "users.v2", **gated},
            "source.shop.faker.users": {"source_name": "faker", "name": "users", **gated},
        }
    }
    project = _project(tmp_path, FRESHNESS_YAML)
    dbt = ScriptedDbt(project, ["12:00:01  Done."], files={"sources.json": {"results": []}, "manifest.json": manifest})
    left_out = [dbt_runner.source_selector("faker", "users.v2")]
    checked = dbt_runner.check_freshness(dbt, left_out)  # type: ignore[arg-type]
    assert dbt.asked == [["source", "freshness", "--exclude", "source:faker.users?v2+"]]
    assert [source.unique_id for source in checked] == ["source.shop.faker.users"]


def test_a_blocking_source_is_left_out_by_a_selector_of_its_own_table_whatever_dots_its_names_hold(tmp_path: Path) -> None:
    """Its table's name comes from the manifest: the unique id `source.shop.mobile.app.hits.v2`
    alone could be source `mobile.app`'s `hits.v2` or source `mobile`'s `app.hits.v2`. Without
    the manifest's name, the source's name is taken to hold no dot."""
    gated = {"config": {"freshness": {"error_after": {"count": 48}}}}
    manifest = {
        "sources": {
            "source.shop.mobile.app.hits.v2": {"source_name": "mobile.app", "name": "hits.v2", **gated},
            "source.shop.mobile.web.hits": {"source_name": "mobile.web", "name": "hits", **gated},
        }
    }
    stale = {"unique_id": "source.shop.mobile.app.hits.v2", "status": "error", "max_loaded_at": "2026-11-28T10:00:00"}
    project = _project(tmp_path, FRESHNESS_YAML)
    files = {"sources.json": {"results": [stale]}, "manifest.json": manifest}
    checked = dbt_runner.check_freshness(ScriptedDbt(project, ["12:00:01  Done."], files=files))  # type: ignore[arg-type]
    assert [(source.unique_id, source.status, source.selector) for source in checked] == [
        ("source.shop.mobile.app.hits.v2", "error", "source:mobile?app.hits?v2+"),
        ("source.shop.mobile.web.hits", "runtime error", "source:mobile?web.hits+"),  # no result: not checkable
    ]
    assert dbt_runner.SourceFreshness("source.shop.faker.users.v2", "error").selector == "source:faker.users?v2+"
    assert dbt_runner.SourceFreshness("source.shop.faker.users", "error").selector == "source:faker.users+"
