"""The saved dbt state of each target (fast: files only, no dbt): what `--only-changed` compares with."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from elt import dbt_state
from elt.dbt_runner import DbtProject, DbtRun, NodeResult
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
        assert not list(store.root.glob(".*.partial"))
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)
