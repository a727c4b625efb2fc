"""Transform: dbt run in a dbt process of its own, its per-node results read back as data.

Why a process of its own and not prefect-dbt's `PrefectDbtRunner`: on a 500-model project the
runner took 5.5× the wall time and 3× the memory of plain `dbt build` (a Prefect task per
node), dbt-core is not safe to invoke twice at once in one process, and dbt-duckdb resolves seed
paths from the working directory. One dbt process per transform stage (src/elt/dbt_driver.py)
runs the stage's commands one after the other in the project folder: dbt's import and the
project's parse are paid once, not per command, and nothing per node. dbt's text log is
forwarded line by line; each node's result is read from `target/run_results.json` once dbt ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from elt import processes
from elt.errors import ConfigurationError, TerminalError
from elt.settings import Settings
from elt.warehouse import warehouse_for

if TYPE_CHECKING:
    from elt.dbt_state import Plan
    from elt.git_repo import RepoSource

logger = logging.getLogger(__name__)

FAILED_STATUSES = frozenset({"error", "fail", "runtime error"})
_TIMESTAMP = re.compile(r"^(\x1b\[0m)?\d\d:\d\d:\d\d\s+")
_START_LINE = re.compile(r"^\d+ of \d+ START ")
# The first line of an event dbt's text log reports as an error. The log has no level field:
# an event is a timestamped line plus the untimestamped lines after it (its multi-line message).
_ERROR_EVENT = re.compile(
    r"^(Encountered an error|\d+ of \d+ (ERROR|FAIL)\b|(\w+ )?(Error|Failure) in \w+ |Completed with [1-9]\d* errors?"
    r"|.*\[ERROR\]|Could not connect|(Runtime|Database|Compilation|Parsing|Dependency) Error\b)"
)
_FAILED_CHECKS = re.compile(r"^\d+ checks? failed")
_WARNING_EVENT = re.compile(r"^(\[WARNING\]|\d+ of \d+ WARN\b|Warning in \w+ )")


class DbtError(TerminalError):
    pass


class DbtInvocationError(DbtError):
    """dbt could not run at all (bad project, profile or arguments)."""


class DbtBuildFailed(DbtError):
    def __init__(self, command: str, failed: list[NodeResult], stale: list[str] | None = None) -> None:
        self.failed = failed
        names = "; ".join(f"{node.unique_id} ({node.status}: {node.short_message})" for node in failed)
        also = "".join(f"; {line}" for line in stale or [])
        super().__init__(f"dbt {command} failed on {len(failed)} node(s): {names}{also}")


class DbtSourcesStale(DbtError):
    """Sources older than their error_after (or not checkable): what they feed was left out."""

    def __init__(self, stale: list[SourceFreshness]) -> None:
        self.stale = stale
        super().__init__("; ".join(source.line for source in stale))


@dataclass(frozen=True)
class NodeResult:
    unique_id: str
    status: str
    seconds: float
    message: str | None
    rows_affected: int | None
    relation_name: str | None = None  # as dbt quotes it in SQL, e.g. "warehouse"."main_marts"."orders"
    materialized: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES

    @property
    def short_message(self) -> str:
        """The line of dbt's message that says what went wrong, without its "Runtime Error in model x" header."""
        lines = [line.strip() for line in (self.message or "").splitlines() if line.strip()]
        if not lines:
            return "no message"
        specific = [line for line in lines if not re.match(r"^\w+ Error in \w+ ", line)]
        return (specific or lines)[0][:300]


@dataclass
class DbtRun:
    command: str
    project_dir: Path
    return_code: int
    results: list[NodeResult] = field(default_factory=list)
    output_tail: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    cost: str | None = None  # what the warehouse charged for the run, or why that is unknown; None where free
    freshness: list[SourceFreshness] = field(default_factory=list)  # `dbt source freshness` before the build
    plan: Plan | None = None  # what an --only-changed build ran and skipped, and why (src/elt/dbt_state.py)

    @property
    def failed_nodes(self) -> list[NodeResult]:
        return [node for node in self.results if node.failed]


@dataclass(frozen=True)
class SourceFreshness:
    """One source table's freshness, as `dbt source freshness` wrote it to target/sources.json."""

    unique_id: str  # source.<project>.<source>.<table>
    status: str  # pass, warn, error or runtime error
    max_loaded_at: str | None = None  # ISO 8601, as dbt writes it
    criteria: dict[str, Any] = field(default_factory=dict)  # {"warn_after": {"count": 24, "period": "hour"}, ...}
    error: str | None = None  # why dbt could not check it (runtime error)
    table: str | None = None  # its name, from the manifest: `source.p.a.b.c` alone is a.b's c or a's b.c

    @property
    def source(self) -> str:
        """`<source>.<table>`, as the project's YAML names it."""
        return self.unique_id.split(".", 2)[2]

    @property
    def selector(self) -> str:
        """This table and what it feeds, as dbt selects them (`source_selector`); without its
        name from the manifest, the source's name is taken to hold no dot."""
        table = self.table or self.source.split(".", 1)[-1]
        return source_selector(self.source.removesuffix(f".{table}"), table)

    @property
    def blocks(self) -> bool:
        """Older than error_after, or not checkable: what it feeds is left out of the build."""
        return self.status in ("error", "runtime error")

    @property
    def line(self) -> str:
        """What a user reads, e.g. `source faker.users is stale: last loaded 2026-11-28 10:00 UTC, error_after 48 hours`."""
        if self.status == "runtime error":
            return f"source {self.source} freshness could not be checked: {self.error or 'dbt gave no reason'}"
        loaded = f"last loaded {utc_minute(self.max_loaded_at)}"
        if self.status not in ("warn", "error"):
            return f"source {self.source} is fresh: {loaded}"
        threshold = f"{self.status}_after"
        after = self.criteria.get(threshold) or {}
        count, period = after.get("count"), after.get("period")
        return f"source {self.source} is stale: {loaded}, {threshold} {count} {period}{'' if count == 1 else 's'}"


def utc_minute(timestamp: str | None) -> str:
    if not timestamp:
        return "never"
    moment = datetime.fromisoformat(timestamp)
    if moment.year == 1:  # dbt's datetime.min: the table has no rows
        return "never"
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def project_folder(settings: Settings, source: RepoSource | None = None, project_dir: str | None = None) -> Path:
    """Where the dbt project lives: ELT_DBT_PROJECT_DIR (or --project-dir) in the checkout of the repo."""
    from elt.git_repo import RepoSource

    checkout = (source or RepoSource.from_settings(settings)).checkout
    return checkout / (project_dir or settings.dbt_project_dir)


@dataclass(frozen=True)
class DbtProject:
    path: Path

    @classmethod
    def at(cls, path: Path) -> DbtProject:
        path = path.resolve()
        if not (path / "dbt_project.yml").is_file():
            raise ConfigurationError(
                f"{path}: no dbt_project.yml; set ELT_DBT_PROJECT_DIR (or --project-dir) to the dbt project's folder in the repo"
            )
        return cls(path)

    @property
    def profile_name(self) -> str:
        document = yaml.safe_load((self.path / "dbt_project.yml").read_text()) or {}
        profile = document.get("profile")
        if not profile:
            raise ConfigurationError(f"{self.path / 'dbt_project.yml'}: no 'profile' key")
        return str(profile)

    @property
    def has_packages(self) -> bool:
        return any((self.path / name).is_file() for name in ("packages.yml", "dependencies.yml"))

    @property
    def run_results_path(self) -> Path:
        return self.path / "target" / "run_results.json"


def render_profile(settings: Settings, profile_name: str) -> str:
    """profiles.yml for the project's profile name: the warehouse's output under the target's name
    (ELT_DBT_TARGET, or the warehouse's); secrets stay env_var() references."""
    target = settings.effective_dbt_target
    profile = {profile_name: {"target": target, "outputs": {target: warehouse_for(settings).dbt_output()}}}
    return yaml.safe_dump(profile, sort_keys=False)


@contextmanager
def profiles_dir(settings: Settings, project: DbtProject) -> Iterator[Path]:
    """The folder dbt reads profiles.yml from: the project's own (ELT_DBT_USE_PROJECT_PROFILES),
    or a temporary one holding the profile rendered from settings."""
    if settings.dbt_use_project_profiles:
        if not (project.path / "profiles.yml").is_file():
            raise ConfigurationError(f"{project.path}: ELT_DBT_USE_PROJECT_PROFILES is set but the project has no profiles.yml")
        yield project.path
        return
    _remove_profiles_of_dead_processes()
    with tempfile.TemporaryDirectory(prefix=f"{_PROFILES_PREFIX}{os.getpid()}-") as rendered:
        processes.remove_if_run_dies(Path(rendered))
        (Path(rendered) / "profiles.yml").write_text(render_profile(settings, project.profile_name))
        yield Path(rendered)


_PROFILES_PREFIX = "elt-profiles-"


def _remove_profiles_of_dead_processes() -> None:
    """Profiles folders whose process died with its watchdog (a whole process group killed)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_PROFILES_PREFIX}*-*"):
        pid = folder.name[len(_PROFILES_PREFIX) :].split("-")[0]
        if pid.isdigit() and processes.supported() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


# dbt commands that run without the parsed project (`parse` makes it).
_WITHOUT_MANIFEST = frozenset({"deps", "debug", "clean", "init", "parse"})
# Commands that write the manifest they ran on to target/ (`ls`, `show`, `run-operation` don't).
_WRITE_MANIFEST = frozenset({"parse", "build", "run", "test", "seed", "snapshot", "compile", "source"})


@dataclass
class Dbt:
    """How every dbt command of the appliance runs: in the project folder, with the profiles
    folder, the target and the environment of `dbt_for`.

    The commands run one at a time in one dbt process (src/elt/dbt_driver.py), started by the
    first (or by `dbt_started_early`) and ended by `close()` (`dbt_for` calls it): dbt's start-up
    and the project's parse are paid once per transform stage, not once per command. Use a Dbt
    from one thread.
    """

    project: DbtProject
    profiles_dir: Path
    target: str
    env: dict[str, str]
    last_return_code: int = field(default=0, init=False, compare=False)
    # Seconds dbt's process spent parsing the project before this object's commands (the parse they share).
    parse_seconds: float = field(default=0.0, init=False, compare=False)
    parsed: bool = field(default=False, init=False, compare=False)  # target/manifest.json is this process's parse
    _driver: subprocess.Popen[str] | None = field(default=None, init=False, repr=False, compare=False)

    def command(self, *arguments: str) -> list[str]:
        """The command line of `dbt <arguments>` for this project, profile and target."""
        return [dbt_executable(), *arguments, *self._common()]

    def _common(self) -> list[str]:
        return ["--project-dir", str(self.project.path), "--profiles-dir", str(self.profiles_dir), "--target", self.target]

    def run_captured(self, *arguments: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run `dbt <arguments>` to its end, its output captured (for commands whose output is data).
        With a timeout, in a dbt process of its own that the timeout can end."""
        if timeout is not None:
            return subprocess.run(
                self.command(*arguments), cwd=self.project.path, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        lines = list(self.invoke(list(arguments)))
        return subprocess.CompletedProcess(["dbt", *arguments], self.last_return_code, "".join(lines), "")

    def invoke(self, arguments: list[str]) -> Iterator[str]:
        """Run `dbt <arguments>` in this project's dbt process, yielding its output lines as dbt
        prints them; `last_return_code` is dbt's exit code once the lines end (negative: the dbt
        process was killed by that signal)."""
        from elt.dbt_driver import END_MARKER, READY_MARKER

        driver = self._running_driver()
        assert driver.stdin is not None and driver.stdout is not None
        uses_manifest = arguments[0] not in _WITHOUT_MANIFEST
        request = {
            "arguments": [*arguments, *self._common()],
            "common": [*self._common(), *_parse_options(arguments)],  # the parse that comes first takes them too
            "cwd": str(self.project.path),
            "env": self.env,  # the process may have started with an older one (dbt_started_early)
            "manifest": uses_manifest,
        }
        self.last_return_code = 2
        try:
            driver.stdin.write(json.dumps(request) + "\n")
            driver.stdin.flush()
        except BrokenPipeError:
            pass  # it died: its output says why, and its exit code is the command's
        ended = False
        try:
            for line in driver.stdout:
                if line.startswith(END_MARKER):
                    ended = True
                    ended_with = json.loads(line[len(END_MARKER) :])
                    self.last_return_code = ended_with["return_code"]
                    self.parse_seconds += ended_with.get("parse_seconds", 0.0)
                    if arguments[0] == "deps":
                        self.parsed = False
                    elif _writes_manifest(arguments):
                        self.parsed = self.parsed or self.last_return_code in (0, 1)
                    return
                if not line.startswith(READY_MARKER):
                    yield line
            ended = True
            self.last_return_code = driver.wait() or 2
            self._driver, self.parsed = None, False
        finally:
            if not ended:  # the caller stopped reading: the rest of this command's output would be the next one's
                driver.kill()
                self.close()

    def _running_driver(self) -> subprocess.Popen[str]:
        if self._driver is None or self._driver.poll() is not None:
            early = _early_drivers.pop(threading.get_ident(), None)
            if early is not None and early.poll() is None:
                self._driver = early
            else:
                self._driver = _start_driver(self.env)
        return self._driver

    def parse(self) -> None:
        """Parse the project (target/manifest.json) unless this process already has."""
        if not self.parsed:
            completed = self.run_captured("parse", "--quiet")
            if completed.returncode != 0:
                cause = failure_cause(completed.stdout.splitlines(), completed.returncode)
                raise DbtInvocationError(f"dbt parse in {self.project.path} could not run: {cause}")

    def close(self) -> None:
        """End the dbt process."""
        driver, self._driver, self.parsed = self._driver, None, False
        if driver is not None:
            _end_driver(driver)


def _writes_manifest(arguments: list[str]) -> bool:
    """Whether `dbt <arguments>` leaves the manifest it ran on in the project's target/."""
    elsewhere = any(argument.split("=", 1)[0] in ("--target-path", "--no-write-json") for argument in arguments)
    return arguments[0] in _WRITE_MANIFEST and not elsewhere


# Options of a command that its implicit parse must get too: where it writes, and what it renders.
_PARSE_OPTIONS = ("--target-path", "--log-path", "--vars")


def _parse_options(arguments: list[str]) -> list[str]:
    """`dbt docs generate --target-path X` parses into X, not into the project's target/
    (the dbt-docs service's project folder is read-only).

    >>> _parse_options(["docs", "generate", "--target-path", "/t", "--log-path=/l", "--select", "a"])
    ['--target-path', '/t', '--log-path=/l']
    """
    kept = []
    for position, argument in enumerate(arguments):
        if argument in _PARSE_OPTIONS and position + 1 < len(arguments):
            kept += [argument, arguments[position + 1]]
        elif argument.split("=", 1)[0] in _PARSE_OPTIONS and "=" in argument:
            kept.append(argument)
    return kept


# Per thread: a dbt process started before its project is known.
_early_drivers: dict[int, subprocess.Popen[str]] = {}


@contextmanager
def dbt_started_early(settings: Settings, *, now: bool = True) -> Iterator[Callable[[], None]]:
    """A dbt process for the first `Dbt` of this thread to use (each command brings its own
    environment), started before that `Dbt` needs it: dbt's import (seconds:
    bench/p3_embedded_all_etl.py) then overlaps what runs before the transform instead of
    following it. Started on entering the block, or with `now=False` when the block calls the
    `start` it yields (once: later calls do nothing). Ended with the block if nothing used it."""
    thread = threading.get_ident()
    started = False

    def start() -> None:
        nonlocal started
        if not started:
            started = True
            _early_drivers[thread] = _start_driver(dbt_environment(settings), warm_up=True)

    if now:
        start()
    try:
        yield start
    finally:
        unused = _early_drivers.pop(thread, None)
        if unused is not None:
            _end_driver(unused)


def _start_driver(env: dict[str, str], *, warm_up: bool = False) -> subprocess.Popen[str]:
    python = Path(dbt_executable()).with_name("python")
    return subprocess.Popen(
        [str(python) if python.exists() else sys.executable, "-u", "-m", "elt.dbt_driver", *(["--warm-up"] if warm_up else [])],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        # No preexec_fn: it forks this multi-threaded process and runs Python before exec, which
        # can deadlock. The process ends when its input closes (this process gone included), and
        # the run's guard stops it with the run's other children.
    )


DBT_EXIT_SECONDS = 60.0  # how long an ended dbt process may take to exit before it is killed


def _end_driver(driver: subprocess.Popen[str]) -> None:
    """A dbt process exits when its input closes. It has finished its last command and closed the
    warehouse by then; its exit (Python's shutdown with dbt loaded: ~0.5 s here) is awaited in the
    background, not by the stage, and it is killed if it has not exited within DBT_EXIT_SECONDS."""
    for stream in (driver.stdin, driver.stdout):
        if stream is not None:
            stream.close()
    threading.Thread(target=_reap, args=(driver,), name=f"end-dbt-process-{driver.pid}", daemon=True).start()


def _reap(driver: subprocess.Popen[str]) -> None:
    try:
        driver.wait(timeout=DBT_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()


@contextmanager
def dbt_for(settings: Settings, project: DbtProject) -> Iterator[Dbt]:
    """The one way to run dbt: the profiles folder (rendered from the settings, or the project's
    own), the target and the environment, for as long as the block runs.

        with dbt_for(settings, DbtProject.at(folder)) as dbt:
            raise_if_failed(run_dbt(dbt, ["build"]))
    """
    with profiles_dir(settings, project) as folder:
        dbt = Dbt(project, folder, settings.effective_dbt_target, dbt_environment(settings))
        try:
            yield dbt
        finally:
            dbt.close()


def dbt_environment(settings: Settings) -> dict[str, str]:
    env = {
        **os.environ,
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_USE_COLORS": "false",
        "DBT_PRINTER_WIDTH": "120",
    }
    return env | warehouse_for(settings).dbt_environment()


def dbt_executable() -> str:
    beside_python = Path(sys.executable).parent / "dbt"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("dbt")
    if not found:
        raise ConfigurationError("the dbt command was not found; install the project with `make venv`")
    return found


def run_dbt(dbt: Dbt, arguments: list[str], *, log: logging.Logger | logging.LoggerAdapter = logger) -> DbtRun:
    """Run one dbt command in the project folder, log its output, and return every node's result.

    dbt's text log is forwarded as it comes; `--log-format json` would give structured events
    but made a 500-model build 45% slower here (bench/p1_transform_overhead.py), so per-node
    results are read from target/run_results.json once dbt ends.
    """
    project = dbt.project
    log.info("Running dbt %s", " ".join(arguments))
    tail: deque[str] = deque(maxlen=40)
    levels = DbtLogLevels()
    started = time.time()
    for line in dbt.invoke(arguments):
        level = levels.of(line)
        message = _TIMESTAMP.sub("", line).rstrip()  # a blank event is a timestamp and spaces: stripped first, it would stay
        if not message.strip():
            continue
        tail.append(message)
        if not _START_LINE.match(message):
            log.log(level, "%s", message)
    return_code = dbt.last_return_code
    run = DbtRun(arguments[0], project.path, return_code, output_tail=list(tail), error_lines=levels.error_lines)
    run.results = _read_run_results(project, written_after=started)
    return run


def list_sources(dbt: Dbt) -> list[dict]:
    """Every source table of the project: unique_id, database, schema, name and meta."""
    completed = dbt.run_captured(
        "ls",
        "--resource-type",
        "source",
        "--output",
        "json",
        "--output-keys",
        "unique_id database schema name meta config",
        "--quiet",
    )
    if completed.returncode != 0:
        raise DbtInvocationError(
            f"dbt ls in {dbt.project.path} could not list sources: {failure_cause(completed.stdout.splitlines(), completed.returncode)}"
        )
    sources = []
    for line in completed.stdout.splitlines():
        source = _parse(line.strip())
        if source and "unique_id" in source:
            source["meta"] = {**(source.get("config") or {}).get("meta", {}), **(source.get("meta") or {})}
            sources.append(source)
    return sources


def downstream_of_connections(dbt: Dbt, connections: list[str]) -> list[str]:
    """Selectors for every source fed by these Airbyte connections and all that depends on them.

    A source names its connection in `config: {meta: {airbyte_connection: <name>}}` (a name or a list).
    """
    selectors = []
    for source in list_sources(dbt):
        fed_by = source["meta"].get("airbyte_connection")
        fed_by = [fed_by] if isinstance(fed_by, str) else list(fed_by or [])
        if set(fed_by) & set(connections):
            table = str(source["name"])  # `source.<package>.<source>.<table>`: either name may hold a dot
            source_name = source["unique_id"].split(".", 2)[2].removesuffix(f".{table}")
            selectors.append(source_selector(source_name, table))
    return selectors


_NOT_LITERAL = re.compile(r"([*?\[])")  # fnmatch's wildcards


def source_selector(source_name: str, table: str) -> str:
    """`source:<source>.<table>+`: a source table and all that depends on it, in dbt's syntax.

    dbt splits a source selector at every dot (one part a source, two a source and a table,
    three a package, a source and a table) and matches each part with fnmatch, and reads a
    space as a union and a comma as an intersection. So a name holding a dot (`users.v2`) would
    be read as more parts and select nothing: each dot, space or comma is `?` there (any one
    character), and fnmatch's wildcards in a name match only themselves. The cost of `?`:
    another table of the same source whose name differs from this one only at that character
    (`users_v2` beside `users.v2`) is selected with it, so left out with it, never built by
    mistake.

    >>> source_selector("faker", "users.v2")
    'source:faker.users?v2+'
    >>> source_selector("web", "hits[1]*")
    'source:web.hits[[]1][*]+'
    """
    return f"source:{_as_one_part(source_name)}.{_as_one_part(table)}+"


def _as_one_part(name: str) -> str:
    return re.sub(r"[.,\s]", "?", _NOT_LITERAL.sub(r"[\1]", name))


def check_freshness(
    dbt: Dbt, left_out: list[str] | None = None, *, log: logging.Logger | logging.LoggerAdapter = logger
) -> list[SourceFreshness]:
    """`dbt source freshness` on every source with a freshness block, but those in `left_out`
    (selectors of sources a failed sync feeds); each checked source's result.

    dbt itself checks only sources with a freshness block, so a project without any is never
    gated. dbt 1.11 leaves sources it could not check out of target/sources.json
    (https://github.com/dbt-labs/dbt-core/issues/12812, fix open in dbt-core#12836): a source
    dbt selected that has no result there is a runtime error, with the cause dbt logged.
    """
    if not declares_freshness(dbt.project):
        return []  # without a dbt invocation: a project's start-up and parse cost seconds
    arguments = ["source", "freshness"] + (["--exclude", " ".join(left_out)] if left_out else [])
    started = time.time()
    run = run_dbt(dbt, arguments, log=log)
    sources_path = dbt.project.path / "target" / "sources.json"
    if not sources_path.exists() or sources_path.stat().st_mtime < started:
        if run.return_code != 0:
            cause = _one_line(run.error_lines, run.output_tail, run.return_code)
            raise DbtInvocationError(f"dbt source freshness in {dbt.project.path} could not run: {cause}")
        return []  # no source has a freshness block: dbt had nothing to do
    manifest = dbt.project.path / "target" / "manifest.json"
    sources = json.loads(manifest.read_text()).get("sources", {}) if manifest.exists() else {}
    results = {}
    for result in json.loads(sources_path.read_text()).get("results", []):
        results[result["unique_id"]] = SourceFreshness(
            unique_id=result["unique_id"],
            status=str(result.get("status")),
            max_loaded_at=result.get("max_loaded_at"),
            criteria=result.get("criteria") or {},
            error=_first_line_of(result.get("error")),
            table=(sources.get(result["unique_id"]) or {}).get("name"),
        )
    for unique_id, table in _checked_sources(sources, left_out or []).items():
        if unique_id not in results:
            results[unique_id] = SourceFreshness(
                unique_id, "runtime error", error=_runtime_error_of(table, run.error_lines), table=table
            )
    return sorted(results.values(), key=lambda result: result.unique_id)


def declares_freshness(project: DbtProject) -> bool:
    """Whether any YAML file of the project or its packages mentions `freshness`: dbt reads a
    source's freshness block only from YAML (its properties, or `sources:` in dbt_project.yml)."""
    return any(
        "freshness" in path.read_text(errors="replace")
        for path in project.path.rglob("*")
        if path.suffix in (".yml", ".yaml")
        and path.is_file()
        and not {"target", "logs"} & set(path.relative_to(project.path).parts)
    )


def _checked_sources(sources: dict[str, dict], left_out: list[str]) -> dict[str, str]:
    """The sources `dbt source freshness` selected (a freshness block, not left out), from the
    manifest it wrote (its `sources`): unique_id → table name."""
    checked = {}
    for unique_id, source in sources.items():
        freshness = (source.get("config") or {}).get("freshness") or source.get("freshness") or {}
        gated = any((freshness.get(threshold) or {}).get("count") for threshold in ("warn_after", "error_after"))
        if gated and source_selector(str(source.get("source_name")), str(source.get("name"))) not in left_out:
            checked[unique_id] = str(source.get("name"))
    return checked


def _runtime_error_of(table: str, error_lines: list[str]) -> str:
    """The line after dbt's `Runtime Error in source <table> (...)` header in its log."""
    for index, line in enumerate(error_lines):
        if line.startswith(f"Runtime Error in source {table} ") and index + 1 < len(error_lines):
            return error_lines[index + 1][:300]
    return "dbt wrote no result for it (the transform's log says why)"


def _first_line_of(text: object) -> str | None:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[0][:300] if lines else None


def build_arguments(
    select: str | None = None, exclude: str | None = None, *, full_refresh: bool = False, stale: list[str] | None = None
) -> list[str]:
    """`dbt build`'s arguments for a run's selection; `stale` (selectors) is left out besides `exclude`.

    >>> build_arguments("marts", "legacy", full_refresh=True, stale=["source:faker.users+"])
    ['build', '--select', 'marts', '--exclude', 'legacy source:faker.users+', '--full-refresh']
    """
    excluded = ([exclude] if exclude else []) + (stale or [])
    arguments = ["build"]
    arguments += ["--select", select] if select else []
    arguments += ["--exclude", " ".join(excluded)] if excluded else []
    arguments += ["--full-refresh"] if full_refresh else []
    return arguments


class DbtLogLevels:
    """The logging level of each line of dbt's text log, and the lines of its error events.

    dbt's text log has no level field; `--log-format json` has one but is too slow
    (bench/p1_transform_overhead.py). An event is a timestamped line plus the untimestamped
    lines that follow it, so each line takes the level of its event's first line.
    """

    def __init__(self) -> None:
        self.error_lines: list[str] = []
        self._level = logging.INFO
        self._failed_checks = False  # `dbt debug`: every event after "N check(s) failed:" explains one

    def of(self, line: str) -> int:
        if _TIMESTAMP.match(line):
            message = _TIMESTAMP.sub("", line).strip()
            self._failed_checks = self._failed_checks or bool(_FAILED_CHECKS.match(message))
            if self._failed_checks or _ERROR_EVENT.match(message):
                self._level = logging.ERROR
            elif _WARNING_EVENT.match(message):
                self._level = logging.WARNING
            else:
                self._level = logging.INFO
        else:
            message = line.strip()
        if self._level == logging.ERROR and message:
            self.error_lines.append(message)
        return self._level


# Lines of an error event that only frame the cause: headers, advice, links, traceback frames.
_FRAMING = re.compile(
    r"^(>?Encountered an error:?|>?\w+ Error|\d+ checks? failed:?|Completed with .*|The database returned the following error:?"
    r"|Profile loading failed for the following reason:|Project loading failed for the following reason:"
    r"|Check your database credentials.*|https?://\S+|Traceback .*|File \".*|During handling .*|\^+|~+|return .*|raise .*|"
    r".*Connection test: \[ERROR\].*)$"
)


def failure_cause(lines: list[str], return_code: int | None = None) -> str:
    """What dbt said went wrong, on one line, from its raw text log (timestamps included)."""
    levels = DbtLogLevels()
    for line in lines:
        levels.of(line)
    return _one_line(levels.error_lines, [_TIMESTAMP.sub("", line) for line in lines], return_code)


def _one_line(error_lines: list[str], output: list[str], return_code: int | None) -> str:
    """dbt's error events without their framing, each line once; the output's last lines when
    dbt logged no error event (it crashed first)."""
    if return_code is not None and return_code < 0 and not _meaningful(error_lines):
        return f"the dbt process was killed (signal {-return_code})"  # what it printed last is not why
    cause = _meaningful(error_lines) or _meaningful(output[-4:])
    return ": ".join(cause[:3]) or f"exit code {return_code}"


def _meaningful(lines: list[str]) -> list[str]:
    kept: dict[str, None] = {}
    for line in lines:
        line = line.strip()
        if line and not _FRAMING.match(line):
            kept.setdefault(line[:300])
    return list(kept)


def _parse(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _read_run_results(project: DbtProject, written_after: float) -> list[NodeResult]:
    path = project.run_results_path
    if not path.exists() or path.stat().st_mtime < written_after:
        return []  # none, or left by an earlier run: this invocation stopped before writing its own
    document = json.loads(path.read_text())
    manifest_path = project.path / "target" / "manifest.json"
    nodes = json.loads(manifest_path.read_text()).get("nodes", {}) if manifest_path.exists() else {}
    results = []
    for result in document.get("results", []):
        adapter_response = result.get("adapter_response") or {}
        node = nodes.get(result["unique_id"]) or {}
        results.append(
            NodeResult(
                unique_id=result["unique_id"],
                status=str(result.get("status")),
                seconds=round(float(result.get("execution_time") or 0.0), 3),
                message=result.get("message"),
                rows_affected=adapter_response.get("rows_affected"),
                relation_name=result.get("relation_name") or node.get("relation_name"),
                materialized=(node.get("config") or {}).get("materialized"),
            )
        )
    return results


def raise_if_failed(run: DbtRun) -> DbtRun:
    """Raise if any node failed or dbt itself could not run; return the run otherwise."""
    if run.failed_nodes:
        raise DbtBuildFailed(run.command, run.failed_nodes, stale=[source.line for source in run.freshness if source.blocks])
    if run.return_code != 0:
        cause = _one_line(run.error_lines, run.output_tail, run.return_code)
        raise DbtInvocationError(f"dbt {run.command} in {run.project_dir} could not run: {cause}")
    stale = [source for source in run.freshness if source.blocks]
    if stale:
        raise DbtSourcesStale(stale)
    return run
