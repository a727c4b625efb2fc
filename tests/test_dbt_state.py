"""The saved dbt state of each target (fast: files only, no dbt): what `--only-changed` compares with."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

from elt import dbt_state
from elt.dbt_runner import DbtInvocationError, DbtProject, DbtRun, NodeResult, SourceFreshness
from elt.settings import load_settings


@pytest.fixture
def built_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DbtProject:
    """A project folder whose target/ holds what a `dbt build` leaves, and settings whose data folder is in tmp_path."""
    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    folder = tmp_path / "project"
    (folder / "target").mkdir(parents=True)
    (folder / "dbt_project.yml").write_text("name: p\nprofile: p\n")
    for name in dbt_state.STATE_FILES:
        (folder / "target" / name).write_text(json.dumps({"file": name}))
    return DbtProject.at(folder)


def test_a_build_is_kept_per_target_and_commit_and_is_what_the_next_run_compares_with(built_project: DbtProject) -> None:
    store = dbt_state.StateStore(load_settings())
    assert store.last() == (None, "no build of target duckdb saved yet")
    saved = store.save(built_project, "abc123", with_sources=False)
    assert saved.folder == Path(load_settings().home) / "data" / "dbt-state" / "duckdb" / "abc123"
    assert sorted(path.name for path in saved.folder.iterdir()) == ["manifest.json", "run_results.json"]  # no freshness ran
    last, why = store.last()
    assert (last.folder, last.commit, why) == (saved.folder, "abc123", "") if last else pytest.fail(why)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", last.saved_at), last.saved_at  # UTC, to the second
    assert saved == last  # what save hands back is what the next run reads
    assert json.loads((saved.folder / "manifest.json").read_text()) == {"file": "manifest.json"}


def test_a_state_of_another_warehouse_under_the_same_target_is_not_compared_with(
    built_project: DbtProject, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dbt_state.StateStore(load_settings()).save(built_project, "abc123", with_sources=True)
    monkeypatch.setenv("ELT_DUCKDB_PATH", str(tmp_path / "other.duckdb"))
    assert dbt_state.StateStore(load_settings()).last() == (
        None,
        f"the saved state of target duckdb is of {tmp_path / 'data' / 'warehouse.duckdb'}, not {tmp_path / 'other.duckdb'}",
    )


def test_a_build_that_left_out_what_it_should_have_built_is_not_kept(
    built_project: DbtProject, caplog: pytest.LogCaptureFixture
) -> None:
    """Its manifest would claim the left-out nodes are up to date; a build with failed nodes is kept (they rebuild next time)."""
    store = dbt_state.StateStore(load_settings())
    failed = DbtRun("build", built_project.path, 1, results=[NodeResult("model.p.a", "error", 0.1, "boom", None)])
    with caplog.at_level(logging.INFO, logger="tests.state"):
        dbt_state.keep_state(store, failed, "c1", complete=False, with_sources=True, log=logging.getLogger("tests.state"))
        assert store.last()[0] is None
        assert caplog.messages == [
            "dbt state of target duckdb not saved: this build left out nodes it should have built (--select, --exclude, "
            "a failed connection or a stale source); the next --only-changed run compares with the build before"
        ]
        dbt_state.keep_state(store, DbtRun("build", built_project.path, 2), "c1", complete=True, with_sources=True)
        assert store.last()[0] is None  # dbt did not run at all
        dbt_state.keep_state(store, failed, "c1", complete=True, with_sources=True)
    assert store.last()[0] is not None and store.last()[0].commit == "c1"  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_modified_model_on_a_stale_source_is_skipped_as_stale_and_the_state_does_not_advance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real dbt on real DuckDB (the tiny project plus source shop.orders, error_after 48 h): after a
    saved build, shop_orders.sql changes while its source's last load is 72 h old. The plan skips it
    with `source shop.orders stale` (the freshness gate wins over the change), builds nothing else,
    and the state is not saved, so the next run still sees the change."""
    import shutil
    from datetime import UTC, datetime, timedelta

    import duckdb
    import yaml

    from elt import dbt_runner
    from tests.conftest import TINY_PROJECT

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    folder = tmp_path / "tiny_shop"
    shutil.copytree(TINY_PROJECT, folder)
    freshness = {"warn_after": {"count": 24, "period": "hour"}, "error_after": {"count": 48, "period": "hour"}}
    source = {
        "name": "shop",
        "schema": "raw_shop",
        "config": {"loaded_at_field": "_airbyte_extracted_at", "freshness": freshness},
    }
    (folder / "models" / "sources.yml").write_text(
        yaml.safe_dump({"version": 2, "sources": [{**source, "tables": [{"name": "orders"}]}]})
    )
    (folder / "models" / "shop_orders.sql").write_text("select * from {{ source('shop', 'orders') }}\n")
    warehouse = tmp_path / "data" / "warehouse.duckdb"
    warehouse.parent.mkdir()
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("create schema raw_shop")
        connection.execute("create table raw_shop.orders as select 1 as id, now() - interval 1 hour as _airbyte_extracted_at")
    settings = load_settings()
    project = DbtProject.at(folder)
    store = dbt_state.StateStore(settings)

    def planned_run() -> tuple[dbt_state.Plan, DbtRun]:
        with dbt_runner.dbt_for(settings, project) as dbt:
            checked = dbt_runner.check_freshness(dbt)
            plan = dbt_state.plan_build(dbt, store, checked, dbt_state.left_out_reasons([], [], checked))
            run = dbt_runner.run_dbt(dbt, plan.arguments)
            dbt_state.keep_state(store, run, "c1", complete=plan.complete, with_sources=bool(checked))
        return plan, run

    plan, run = planned_run()
    assert plan.note == "no build of target duckdb saved yet: building everything"
    assert {node.unique_id for node in dbt_runner.raise_if_failed(run).results} == {n.unique_id for n in plan.nodes}
    saved = json.loads((store.root / dbt_state.POINTER).read_text())["saved_at"]

    aged = datetime.now(UTC) - timedelta(hours=72)
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("update raw_shop.orders set _airbyte_extracted_at = ?", [aged])
    (folder / "models" / "shop_orders.sql").write_text("select id from {{ source('shop', 'orders') }}\n")
    plan, run = planned_run()
    assert {node.unique_id: (node.action, node.reason) for node in plan.nodes} == {
        "model.tiny_shop.shop_orders": ("skip", "source shop.orders stale"),
        "seed.tiny_shop.orders": ("skip", "no new data and code unchanged"),
        "model.tiny_shop.customer_totals": ("skip", "no new data and code unchanged"),
        **{n.unique_id: ("skip", "no new data and code unchanged") for n in plan.nodes if n.unique_id.startswith("test.")},
    }
    assert run.results == [] and not plan.complete
    assert json.loads((store.root / dbt_state.POINTER).read_text())["saved_at"] == saved  # the change is still ahead


@pytest.mark.slow
def test_a_modified_model_left_out_by_exclude_still_reads_modified_and_the_state_does_not_advance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real dbt on real DuckDB (the tiny project): after a saved build, customer_totals.sql changes.
    A plan that excludes it names it `modified` (dbt's state:modified+, asked because --exclude
    narrows the build) and keeps no state; the next plan, with nothing narrowing it, builds it and
    what it feeds, `modified` (what dbt selected that no other reason explains), and nothing else."""
    import shutil

    from elt import dbt_runner
    from tests.conftest import TINY_PROJECT

    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    folder = tmp_path / "tiny_shop"
    shutil.copytree(TINY_PROJECT, folder)
    settings = load_settings()
    project = DbtProject.at(folder)
    store = dbt_state.StateStore(settings)

    def planned_run(exclude: str | None = None) -> dbt_state.Plan:
        with dbt_runner.dbt_for(settings, project) as dbt:
            plan = dbt_state.plan_build(dbt, store, [], {}, exclude=exclude)
            run = dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, plan.arguments))
            dbt_state.keep_state(store, run, "c1", complete=plan.complete, with_sources=False)
        return plan

    planned_run()
    model = folder / "models" / "customer_totals.sql"
    model.write_text(model.read_text() + "\n-- changed\n")
    plan = planned_run(exclude="customer_totals")
    totals = "model.tiny_shop.customer_totals"
    changed = {totals, *(node.unique_id for node in plan.nodes if node.unique_id.startswith("test."))}
    assert {node.unique_id: (node.action, node.reason) for node in plan.nodes if node.unique_id in changed} == dict.fromkeys(
        changed, ("skip", "not selected by --select/--exclude (modified)")
    )  # its tests are left out with it
    assert [node.unique_id for node in plan.nodes if node.action == "run"] == []
    assert not plan.complete

    plan = planned_run()
    ran = {node.unique_id: node.reason for node in plan.nodes if node.action == "run"}
    assert ran == {totals: "modified", **{uid: "modified" for uid in ran if uid.startswith("test.")}}
    assert [uid for uid in ran if uid.startswith("test.")], ran  # customer_totals' tests run with it
    assert plan.complete


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_state_that_does_not_fit_on_the_volume_is_a_warning_and_the_next_run_builds_everything(
    built_project: DbtProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The data folder on a real 1 MB tmpfs: a build's state saves, then the next one's manifest
    (2 MB) does not fit. Saving is bookkeeping: keep_state logs a warning and returns, so a build
    that worked still succeeds, and no state is left to compare with, not the build before it
    (which would call this build's nodes up to date without knowing what it changed)."""
    volume = tmp_path / "data-volume"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(volume)], check=True)
    try:
        monkeypatch.setenv("ELT_DATA_DIR", str(volume))
        store = dbt_state.StateStore(load_settings())
        built = DbtRun("build", built_project.path, 0, results=[NodeResult("model.p.a", "success", 0.1, None, None)])
        dbt_state.keep_state(store, built, "c1", complete=True, with_sources=True)
        assert store.last()[0] is not None

        (built_project.path / "target" / "manifest.json").write_text(json.dumps({"pad": "x" * 2_000_000}))
        with caplog.at_level(logging.WARNING, logger="tests.state"):
            dbt_state.keep_state(store, built, "c2", complete=True, with_sources=True, log=logging.getLogger("tests.state"))
        assert caplog.messages == [
            f"dbt state of target duckdb not saved in {volume / 'dbt-state' / 'duckdb'}: No space left on device; "
            "the next --only-changed run builds everything"
        ]
        assert store.last() == (None, "no build of target duckdb saved yet")
        assert sorted(path.name for path in store.root.iterdir()) == ["c1"]  # the half-copied c2 is gone
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


# plan_build's selection logic without dbt: a manifest as `dbt parse` leaves it, and a stand-in
# for dbt_runner.Dbt whose `dbt ls` answers with the nodes given for each --select it is asked.
SOURCE_ORDERS = "source.p.shop.orders"
SOURCE_USERS = "source.p.faker.users"
SOURCE_EVENTS = "source.p.web.events"
SEED = "seed.p.countries"
STG_ORDERS = "model.p.stg_orders"
TOTALS = "model.p.totals"
TOTALS_TEST = "test.p.not_null_totals_id"
USERS = "model.p.users"
EVENTS = "model.p.events"
UNIT_TEST = "unit_test.p.totals.adds_up"
EVERYTHING = [SEED, STG_ORDERS, TOTALS, TOTALS_TEST, USERS, EVENTS, UNIT_TEST]
MANIFEST = {
    "nodes": {
        SEED: {"resource_type": "seed"},
        STG_ORDERS: {"resource_type": "model"},
        TOTALS: {"resource_type": "model"},
        TOTALS_TEST: {"resource_type": "test"},
        USERS: {"resource_type": "model"},
        EVENTS: {"resource_type": "model"},
        "analysis.p.scratch": {"resource_type": "analysis"},  # `dbt build` does not run analyses
        "operation.p.hooks": {},
    },
    "unit_tests": {UNIT_TEST: {}},
    "sources": {
        SOURCE_ORDERS: {"source_name": "shop", "name": "orders"},
        SOURCE_USERS: {"source_name": "faker", "name": "users"},
        SOURCE_EVENTS: {"source_name": "web", "name": "events"},
    },
    "child_map": {
        SOURCE_ORDERS: [STG_ORDERS],
        STG_ORDERS: [TOTALS],
        TOTALS: [TOTALS_TEST, UNIT_TEST],
        SOURCE_USERS: [USERS],
        SOURCE_EVENTS: [EVENTS],
        SEED: [],
    },
}
BUILD_CRITERIA = "state:modified+ result:error+ result:fail+ result:skipped+"


class ListingDbt:
    """plan_build's dbt: `parse` leaves MANIFEST (or the manifest given) in target/; `dbt ls` answers with `listed[<its --select>]`."""

    def __init__(
        self, project: DbtProject, listed: dict[str, set[str]], return_code: int = 0, manifest: dict | None = None
    ) -> None:
        self.project = project
        self.listed = listed
        self.return_code = return_code
        self.manifest = manifest or MANIFEST
        self.asked: list[list[str]] = []

    def parse(self) -> None:
        (self.project.path / "target" / "manifest.json").write_text(json.dumps(self.manifest))

    def run_captured(self, *arguments: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        assert arguments[0] == "ls" and timeout is None
        self.asked.append(list(arguments[1:]))
        select = arguments[arguments.index("--select") + 1] if "--select" in arguments else ""
        output = [
            "10:00:01  Running with dbt=1.11.0",
            *(json.dumps({"unique_id": uid}) for uid in sorted(self.listed.get(select, set()))),
        ]
        return subprocess.CompletedProcess(["dbt", *arguments], self.return_code, "\n".join(output) + "\n", "")


def _reasons(plan: dbt_state.Plan) -> dict[str, tuple[str, str]]:
    return {node.unique_id: (node.action, node.reason) for node in plan.nodes}


def _freshness(unique_id: str, max_loaded_at: str | None, status: str = "pass") -> SourceFreshness:
    return SourceFreshness(unique_id, status, max_loaded_at)


def _save_build(
    store: dbt_state.StateStore, project: DbtProject, *, nodes: list[str], results: dict[str, str], loaded: dict[str, str] | None
) -> Path:
    """A saved build whose manifest had `nodes`, whose run results were `results` (unique id →
    status), and whose freshness check saw `loaded` (unique id → max_loaded_at; None: no check)."""
    target = project.path / "target"
    (target / "manifest.json").write_text(json.dumps({"nodes": {uid: {} for uid in nodes}}))
    (target / "run_results.json").write_text(
        json.dumps({"results": [{"unique_id": uid, "status": s} for uid, s in results.items()]})
    )
    sources = [{"unique_id": uid, "max_loaded_at": at} for uid, at in (loaded or {}).items()]
    (target / "sources.json").write_text(json.dumps({"results": [*sources, {"unique_id": "source.p.x.gone"}]}))
    return store.save(project, "c0", with_sources=loaded is not None).folder


def test_without_a_saved_state_the_plan_builds_what_dbt_selects_and_calls_it_never_built(built_project: DbtProject) -> None:
    store = dbt_state.StateStore(load_settings())
    selected = set(EVERYTHING) - {SEED}
    dbt = ListingDbt(built_project, {"marts": selected})
    plan = dbt_state.plan_build(dbt, store, [], {}, "marts", "legacy", full_refresh=True)  # type: ignore[arg-type]
    assert plan.note == "no build of target duckdb saved yet: building everything"
    assert plan.arguments == ["build", "--select", "marts", "--exclude", "legacy", "--full-refresh"]
    assert dbt.asked == [["--select", "marts", "--exclude", "legacy", "--resource-type", *dbt_state.BUILT_TYPES,
                          "--output", "json", "--output-keys", "unique_id", "--quiet"]]  # fmt: skip
    assert _reasons(plan) == {
        **{uid: ("run", "never built") for uid in selected},
        SEED: ("skip", "not selected by --select/--exclude (never built)"),
    }
    assert [node.unique_id for node in plan.nodes] == sorted(EVERYTHING)
    assert not plan.complete and plan.counts == {"run": 6, "skip": 1}
    everything = dbt_state.plan_build(ListingDbt(built_project, {"": set(EVERYTHING)}), store, [], {})  # type: ignore[arg-type]
    assert everything.arguments == ["build"] and everything.complete


def test_against_a_saved_state_each_node_runs_for_its_reason(built_project: DbtProject) -> None:
    """What failed or was skipped last run, what is new, what fresher or unknown sources feed,
    and what dbt's state:modified+ adds; the rest is skipped as unchanged. With nothing narrowing
    the build, what dbt selects that no other reason explains is `modified`, with no second `dbt ls`."""
    store = dbt_state.StateStore(load_settings())
    folder = _save_build(
        store,
        built_project,
        nodes=[SEED, STG_ORDERS, TOTALS, TOTALS_TEST, USERS, EVENTS],
        results={TOTALS: "error", TOTALS_TEST: "skipped", SEED: "success"},
        loaded={SOURCE_ORDERS: "2026-12-01T10:00:00+00:00", SOURCE_EVENTS: "2026-12-01T10:00:00+00:00"},
    )
    freshness = [
        _freshness(SOURCE_ORDERS, "2026-12-01T10:00:00.000001+00:00"),  # a microsecond newer
        _freshness(SOURCE_EVENTS, "2026-12-01T10:00:00+00:00"),  # no new rows
        _freshness(SOURCE_USERS, None),  # no result to compare
    ]
    select = f"{BUILD_CRITERIA} source:faker.users+ source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {SEED, STG_ORDERS, TOTALS, TOTALS_TEST, USERS, UNIT_TEST}})
    plan = dbt_state.plan_build(dbt, store, freshness, {})  # type: ignore[arg-type]
    assert plan.arguments == ["build", "--select", select, "--state", str(folder)]
    assert len(dbt.asked) == 1
    assert plan.note.startswith("compared with the build of commit c0 saved 20")
    assert _reasons(plan) == {
        SEED: ("run", "modified"),
        STG_ORDERS: ("run", "new rows in source shop.orders since 2026-12-01 10:00 UTC"),
        TOTALS: ("run", "failed last run"),
        TOTALS_TEST: ("run", "skipped last run"),
        USERS: ("run", "no freshness result to compare for source faker.users"),
        UNIT_TEST: ("run", "never built"),
        EVENTS: ("skip", "no new data and code unchanged"),
    }
    assert plan.complete


def test_a_source_the_saved_build_did_not_check_has_new_rows_and_one_without_a_result_is_built(built_project: DbtProject) -> None:
    """The saved build had no freshness check (no sources.json): every source with a result now
    reads `none at the last build`; one dbt cannot compare is selected by name (dbt's
    source_status:fresher+ would skip it), and with no result at all to compare, no
    source_status selector is asked for."""
    store = dbt_state.StateStore(load_settings())
    nodes = [SEED, STG_ORDERS, TOTALS, TOTALS_TEST, USERS, EVENTS, UNIT_TEST]
    _save_build(store, built_project, nodes=nodes, results={}, loaded=None)
    select = f"{BUILD_CRITERIA} source:faker.users+ source:shop.orders+ source:web.events+"
    plan = dbt_state.plan_build(
        ListingDbt(built_project, {select: {STG_ORDERS}}), store, [_freshness(SOURCE_ORDERS, "2026-12-01T10:00:00")], {}
    )  # type: ignore[arg-type]
    assert plan.arguments[:3] == ["build", "--select", select]
    assert _reasons(plan)[STG_ORDERS] == ("run", "no freshness result to compare for source shop.orders")

    _save_build(store, built_project, nodes=nodes, results={}, loaded={SOURCE_EVENTS: "2026-12-01T10:00:00"})
    freshness = [_freshness(SOURCE_ORDERS, "2026-12-01T10:00:00"), _freshness(SOURCE_EVENTS, "2026-12-01T09:00:00")]
    select = f"{BUILD_CRITERIA} source:faker.users+ source_status:fresher+"
    plan = dbt_state.plan_build(ListingDbt(built_project, {select: {STG_ORDERS, USERS}}), store, freshness, {})  # type: ignore[arg-type]
    assert _reasons(plan)[STG_ORDERS] == ("run", "new rows in source shop.orders (none at the last build)")
    assert _reasons(plan)[EVENTS] == ("skip", "no new data and code unchanged")  # older than at the last build


def test_a_narrowed_build_asks_dbt_what_is_modified_and_names_what_it_leaves_out(built_project: DbtProject) -> None:
    """A left-out source's nodes are skipped with its reason, what --select leaves out reads
    `not selected` with why it was wanted, and the plan is not complete (its state is not kept)."""
    store = dbt_state.StateStore(load_settings())
    folder = _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded={SOURCE_ORDERS: "2026-12-01T10:00:00"})
    freshness = [_freshness(SOURCE_ORDERS, "2026-12-01T10:00:00"), _freshness(SOURCE_USERS, "2026-12-01T10:00:00", "error")]
    left_out = {"source:faker.users+": "source faker.users stale"}
    criteria = [*BUILD_CRITERIA.split(), "source:web.events+", "source_status:fresher+"]
    select = " ".join(f"{part},{criterion}" for part in ("marts", "+totals") for criterion in criteria)
    dbt = ListingDbt(built_project, {select: {TOTALS}, "state:modified+": {TOTALS, TOTALS_TEST, USERS}})
    plan = dbt_state.plan_build(dbt, store, freshness, left_out, "marts +totals", "legacy")  # type: ignore[arg-type]
    assert plan.arguments == ["build", "--select", select, "--exclude", "legacy source:faker.users+", "--state", str(folder)]
    assert dbt.asked[1][:4] == ["--select", "state:modified+", "--state", str(folder)]
    assert _reasons(plan) == {
        TOTALS: ("run", "modified"),
        TOTALS_TEST: ("skip", "not selected by --select/--exclude (modified)"),
        USERS: ("skip", "source faker.users stale"),
        EVENTS: ("skip", "not selected by --select/--exclude (no freshness result to compare for source web.events)"),
        SEED: ("skip", "no new data and code unchanged"),
        STG_ORDERS: ("skip", "no new data and code unchanged"),
        UNIT_TEST: ("skip", "no new data and code unchanged"),
    }
    assert not plan.complete


def test_select_alone_narrows_the_build_so_a_modified_node_it_leaves_out_keeps_the_state_from_advancing(
    built_project: DbtProject,
) -> None:
    """--select and nothing else: what it leaves out that is modified is named so, and the plan is
    not complete, so the next run still builds it (the state of this build is not kept)."""
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_USERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    folder = _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    freshness = [_freshness(uid, at) for uid, at in loaded.items()]
    select = " ".join(f"marts,{criterion}" for criterion in [*BUILD_CRITERIA.split(), "source_status:fresher+"])
    dbt = ListingDbt(built_project, {select: {TOTALS}, "state:modified+": {TOTALS, TOTALS_TEST}})

    plan = dbt_state.plan_build(dbt, store, freshness, {}, "marts")  # type: ignore[arg-type]

    assert plan.arguments == ["build", "--select", select, "--state", str(folder)]
    assert [asked[:2] for asked in dbt.asked] == [["--select", select], ["--select", "state:modified+"]]
    assert _reasons(plan)[TOTALS] == ("run", "modified")
    assert _reasons(plan)[TOTALS_TEST] == ("skip", "not selected by --select/--exclude (modified)")
    assert not plan.complete


def test_a_dbt_ls_that_fails_is_named_with_its_arguments_and_dbts_cause(built_project: DbtProject) -> None:
    dbt = ListingDbt(built_project, {}, return_code=2)
    with pytest.raises(DbtInvocationError) as raised:
        dbt_state.plan_build(dbt, dbt_state.StateStore(load_settings()), [], {}, "marts")  # type: ignore[arg-type]
    assert str(raised.value) == (f"dbt ls --select marts in {built_project.path} could not run: Running with dbt=1.11.0")


def test_the_plans_lines_and_rows_say_each_nodes_action_and_reason() -> None:
    plan = dbt_state.Plan(
        [dbt_state.PlannedNode("model.p.a", "run", "modified"), dbt_state.PlannedNode("seed.p.long_name", "skip", "no new data")],
        ["build"],
        "",
        True,
    )
    assert plan.lines() == ["run   model.p.a         modified", "skip  seed.p.long_name  no new data"]
    assert plan.rows()[1] == {"action": "skip", "node": "seed.p.long_name", "reason": "no new data"}
    assert dbt_state.Plan([], [], "", True).lines() == []


def test_what_a_failed_connection_or_a_blocking_source_leaves_out_and_why() -> None:
    freshness = [
        _freshness("source.p.faker.users", "2026-12-01T10:00:00", "error"),
        _freshness("source.p.shop.orders", None, "runtime error"),
        _freshness("source.p.web.events", "2026-12-01T10:00:00", "warn"),  # a warning leaves nothing out
        _freshness("source.p.faker.products", "2026-12-01T10:00:00", "error"),
    ]
    reasons = dbt_state.left_out_reasons(["source:faker.products+", "source:crm.leads+"], ["faker", "crm"], freshness)
    assert reasons == {
        "source:faker.products+": "connection faker, crm failed",  # the failed connection is the reason given
        "source:crm.leads+": "connection faker, crm failed",
        "source:faker.users+": "source faker.users stale",
        "source:shop.orders+": "source shop.orders freshness could not be checked",
    }


def test_a_saved_state_without_its_manifest_is_not_compared_with(built_project: DbtProject) -> None:
    store = dbt_state.StateStore(load_settings())
    saved = store.save(built_project, "abc123", with_sources=True)
    (saved.folder / "manifest.json").unlink()
    assert store.last() == (None, f"the saved state of target duckdb ({saved.folder}) has no manifest.json")


def test_only_the_last_ten_builds_are_kept_besides_the_one_compared_with(built_project: DbtProject) -> None:
    """Each save prunes to the ten newest (by file time) beside the one saved: here c0 and c1 went
    at the 12th and 13th saves; then c3 is made the newest, and saving c0 again removes c2."""
    store = dbt_state.StateStore(load_settings())
    for number in range(13):
        folder = store.save(built_project, f"c{number}", with_sources=True).folder
        os.utime(folder, (1_000_000 + number, 1_000_000 + number))
    (store.root / ".c99.123.partial").mkdir()  # a save stopped part-way is not a build
    os.utime(store.root / "c3", (2_000_000, 2_000_000))  # the newest file time, so kept
    store.save(built_project, "c0", with_sources=True)  # the oldest commit again: the one compared with
    kept = sorted(path.name for path in store.root.iterdir() if not path.name.startswith("."))
    assert kept == sorted(["c0", *(f"c{number}" for number in range(3, 13)), dbt_state.POINTER])  # newest first by file time


def test_forgetting_removes_the_pointer_and_what_a_stopped_save_left(built_project: DbtProject) -> None:
    store = dbt_state.StateStore(load_settings())
    store.save(built_project, "abc123", with_sources=True)
    (store.root / ".abc123.77.partial").mkdir()
    (store.root / ".last-successful.json.77.partial").write_text("{")
    store.forget()
    assert store.last() == (None, "no build of target duckdb saved yet")
    assert sorted(path.name for path in store.root.iterdir()) == ["abc123"]


def test_only_a_build_keeps_its_state(built_project: DbtProject) -> None:
    store = dbt_state.StateStore(load_settings())
    ran = DbtRun("run", built_project.path, 0, results=[NodeResult("model.p.a", "success", 0.1, None, None)])
    dbt_state.keep_state(store, ran, "c1", complete=True, with_sources=True)
    assert store.last()[0] is None


def test_the_deployed_commit_is_the_checkouts_head_and_unversioned_outside_git(tmp_path: Path) -> None:
    """The project is a folder of the repo (ELT_DBT_PROJECT_DIR), not necessarily its top."""
    folder = tmp_path / "repo"
    (folder / "dbt").mkdir(parents=True)
    (folder / "dbt" / "dbt_project.yml").write_text("name: p\nprofile: p\n")
    project = DbtProject.at(folder / "dbt")
    assert dbt_state.deployed_commit(project) == "unversioned"
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert dbt_state.deployed_commit(project) == "unversioned"  # no commit yet
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert dbt_state.deployed_commit(project) == head


def test_a_build_that_leaves_out_only_a_stale_sources_nodes_is_complete(built_project: DbtProject) -> None:
    """A stale source has no new rows to bring: what only it feeds is skipped with its reason and
    is not wanted, so the build's state may be kept. dbt is asked what is modified (the left-out
    source narrows the build)."""
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    freshness = [_freshness(uid, at) for uid, at in loaded.items()] + [_freshness(SOURCE_USERS, "2026-11-01T10:00:00", "error")]
    left_out = dbt_state.left_out_reasons([], [], freshness)
    select = f"{BUILD_CRITERIA} source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {TOTALS}, "state:modified+": {TOTALS}})
    plan = dbt_state.plan_build(dbt, store, freshness, left_out)  # type: ignore[arg-type]
    assert plan.arguments[:5] == ["build", "--select", select, "--exclude", "source:faker.users+"]
    assert [asked[:2] for asked in dbt.asked] == [["--select", select], ["--select", "state:modified+"]]
    assert _reasons(plan)[TOTALS] == ("run", "modified") and _reasons(plan)[USERS] == ("skip", "source faker.users stale")
    assert plan.counts == {"run": 1, "skip": 6} and plan.complete


DOTTED_USERS = "source.p.faker.users.v2"
DOTTED = {
    **MANIFEST,
    "sources": {
        **{k: v for k, v in MANIFEST["sources"].items() if k != SOURCE_USERS},
        DOTTED_USERS: {"source_name": "faker", "name": "users.v2"},
    },
    "child_map": {**{k: v for k, v in MANIFEST["child_map"].items() if k != SOURCE_USERS}, DOTTED_USERS: [USERS]},
}


def test_a_stale_source_whose_table_name_holds_a_dot_leaves_out_what_it_feeds_with_its_reason(built_project: DbtProject) -> None:
    """dbt reads `source:faker.users.v2+` as three parts and selects nothing: the plan excludes
    and names it as dbt selects it (`users?v2`), and what it feeds is skipped as stale."""
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    freshness = [_freshness(uid, at) for uid, at in loaded.items()] + [_freshness(DOTTED_USERS, "2026-11-01T10:00:00", "error")]
    left_out = dbt_state.left_out_reasons([], [], freshness)
    select = f"{BUILD_CRITERIA} source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {TOTALS}, "state:modified+": {TOTALS}}, manifest=DOTTED)
    plan = dbt_state.plan_build(dbt, store, freshness, left_out)  # type: ignore[arg-type]
    assert plan.arguments[:5] == ["build", "--select", select, "--exclude", "source:faker.users?v2+"]
    assert _reasons(plan)[USERS] == ("skip", "source faker.users.v2 stale")
    assert plan.complete


def test_a_source_whose_table_name_holds_a_dot_and_has_no_freshness_result_is_built_by_a_selector_dbt_reads(
    built_project: DbtProject,
) -> None:
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    freshness = [_freshness(uid, at) for uid, at in loaded.items()]
    select = f"{BUILD_CRITERIA} source:faker.users?v2+ source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {USERS}}, manifest=DOTTED)
    plan = dbt_state.plan_build(dbt, store, freshness, {})  # type: ignore[arg-type]
    assert plan.arguments[:3] == ["build", "--select", select]
    assert _reasons(plan)[USERS] == ("run", "no freshness result to compare for source faker.users.v2")


class UnwritableStore(dbt_state.StateStore):
    """A store on a volume that refuses every write (read-only, or gone)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(load_settings())
        self.error = error

    def save(self, project: DbtProject, commit: str, *, with_sources: bool) -> dbt_state.SavedState:
        raise self.error

    def forget(self) -> None:
        raise self.error


def test_what_keep_state_says_for_each_outcome(built_project: DbtProject, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("tests.state")
    built = DbtRun("build", built_project.path, 0, results=[NodeResult("model.p.a", "success", 0.1, None, None)])
    store = dbt_state.StateStore(load_settings())
    with caplog.at_level(logging.INFO, logger="tests.state"):
        dbt_state.keep_state(store, DbtRun("build", built_project.path, 2), "c1", complete=True, with_sources=True, log=log)
        dbt_state.keep_state(store, built, "c1", complete=True, with_sources=False, log=log)
        read_only = OSError(30, "Read-only file system")
        dbt_state.keep_state(UnwritableStore(read_only), built, "c2", complete=True, with_sources=True, log=log)
        dbt_state.keep_state(
            UnwritableStore(OSError("the volume is gone")), built, "c3", complete=True, with_sources=True, log=log
        )
    root = store.root
    assert caplog.messages == [
        "dbt state of target duckdb not saved: dbt build did not run",
        f"Saved the dbt state of target duckdb at commit c1 in {root / 'c1'}",
        f"dbt state of target duckdb not saved in {root}: Read-only file system; the next --only-changed run builds everything",
        "dbt state of target duckdb could not be forgotten either ([Errno 30] Read-only file system)",
        f"dbt state of target duckdb not saved in {root}: the volume is gone; the next --only-changed run builds everything",
        "dbt state of target duckdb could not be forgotten either (the volume is gone)",
    ]
    assert sorted(path.name for path in (root / "c1").iterdir()) == ["manifest.json", "run_results.json"]


def test_a_target_name_is_a_safe_folder_name(built_project: DbtProject, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ELT_DBT_TARGET", "prod/eu west.1")
    store = dbt_state.StateStore(load_settings())
    assert store.root == tmp_path / "data" / "dbt-state" / "prod_eu_west.1" and store.target == "prod/eu west.1"


def test_what_is_downstream_of_a_node_that_failed_last_run_is_rebuilt_to_the_last_grandchild(built_project: DbtProject) -> None:
    """stg_orders failed in the saved build, whose run results name nothing else (what it feeds
    now reads it since: today's graph decides). Every node downstream of it, grandchildren
    included, runs as `skipped last run`, not as `modified`."""
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_USERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    _save_build(store, built_project, nodes=EVERYTHING, results={STG_ORDERS: "error"}, loaded=loaded)
    freshness = [_freshness(uid, at) for uid, at in loaded.items()]
    select = f"{BUILD_CRITERIA} source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {STG_ORDERS, TOTALS, TOTALS_TEST, UNIT_TEST}})
    plan = dbt_state.plan_build(dbt, store, freshness, {})  # type: ignore[arg-type]
    assert _reasons(plan) == {
        STG_ORDERS: ("run", "failed last run"),
        TOTALS: ("run", "skipped last run"),
        TOTALS_TEST: ("run", "skipped last run"),
        UNIT_TEST: ("run", "skipped last run"),
        SEED: ("skip", "no new data and code unchanged"),
        USERS: ("skip", "no new data and code unchanged"),
        EVENTS: ("skip", "no new data and code unchanged"),
    }
    assert plan.complete


def test_a_node_fed_new_rows_by_two_sources_names_both(built_project: DbtProject) -> None:
    """totals reads faker.users as well as stg_orders: it and what it feeds read both sources'
    new rows, one after the other."""
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_USERS: "2026-12-01T09:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    freshness = [
        _freshness(SOURCE_ORDERS, "2026-12-02T10:00:00"),
        _freshness(SOURCE_USERS, "2026-12-02T10:00:00"),
        _freshness(SOURCE_EVENTS, "2026-12-01T10:00:00"),
    ]
    joined = {**MANIFEST, "child_map": {**MANIFEST["child_map"], SOURCE_USERS: [USERS, TOTALS]}}
    select = f"{BUILD_CRITERIA} source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {STG_ORDERS, TOTALS, TOTALS_TEST, UNIT_TEST, USERS}}, manifest=joined)
    plan = dbt_state.plan_build(dbt, store, freshness, {})  # type: ignore[arg-type]
    both = "new rows in source shop.orders since 2026-12-01 10:00 UTC; new rows in source faker.users since 2026-12-01 09:00 UTC"
    assert _reasons(plan) == {
        STG_ORDERS: ("run", "new rows in source shop.orders since 2026-12-01 10:00 UTC"),
        USERS: ("run", "new rows in source faker.users since 2026-12-01 09:00 UTC"),
        **dict.fromkeys([TOTALS, TOTALS_TEST, UNIT_TEST], ("run", both)),
        SEED: ("skip", "no new data and code unchanged"),
        EVENTS: ("skip", "no new data and code unchanged"),
    }


def test_a_node_dbt_selects_that_no_reason_explains_reads_selected(built_project: DbtProject) -> None:
    """--exclude narrows the build, so dbt is asked what is modified, and the seed is not; dbt's
    build selection has it all the same (its own freshness comparison, say). The plan says no more
    than that it was selected."""
    store = dbt_state.StateStore(load_settings())
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_USERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    select = f"{BUILD_CRITERIA} source_status:fresher+"
    dbt = ListingDbt(built_project, {select: {SEED}, "state:modified+": set()})
    plan = dbt_state.plan_build(dbt, store, [_freshness(uid, at) for uid, at in loaded.items()], {}, exclude="legacy")  # type: ignore[arg-type]
    assert [asked[:2] for asked in dbt.asked] == [["--select", select], ["--select", "state:modified+"]]
    assert _reasons(plan)[SEED] == ("run", "selected")
    assert plan.counts == {"run": 1, "skip": 6} and plan.complete


def test_a_dbt_ls_killed_by_a_signal_is_named_so(built_project: DbtProject) -> None:
    """What it printed before it was killed is not why it failed."""
    dbt = ListingDbt(built_project, {}, return_code=-9)
    with pytest.raises(DbtInvocationError) as raised:
        dbt_state.plan_build(dbt, dbt_state.StateStore(load_settings()), [], {}, "marts")  # type: ignore[arg-type]
    assert (
        str(raised.value) == f"dbt ls --select marts in {built_project.path} could not run: the dbt process was killed (signal 9)"
    )


def test_a_build_with_nothing_to_do_keeps_its_state_with_this_runs_freshness(
    built_project: DbtProject, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything was up to date: dbt ran nothing and succeeded. This commit's state (its
    sources.json included) is what the next run compares with."""
    store = dbt_state.StateStore(load_settings())
    store.save(built_project, "c1", with_sources=True)
    with caplog.at_level(logging.INFO, logger="tests.state"):
        dbt_state.keep_state(
            store,
            DbtRun("build", built_project.path, 0),
            "c2",
            complete=True,
            with_sources=True,
            log=logging.getLogger("tests.state"),
        )
    assert caplog.messages == [f"Saved the dbt state of target duckdb at commit c2 in {store.root / 'c2'}"]
    last, why = store.last()
    assert last is not None and last.commit == "c2", why
    assert sorted(path.name for path in last.folder.iterdir()) == ["manifest.json", "run_results.json", "sources.json"]


def test_settings_given_in_code_name_the_warehouse_the_state_is_of(
    built_project: DbtProject, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not the environment's warehouse: a store of settings made with another DuckDB file saves
    the state of that file, and one of the environment's settings does not compare with it."""
    other = tmp_path / "other.duckdb"
    store = dbt_state.StateStore(load_settings(duckdb_path=str(other)))
    store.save(built_project, "abc123", with_sources=True)
    assert store.last()[1] == ""
    assert dbt_state.StateStore(load_settings()).last() == (
        None,
        f"the saved state of target duckdb is of {other}, not {tmp_path / 'data' / 'warehouse.duckdb'}",
    )


class CheckingDbt(ListingDbt):
    """`elt plan`'s dbt: ListingDbt, and `dbt source freshness` as dbt 1.11 runs it (prints a line,
    leaves target/sources.json with `results`, exits 0). `during()` runs at each command, while
    the plan holds whatever it holds then."""

    def __init__(self, project: DbtProject, listed: dict[str, set[str]], sources: list[dict], during) -> None:
        super().__init__(project, listed)
        self.sources = sources
        self.during = during
        self.last_return_code = 0

    def invoke(self, arguments: list[str]):
        import time

        assert arguments == ["source", "freshness"], arguments
        self.asked.append(list(arguments))
        self.during()
        path = self.project.path / "target" / "sources.json"
        path.write_text(json.dumps({"results": self.sources}))
        now = time.time_ns()  # the kernel stamps a file by its coarse clock, which may lag time.time() by a tick
        os.utime(path, ns=(now, now))
        yield "10:00:01  Running with dbt=1.11.0\n"

    def run_captured(self, *arguments: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        self.during()
        return super().run_captured(*arguments, timeout=timeout)


def _dbt_for(dbt: ListingDbt, opened: list):
    """A stand-in for dbt_runner.dbt_for that hands out `dbt` and records what it was opened with."""
    from contextlib import contextmanager

    @contextmanager
    def dbt_for(settings, project: DbtProject):
        opened.append((settings, project.path))
        yield dbt

    return dbt_for


def test_elt_plan_checks_freshness_and_plans_the_build_while_no_run_can_start(
    built_project: DbtProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`elt plan --select marts --exclude legacy` against a saved build, with the real run lock of
    the warehouse its settings name (given in code: the environment names another, which it
    never touches). A run that starts while dbt checks freshness or lists nodes is refused, naming
    `elt plan`; the freshness check finds shop.orders fresher and faker.users stale, so the plan
    builds what shop.orders feeds within marts, leaves out what faker.users feeds, and is not
    complete. The lock is free and empty after."""
    from elt import run_lock

    monkeypatch.setenv("ELT_DUCKDB_PATH", str(tmp_path / "environments-warehouse" / "warehouse.duckdb"))
    warehouse = tmp_path / "warehouse" / "warehouse.duckdb"
    settings = load_settings(duckdb_path=str(warehouse))
    (built_project.path / "models").mkdir()
    (built_project.path / "models" / "sources.yml").write_text("sources:\n  - name: shop\n    freshness: {}\n")
    store = dbt_state.StateStore(settings)
    loaded = {SOURCE_ORDERS: "2026-12-01T10:00:00", SOURCE_USERS: "2026-12-01T10:00:00", SOURCE_EVENTS: "2026-12-01T10:00:00"}
    folder = _save_build(store, built_project, nodes=EVERYTHING, results={}, loaded=loaded)
    sources = [
        {"unique_id": SOURCE_ORDERS, "status": "pass", "max_loaded_at": "2026-12-02T10:00:00"},
        {"unique_id": SOURCE_USERS, "status": "error", "max_loaded_at": "2026-11-01T10:00:00"},
        {"unique_id": SOURCE_EVENTS, "status": "pass", "max_loaded_at": "2026-12-01T10:00:00"},
    ]
    refusals: list[str] = []

    def a_run_starts() -> None:
        with pytest.raises(run_lock.WarehouseInUse) as refused, run_lock.hold(settings, "12121212-1212-1212-1212-121212121212"):
            pytest.fail("a run took the lock while elt plan held it")
        refusals.append(str(refused.value))

    criteria = [*BUILD_CRITERIA.split(), "source_status:fresher+"]
    select = " ".join(f"marts,{criterion}" for criterion in criteria)
    dbt = CheckingDbt(built_project, {select: {STG_ORDERS, TOTALS}, "state:modified+": set()}, sources, a_run_starts)
    opened: list = []

    plan = dbt_state.plan_checkout(settings, built_project.path, "marts", "legacy", dbt_for=_dbt_for(dbt, opened))

    assert opened == [(settings, built_project.path)] and opened[0][0] is settings
    assert [asked[:2] for asked in dbt.asked] == [["source", "freshness"], ["--select", select], ["--select", "state:modified+"]]
    assert refusals == [f"the elt plan (PID {os.getpid()}) is using {warehouse}; wait for it or cancel it"] * 3
    assert plan.arguments == ["build", "--select", select, "--exclude", "legacy source:faker.users+", "--state", str(folder)]
    new_rows = "new rows in source shop.orders since 2026-12-01 10:00 UTC"
    assert _reasons(plan) == {
        STG_ORDERS: ("run", new_rows),
        TOTALS: ("run", new_rows),
        TOTALS_TEST: ("skip", f"not selected by --select/--exclude ({new_rows})"),
        UNIT_TEST: ("skip", f"not selected by --select/--exclude ({new_rows})"),
        USERS: ("skip", "source faker.users stale"),
        SEED: ("skip", "no new data and code unchanged"),
        EVENTS: ("skip", "no new data and code unchanged"),
    }
    assert not plan.complete
    assert run_lock.lock_path(settings).read_text() == ""
    assert not (tmp_path / "environments-warehouse").exists()
    with run_lock.hold(settings, "12121212-1212-1212-1212-121212121212"):
        pass


def test_elt_plan_while_a_run_holds_the_warehouse_does_not_wait_and_starts_no_dbt(
    built_project: DbtProject, tmp_path: Path
) -> None:
    """The run's real flock, taken on its own descriptor with its record written, as a run does."""
    import fcntl

    from elt import run_lock

    settings = load_settings()
    path = run_lock.lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    opened: list = []
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder = {"flow_run_id": "66666666-6666-6666-6666-666666666666", "pid": 4242, "started": "2026-12-02T10:00:00+00:00"}
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        with pytest.raises(run_lock.WarehouseInUse) as refused:
            dbt_state.plan_checkout(settings, built_project.path, dbt_for=_dbt_for(ListingDbt(built_project, {}), opened))
    finally:
        os.close(descriptor)
    assert str(refused.value) == (
        "another all-etl run (flow run 66666666-6666-6666-6666-666666666666, PID 4242) still holds "
        f"{tmp_path / 'data' / 'warehouse.duckdb'} after 0 s; the elt plan did not start: run it again when that ends"
    )
    assert opened == []


def _mount_tmpfs(folder: Path):
    """A real 1 MB tmpfs mounted on `folder` (made first) until the block ends."""
    from contextlib import contextmanager

    @contextmanager
    def mounted():
        folder.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)

    return mounted()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_an_old_build_that_cannot_be_removed_is_left_and_the_new_state_is_kept(
    built_project: DbtProject, caplog: pytest.LogCaptureFixture
) -> None:
    """Pruning is tidying: the oldest of eleven builds will not go (a volume is mounted in it, so
    removing it fails with EBUSY, as a file of another user fails it for a user who is not root).
    It is left for a later prune, and this build's state is saved all the same, with no warning."""
    store = dbt_state.StateStore(load_settings())
    built = DbtRun("build", built_project.path, 0, results=[NodeResult("model.p.a", "success", 0.1, None, None)])
    for number in range(11):
        store.save(built_project, f"c{number}", with_sources=True)
    with _mount_tmpfs(store.root / "c0" / "volume"):
        for number in range(11):
            os.utime(store.root / f"c{number}", (1_000_000 + number, 1_000_000 + number))  # c0 the oldest
        with caplog.at_level(logging.INFO, logger="tests.state"):
            dbt_state.keep_state(store, built, "c11", complete=True, with_sources=True, log=logging.getLogger("tests.state"))
        assert caplog.messages == [f"Saved the dbt state of target duckdb at commit c11 in {store.root / 'c11'}"]
        last, why = store.last()
        assert last is not None and last.commit == "c11", why
        assert (store.root / "c0" / "volume").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_leftover_that_cannot_be_removed_does_not_stop_a_failed_save_from_forgetting_the_state(
    built_project: DbtProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The data folder on a real 1 MB tmpfs, and a folder a stopped save left there that will not
    go (a volume mounted in it). The next build's state does not fit: it is not saved, the
    state is forgotten (the pointer goes, and this save's own partial folder), and the folder that
    will not go is left without a second warning."""
    with _mount_tmpfs(tmp_path / "data-volume") as volume:
        monkeypatch.setenv("ELT_DATA_DIR", str(volume))
        store = dbt_state.StateStore(load_settings())
        built = DbtRun("build", built_project.path, 0, results=[NodeResult("model.p.a", "success", 0.1, None, None)])
        dbt_state.keep_state(store, built, "c1", complete=True, with_sources=True)
        with _mount_tmpfs(store.root / ".c9.77.partial" / "volume"):
            (built_project.path / "target" / "manifest.json").write_text(json.dumps({"pad": "x" * 2_000_000}))
            with caplog.at_level(logging.WARNING, logger="tests.state"):
                dbt_state.keep_state(store, built, "c2", complete=True, with_sources=True, log=logging.getLogger("tests.state"))
            assert caplog.messages == [
                f"dbt state of target duckdb not saved in {store.root}: No space left on device; "
                "the next --only-changed run builds everything"
            ]
            assert store.last() == (None, "no build of target duckdb saved yet")
            assert sorted(path.name for path in store.root.iterdir()) == [".c9.77.partial", "c1"]


def test_what_a_killed_save_left_under_this_processs_pid_does_not_stop_the_next_save(
    built_project: DbtProject, caplog: pytest.LogCaptureFixture
) -> None:
    """A save killed part-way (kill -9) leaves `.<commit>.<pid>.partial` behind, and in a container
    the next run often gets the same PID. Its save of the same commit starts afresh: saved, with
    only this build's files (with_sources=False: no sources.json), and no warning."""
    store = dbt_state.StateStore(load_settings())
    staging = store.root / f".c1.{os.getpid()}.partial"
    staging.mkdir(parents=True)
    (staging / "sources.json").write_text('{"results": [')  # half written when the save was killed
    built = DbtRun("build", built_project.path, 0, results=[NodeResult("model.p.a", "success", 0.1, None, None)])
    with caplog.at_level(logging.INFO, logger="tests.state"):
        dbt_state.keep_state(store, built, "c1", complete=True, with_sources=False, log=logging.getLogger("tests.state"))
    assert caplog.messages == [f"Saved the dbt state of target duckdb at commit c1 in {store.root / 'c1'}"]
    assert sorted(path.name for path in (store.root / "c1").iterdir()) == ["manifest.json", "run_results.json"]
    assert sorted(path.name for path in store.root.iterdir()) == ["c1", dbt_state.POINTER]
