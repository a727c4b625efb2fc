"""The update-code stage against real repositories: a local bare remote and clones of it."""

from pathlib import Path

import pytest

from elt.git_repo import GitDirtyTree, GitError, GitHistoryDiverged, GitRemoteUnreachable, RepoSource, update_code
from elt.settings import load_settings
from tests.conftest import GitRemote, git


def _snapshot(checkout: Path) -> tuple[str, dict[str, str]]:
    files = {
        str(path.relative_to(checkout)): path.read_text()
        for path in checkout.rglob("*")
        if path.is_file() and ".git" not in path.parts
    }
    return git("rev-parse", "HEAD", cwd=checkout), files


def test_first_run_clones_a_remote_url(appliance_remote: GitRemote, appliance_env: Path) -> None:
    settings = load_settings()
    source = RepoSource.from_settings(settings, repo=str(appliance_remote.bare))
    deployed = update_code(source)
    assert source.checkout == appliance_env / "data" / "repos" / "remote"
    assert (source.checkout / "dbt" / "dbt_project.yml").is_file()
    assert deployed.sha == git("rev-parse", "HEAD", cwd=appliance_remote.author_clone)
    assert deployed.branch == "main"


def test_new_upstream_commit_is_picked_up(appliance_remote: GitRemote, tmp_path: Path) -> None:
    """A push upstream reaches the checkout by fast-forward and the new SHA is reported."""
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    before = git("rev-parse", "HEAD", cwd=checkout)
    pushed = appliance_remote.commit("dbt/models/marts/new_model.sql", "select 1 as id\n", "add a model")

    deployed = update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))

    assert deployed.sha == pushed
    assert deployed.previous_sha == before and deployed.changed
    assert (checkout / "dbt" / "models" / "marts" / "new_model.sql").is_file()


def test_diverged_history_stops_and_leaves_checkout_untouched(appliance_remote: GitRemote, tmp_path: Path) -> None:
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    (checkout / "local.txt").write_text("local work\n")
    git("add", "local.txt", cwd=checkout)
    git("commit", "-q", "-m", "local commit", cwd=checkout)
    appliance_remote.commit("upstream.txt", "upstream work\n", "upstream commit")
    before = _snapshot(checkout)

    with pytest.raises(GitHistoryDiverged) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))

    assert str(checkout) in str(error.value) and "diverged" in str(error.value)
    assert _snapshot(checkout) == before


def test_dirty_tree_stops_naming_the_files_and_keeps_the_edits(appliance_remote: GitRemote, tmp_path: Path) -> None:
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    model = checkout / "dbt" / "models" / "marts" / "daily_revenue.sql"
    model.write_text(model.read_text() + "\n-- hotfix on the VM\n")
    appliance_remote.commit("upstream.txt", "upstream work\n", "upstream commit")
    before = _snapshot(checkout)

    with pytest.raises(GitDirtyTree) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))

    assert str(checkout) in str(error.value)
    assert "dbt/models/marts/daily_revenue.sql" in str(error.value)
    assert _snapshot(checkout) == before


def test_branch_without_upstream_deploys_local_head(tmp_path: Path) -> None:
    """A checkout with no remote (a laptop experiment) is built as it is, not refused."""
    checkout = tmp_path / "solo"
    checkout.mkdir()
    git("init", "-q", "-b", "main", cwd=checkout)
    git("-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init", cwd=checkout)
    deployed = update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))
    assert deployed.sha == git("rev-parse", "HEAD", cwd=checkout)
    assert not deployed.pulled


def test_wrong_branch_is_refused(appliance_remote: GitRemote, tmp_path: Path) -> None:
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    with pytest.raises(GitError, match="ELT_GIT_BRANCH"):
        update_code(RepoSource.from_settings(load_settings(), repo=str(checkout), branch="release"))


def test_token_never_appears_in_errors(monkeypatch: pytest.MonkeyPatch, appliance_env: Path) -> None:
    """A failed clone over HTTPS reports the URL and the cause, never the token."""
    monkeypatch.setenv("ELT_GIT_TOKEN", "ghp_TOPSECRET123")
    settings = load_settings()
    source = RepoSource.from_settings(settings, repo="https://user:ghp_TOPSECRET123@git.invalid/team/analytics.git")
    with pytest.raises(GitRemoteUnreachable) as error:
        update_code(source)
    assert error.value.transient
    assert "ghp_TOPSECRET123" not in str(error.value)
    assert "git.invalid/team/analytics.git" in str(error.value)
