"""The saved dbt state of each target (fast: files only, no dbt): what `--only-changed` compares with."""

from __future__ import annotations

import json
import logging
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
