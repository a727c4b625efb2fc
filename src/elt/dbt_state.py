"""Build only what changed: dbt's state of the last build of each target, and the plan of the next.

After a `dbt build`, its manifest.json and run_results.json and the sources.json of the freshness
check before it are kept under `<data>/dbt-state/<target>/<commit>/`; `last-successful.json`
beside them names the one the next `--only-changed` run compares against with dbt's own
selectors (`--state <that folder>`):

- `state:modified+`: code or config changed since that build (new nodes included);
- `source_status:fresher+`: a source's max `loaded_at_field` grew since that build's check;
- `result:error+ result:fail+ result:skipped+`: what failed or was skipped in that build.

dbt's project folder (and its target/, partial_parse.msgpack included) is the checkout's, which
stays between runs, so an unchanged project is not re-parsed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elt import dbt_runner
from elt.settings import Settings
from elt.warehouse import warehouse_for

logger = logging.getLogger(__name__)

STATE_FILES = ("manifest.json", "run_results.json", "sources.json")
POINTER = "last-successful.json"
KEPT_COMMITS = 10  # commit folders kept per target besides the one the pointer names
BUILT_TYPES = ("model", "seed", "snapshot", "test", "unit_test")  # what `dbt build` runs
FAILED_LAST_RUN = ("result:error+", "result:fail+", "result:skipped+")


@dataclass(frozen=True)
class SavedState:
    folder: Path
    commit: str
    saved_at: str

    def file(self, name: str) -> Path:
        return self.folder / name


class StateStore:
    """The saved dbt state of one target of one warehouse, under the data folder."""

    def __init__(self, settings: Settings) -> None:
        self.target = settings.effective_dbt_target
        self.root = settings.path(settings.data_dir) / "dbt-state" / re.sub(r"[^\w.-]", "_", self.target)
        self.warehouse = warehouse_for(settings).location

    def last(self) -> tuple[SavedState | None, str]:
        """The state the next `--only-changed` build compares against, or None and why there is none."""
        pointer = self.root / POINTER
        if not pointer.exists():
            return None, f"no build of target {self.target} saved yet"
        saved = json.loads(pointer.read_text())
        if saved.get("warehouse") != self.warehouse:
            return None, f"the saved state of target {self.target} is of {saved.get('warehouse')}, not {self.warehouse}"
        folder = self.root / saved["commit"]
        if not (folder / "manifest.json").exists():
            return None, f"the saved state of target {self.target} ({folder}) has no manifest.json"
        return SavedState(folder, saved["commit"], saved.get("saved_at", "")), ""

    def save(self, project: dbt_runner.DbtProject, commit: str, *, with_sources: bool) -> SavedState:
        """Copy this build's manifest and run results (and this run's sources.json) to `<commit>/`
        and point last-successful.json at it; each file replaced whole, never half-written."""
        target = project.path / "target"
        folder = self.root / commit
        # Unpointed first: a save stopped part-way (full disk, kill -9) leaves no state to compare
        # with, so the next --only-changed build builds everything rather than trusting half of one.
        (self.root / POINTER).unlink(missing_ok=True)
        staging = self.root / f".{commit}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in STATE_FILES:
            if (target / name).exists() and (name != "sources.json" or with_sources):
                shutil.copy2(target / name, staging / name)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        saved_at = datetime.now(UTC).isoformat(timespec="seconds")
        pointer = self.root / f".{POINTER}.{os.getpid()}.partial"
        pointer.write_text(json.dumps({"commit": commit, "warehouse": self.warehouse, "saved_at": saved_at}))
        pointer.replace(self.root / POINTER)
        self._prune(keep=commit)
        return SavedState(folder, commit, saved_at)

    def forget(self) -> None:
        """No saved state (a save failed part-way): the next `--only-changed` build builds everything.
        Removing the pointer needs no free space; left-over partial files go with it where they can."""
        for leftover in self.root.glob(".*.partial"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        (self.root / POINTER).unlink(missing_ok=True)

    def _prune(self, keep: str) -> None:
        folders = sorted(
            (path for path in self.root.iterdir() if path.is_dir() and not path.name.startswith(".") and path.name != keep),
            key=lambda path: path.stat().st_mtime,
            reverse=True,
        )
        for old in folders[KEPT_COMMITS:]:
            shutil.rmtree(old, ignore_errors=True)


def deployed_commit(project: dbt_runner.DbtProject) -> str:
    """The commit checked out in the project's repo; `unversioned` outside git."""
    import git

    try:
        return git.Repo(project.path, search_parent_directories=True).head.commit.hexsha
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        return "unversioned"


@dataclass(frozen=True)
class PlannedNode:
    unique_id: str
    action: str  # run or skip
    reason: str


@dataclass
class Plan:
    """What an `--only-changed` build runs and skips, each node with why, and the build's arguments."""

    nodes: list[PlannedNode]
    arguments: list[str]  # `dbt build`'s
    note: str  # how the selection was made, e.g. "compared with the build of commit abc (…)"
    complete: bool  # nothing the selection wanted was left out: this build's state may replace the saved one

    @property
    def counts(self) -> dict[str, int]:
        return {action: sum(node.action == action for node in self.nodes) for action in ("run", "skip")}

    def lines(self) -> list[str]:
        width = max((len(node.unique_id) for node in self.nodes), default=0)
        return [f"{node.action:<4}  {node.unique_id:<{width}}  {node.reason}" for node in self.nodes]

    def rows(self) -> list[dict[str, str]]:
        return [{"action": node.action, "node": node.unique_id, "reason": node.reason} for node in self.nodes]


def plan_build(
    dbt: dbt_runner.Dbt,
    store: StateStore,
    freshness: list[dbt_runner.SourceFreshness],
    left_out: dict[str, str],
    select: str | None = None,
    exclude: str | None = None,
    *,
    full_refresh: bool = False,
) -> Plan:
    """The `--only-changed` build of this project against the saved state of its target.

    `freshness`: this run's `dbt source freshness` results (target/sources.json); `left_out`:
    selectors left out of the build (`source:faker.users+`) → why (`source faker.users stale`).
    Which nodes run is what `dbt ls` resolves for the very arguments the build gets. The reasons
    come from the saved run results (failed last run), the manifests (never built), the manifest's
    graph (which fresher source fed a node) and `dbt ls --select state:modified+`, which is only
    asked when --select, --exclude or a left-out source narrows the build.
    """
    state, no_state = store.last()
    dbt.parse()
    manifest = json.loads((dbt.project.path / "target" / "manifest.json").read_text())
    everything = _built_nodes(manifest)
    sources = {f"{source['source_name']}.{source['name']}": uid for uid, source in manifest.get("sources", {}).items()}
    # As dbt selects a source table and what it feeds: either name may hold a dot.
    selector_of = {
        f"{source['source_name']}.{source['name']}": dbt_runner.source_selector(source["source_name"], source["name"])
        for source in manifest.get("sources", {}).values()
    }
    left_out_sources = {name for name, selector in selector_of.items() if selector in left_out}

    if state is None:
        criteria: list[str] | None = None
        note = f"{no_state}: building everything"
    else:
        current = {source.unique_id: source.max_loaded_at for source in freshness if source.max_loaded_at}
        previous = _loaded_at(state.file("sources.json"))
        fresher_known = bool(current) and previous is not None
        # Rows dbt can't compare (no freshness block, no result now or at the last build) may be
        # new: what such a source feeds is built. dbt's source_status selector skips them.
        unknown = sorted(
            name for name, uid in sources.items() if name not in left_out_sources and (not fresher_known or uid not in current)
        )
        criteria = ["state:modified+", *FAILED_LAST_RUN, *(selector_of[name] for name in unknown)]
        criteria += ["source_status:fresher+"] if fresher_known else []
        note = f"compared with the build of commit {state.commit} saved {state.saved_at}"
    state_arguments = ["--state", str(state.folder)] if state else []
    selection = _intersection(select, criteria) if criteria is not None else select
    arguments = dbt_runner.build_arguments(selection, exclude, full_refresh=full_refresh, stale=list(left_out))
    arguments += state_arguments
    to_run = _listed(dbt, [argument for argument in arguments[1:] if argument != "--full-refresh"])

    wanted = set(everything)
    reasons: dict[str, str] = {}
    if state is not None:
        wanted = set()
        previous_nodes = set(json.loads(state.file("manifest.json").read_text()).get("nodes", {}))
        statuses = _previous_statuses(state.file("run_results.json"))
        failed = _failed_last_run(statuses, manifest)
        # With nothing narrowing the build, what it selects is the union of the criteria: what
        # no other reason explains is state:modified+, and a second `dbt ls` would only say so.
        narrowed = bool(select or exclude or left_out)
        modified: set[str] | None = _listed(dbt, ["--select", "state:modified+", *state_arguments]) if narrowed else None
        fed_by: dict[str, list[str]] = {}
        for name, uid in sources.items():
            if name in left_out_sources:
                continue
            if name in unknown:
                why = f"no freshness result to compare for source {name}"
            elif previous is None or uid not in previous:
                why = f"new rows in source {name} (none at the last build)"
            elif _newer(current[uid], previous[uid]):
                why = f"new rows in source {name} since {dbt_runner.utc_minute(previous[uid])}"
            else:
                continue
            for node in _descendants(manifest, uid):
                fed_by.setdefault(node, []).append(why)
        if modified is None:
            modified = to_run - set(fed_by)  # a node both modified and fed new rows reads the rows' reason
        for uid in everything:
            if uid not in previous_nodes:
                reasons[uid] = "never built"
            elif uid in failed:
                status = statuses.get(uid)
                reasons[uid] = "failed last run" if status in dbt_runner.FAILED_STATUSES else f"{status or 'skipped'} last run"
            elif uid in modified:
                reasons[uid] = "modified"
            elif uid in fed_by:
                reasons[uid] = "; ".join(fed_by[uid])
        wanted = set(reasons)
    blocked: dict[str, str] = {}
    source_of = {selector: name for name, selector in selector_of.items()}
    for selector, why in left_out.items():
        if selector in source_of:
            for node in _descendants(manifest, sources[source_of[selector]]):
                blocked.setdefault(node, why)

    nodes = []
    for uid in sorted(everything):
        if uid in to_run:
            nodes.append(PlannedNode(uid, "run", reasons.get(uid, "never built" if state is None else "selected")))
        elif uid in blocked:
            nodes.append(PlannedNode(uid, "skip", blocked[uid]))
        elif uid in wanted:
            nodes.append(PlannedNode(uid, "skip", f"not selected by --select/--exclude ({reasons.get(uid, 'never built')})"))
        else:
            nodes.append(PlannedNode(uid, "skip", "no new data and code unchanged"))
    complete = not (wanted - to_run)
    return Plan(nodes, arguments, note, complete)


def _intersection(select: str | None, criteria: list[str]) -> str:
    """dbt's union of each of the user's selectors intersected with each criterion (`a,b` is an
    intersection in dbt's syntax, a space a union).

    >>> _intersection("marts +orders", ["state:modified+", "result:error+"])
    'marts,state:modified+ marts,result:error+ +orders,state:modified+ +orders,result:error+'
    """
    if not select:
        return " ".join(criteria)
    return " ".join(f"{part},{criterion}" for part in select.split() for criterion in criteria)


def _listed(dbt: dbt_runner.Dbt, arguments: list[str]) -> set[str]:
    """The unique ids of what `dbt ls <arguments>` selects among the nodes `dbt build` runs."""
    completed = dbt.run_captured(
        "ls", *arguments, "--resource-type", *BUILT_TYPES, "--output", "json", "--output-keys", "unique_id", "--quiet"
    )
    if completed.returncode != 0:
        cause = dbt_runner.failure_cause(completed.stdout.splitlines(), completed.returncode)
        raise dbt_runner.DbtInvocationError(f"dbt ls {' '.join(arguments)} in {dbt.project.path} could not run: {cause}")
    listed = set()
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            listed.add(json.loads(line)["unique_id"])
    return listed


def _built_nodes(manifest: dict[str, Any]) -> set[str]:
    """What a `dbt build` of everything runs: the manifest's enabled nodes of the types it builds."""
    nodes = {uid for uid, node in manifest.get("nodes", {}).items() if node.get("resource_type") in BUILT_TYPES}
    return nodes | set(manifest.get("unit_tests", {}))


def _descendants(manifest: dict[str, Any], unique_id: str) -> set[str]:
    children = manifest.get("child_map", {})
    seen: set[str] = set()
    queue = deque(children.get(unique_id, []))
    while queue:
        node = queue.popleft()
        if node not in seen:
            seen.add(node)
            queue.extend(children.get(node, []))
    return seen


def _failed_last_run(statuses: dict[str, str], manifest: dict[str, Any]) -> set[str]:
    """What FAILED_LAST_RUN selects (the saved build's errored, failed and skipped nodes and their
    descendants in today's graph), read from the files the build is planned with: one `dbt ls` less."""
    roots = {uid for uid, status in statuses.items() if f"result:{status}+" in FAILED_LAST_RUN}
    return roots.union(*(_descendants(manifest, uid) for uid in roots))


def _loaded_at(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    results = json.loads(path.read_text()).get("results", [])
    return {result["unique_id"]: result["max_loaded_at"] for result in results if result.get("max_loaded_at")}


def _newer(current: str, previous: str | None) -> bool:
    return previous is None or datetime.fromisoformat(current) > datetime.fromisoformat(previous)


def _previous_statuses(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {result["unique_id"]: str(result.get("status")) for result in json.loads(path.read_text()).get("results", [])}


def left_out_reasons(
    connection_selectors: list[str], failed_connections: list[str], freshness: list[dbt_runner.SourceFreshness]
) -> dict[str, str]:
    """Each selector left out of the build → why, as the plan shows it."""
    reasons = dict.fromkeys(connection_selectors, f"connection {', '.join(failed_connections)} failed")
    for source in freshness:
        if source.blocks:
            stale = "stale" if source.status == "error" else "freshness could not be checked"
            reasons.setdefault(source.selector, f"source {source.source} {stale}")
    return reasons


def keep_state(
    store: StateStore,
    run: dbt_runner.DbtRun,
    commit: str,
    *,
    complete: bool,
    with_sources: bool,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> None:
    """Save a build's state as what the next `--only-changed` run compares with, unless the build
    left out something it should have built: the saved state would then claim it is up to date.
    A build with failed nodes is saved: the next one rebuilds them (`result:error+`)."""
    if run.command != "build":
        return
    if run.return_code != 0 and not run.results:
        log.warning("dbt state of target %s not saved: dbt build did not run", store.target)
        return
    if not complete:
        log.warning(
            "dbt state of target %s not saved: this build left out nodes it should have built (--select, --exclude, "
            "a failed connection or a stale source); the next --only-changed run compares with the build before",
            store.target,
        )
        return
    try:
        saved = store.save(dbt_runner.DbtProject.at(run.project_dir), commit, with_sources=with_sources)
    except OSError as error:
        # Saving is bookkeeping: it never fails a build that worked. The saved state may now be
        # half this build's, so it is forgotten and the next --only-changed run builds everything.
        log.warning(
            "dbt state of target %s not saved in %s: %s; the next --only-changed run builds everything",
            store.target,
            store.root,
            error.strerror or error,
        )
        try:
            store.forget()
        except OSError as forget_error:
            # save() removed the pointer before writing anything; this only leaves partial files behind.
            log.warning("dbt state of target %s could not be forgotten either (%s)", store.target, forget_error)
        return
    log.info("Saved the dbt state of target %s at commit %s in %s", store.target, commit, saved.folder)


def plan_checkout(
    settings: Settings,
    folder: Path,
    select: str | None = None,
    exclude: str | None = None,
    *,
    dbt_for: Callable[[Settings, dbt_runner.DbtProject], AbstractContextManager[dbt_runner.Dbt]] = dbt_runner.dbt_for,
) -> Plan:
    """`elt plan`: the `--only-changed` build of the checkout as it is, nothing built. Runs the
    freshness check the build would; holds the warehouse's run lock, so no run changes target/ meanwhile.
    `dbt_for`: how dbt is run (`dbt_runner.dbt_for`; a test gives a stand-in)."""
    from elt import run_lock

    project = dbt_runner.DbtProject.at(folder)
    warehouse_for(settings).prepare_for_dbt()
    with run_lock.hold_for_task(settings, "elt plan", wait_seconds=0), dbt_for(settings, project) as dbt:
        freshness = dbt_runner.check_freshness(dbt)
        return plan_build(dbt, StateStore(settings), freshness, left_out_reasons([], [], freshness), select, exclude)
