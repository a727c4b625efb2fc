"""The update-code stage against real repositories: local bare remotes and clones of them."""

import base64
import hashlib
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import git as gitpython
import pytest

from elt.errors import ConfigurationError
from elt.git_repo import (
    Deployed,
    GitDirtyTree,
    GitError,
    GitHistoryDiverged,
    GitOriginMismatch,
    GitRemoteUnreachable,
    RepoSource,
    _remote_error,
    canonical_location,
    check_checkout,
    check_reachable,
    scrub_location,
    shown_location,
    update_code,
)
from elt.settings import load_settings
from tests.conftest import REPO_ROOT, TINY_PROJECT, GitRemote, git, make_remote


def _url_nothing_listens_on() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/team/analytics.git"


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
    assert source.checkout.parent == appliance_env / "data" / "repos"
    assert re.fullmatch(r"remote-[0-9a-f]{8}", source.checkout.name)
    assert (source.checkout / "dbt" / "dbt_project.yml").is_file()
    assert deployed.repo == str(appliance_remote.bare)
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

    local, remote = before[0], git("rev-parse", "HEAD", cwd=appliance_remote.author_clone)
    assert str(error.value) == (
        f"{checkout}: branch 'main' and origin/main have diverged (local {local[:12]}, remote {remote[:12]}); "
        f"nothing was changed. Rebase or reset the checkout by hand (git -C {checkout} status)"
    )
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


def test_branch_without_upstream_deploys_local_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkout with no remote (a laptop experiment) is built as it is, not refused."""
    checkout = tmp_path / "solo"
    checkout.mkdir()
    git("init", "-q", "-b", "main", cwd=checkout)
    git("-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init", cwd=checkout)
    head = git("rev-parse", "HEAD", cwd=checkout)
    with caplog.at_level(logging.INFO, logger="elt.git_repo"):
        deployed = update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))
    assert deployed == Deployed(str(checkout), checkout, "main", head, head)
    assert not deployed.changed
    assert f"{checkout}: branch 'main' tracks no remote branch; deploying local HEAD {head[:12]}" in caplog.messages


def test_local_commits_ahead_of_upstream_are_deployed_as_they_are(
    appliance_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit made on the VM and not pushed yet: built as it is (nothing to fast-forward), with a
    warning naming how many commits upstream lacks; the commit reported is the local one."""
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    for name in ("a", "b"):
        (checkout / f"{name}.txt").write_text(name)
        git("add", f"{name}.txt", cwd=checkout)
        git("-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-q", "-m", name, cwd=checkout)
    head = git("rev-parse", "HEAD", cwd=checkout)
    with caplog.at_level(logging.INFO, logger="elt.git_repo"):
        deployed = update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))
    assert deployed == Deployed(str(appliance_remote.bare), checkout, "main", head, head)
    assert f"{checkout}: 2 local commit(s) not on origin/main; deploying local HEAD" in caplog.messages


def test_a_fast_forward_reports_the_repo_fetched_and_both_commits(
    appliance_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    before = git("rev-parse", "HEAD", cwd=checkout)
    pushed = appliance_remote.commit("pushed.txt", "pushed\n", "a push")
    with caplog.at_level(logging.INFO, logger="elt.git_repo"):
        deployed = update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))
    assert deployed == Deployed(str(appliance_remote.bare), checkout, "main", pushed, before)
    assert f"{checkout}: fast-forwarded {before[:12]} → {pushed[:12]}" in caplog.messages


def test_a_failed_fetch_names_the_remote_fetched_not_the_checkout(appliance_remote: GitRemote, tmp_path: Path) -> None:
    url = _url_nothing_listens_on()
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    git("remote", "set-url", "origin", url, cwd=checkout)
    with pytest.raises(GitRemoteUnreachable) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))
    assert str(error.value).startswith(f"git fetch of {url} failed: ")


def test_wrong_branch_is_refused(appliance_remote: GitRemote, tmp_path: Path) -> None:
    checkout = appliance_remote.clone(tmp_path / "vm-checkout")
    with pytest.raises(GitError) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(checkout), branch="release"))
    assert str(error.value) == (
        f"{checkout}: on branch 'main', but 'release' is to be deployed; "
        f"switch with git -C {checkout} switch release, or set ELT_GIT_BRANCH"
    )


def test_token_never_appears_in_errors(monkeypatch: pytest.MonkeyPatch, appliance_env: Path) -> None:
    """A failed clone over HTTPS with ELT_GIT_TOKEN set reports the URL and the cause, never the token."""
    monkeypatch.setenv("ELT_GIT_TOKEN", "ghp_TOPSECRET123")
    source = RepoSource.from_settings(load_settings(), repo="https://git.invalid/team/analytics.git")
    with pytest.raises(GitRemoteUnreachable) as error:
        update_code(source)
    assert error.value.transient
    assert "ghp_TOPSECRET123" not in str(error.value)
    assert "git.invalid/team/analytics.git" in str(error.value)


def test_credentials_in_a_repo_parameter_are_refused(appliance_env: Path) -> None:
    """A URL with a token in it would be stored in Prefect's flow-run parameters and the checkout's
    git config: the repo parameter (flow or --repo) is refused, naming ELT_GIT_TOKEN, token masked."""
    with pytest.raises(ConfigurationError) as error:
        RepoSource.from_settings(load_settings(), repo="https://deploy:ghp_TOPSECRET123@git.example/team/analytics.git")
    assert str(error.value) == (
        "repo: https://***@git.example/team/analytics.git has credentials written into it; remove them from the URL "
        "and set ELT_GIT_TOKEN (and ELT_GIT_USERNAME if your host needs a user name) instead"
    )


class _DenyingGitHost(BaseHTTPRequestHandler):
    """An HTTPS-style git host that refuses every request with 401 and records what it was sent."""

    authorizations: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.authorizations.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_refused_credentials_name_the_token_setting(monkeypatch: pytest.MonkeyPatch, appliance_env: Path) -> None:
    """A real git clone over HTTP against a host answering 401: ELT_GIT_USERNAME and ELT_GIT_TOKEN
    reach the host through GIT_ASKPASS, and the refusal is a configuration error naming the
    settings, without the token."""
    monkeypatch.setenv("ELT_GIT_TOKEN", "ghp_TOPSECRET123")
    monkeypatch.setenv("ELT_GIT_USERNAME", "deploy-bot")
    _DenyingGitHost.authorizations = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DenyingGitHost)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/team/analytics.git"
        with pytest.raises(ConfigurationError) as error:
            update_code(RepoSource.from_settings(load_settings(), repo=url))
    finally:
        server.shutdown()
    message = str(error.value)
    assert message.startswith(f"git clone of {url} failed: ")
    assert message.endswith("(check ELT_GIT_TOKEN or ELT_GIT_SSH_KEY_PATH)")
    assert "ghp_TOPSECRET123" not in message
    sent = "Basic " + base64.b64encode(b"deploy-bot:ghp_TOPSECRET123").decode()
    assert sent in _DenyingGitHost.authorizations


def _two_remotes_named_analytics(tmp_path: Path) -> tuple[GitRemote, GitRemote]:
    """Two unrelated bare repos, both called analytics.git, in different folders."""
    remotes = []
    for team, project in (("team-a", REPO_ROOT / "dbt"), ("team-b", TINY_PROJECT)):
        root = tmp_path / team
        root.mkdir()
        remote = make_remote(root, project)
        bare = remote.bare.rename(root / "analytics.git")
        git("remote", "set-url", "origin", str(bare), cwd=remote.author_clone)
        remotes.append(GitRemote(bare, remote.author_clone))
    return remotes[0], remotes[1]


def test_two_repos_with_the_same_name_never_share_a_checkout(appliance_env: Path, tmp_path: Path) -> None:
    """--repo /a/analytics.git, then --repo /b/analytics.git: the second run deploys B's commit from
    its own folder and names B as where it came from; A's checkout is left as it was."""
    team_a, team_b = _two_remotes_named_analytics(tmp_path)
    settings = load_settings()
    from_a = update_code(RepoSource.from_settings(settings, repo=str(team_a.bare)))
    from_b = update_code(RepoSource.from_settings(settings, repo=str(team_b.bare)))

    assert from_a.checkout != from_b.checkout
    assert from_b.sha == git("rev-parse", "HEAD", cwd=team_b.author_clone) != from_a.sha
    assert from_b.repo == str(team_b.bare)
    assert (from_b.checkout / "dbt" / "seeds" / "orders.csv").is_file()
    assert git("rev-parse", "HEAD", cwd=from_a.checkout) == from_a.sha
    assert not (from_a.checkout / "dbt" / "seeds" / "orders.csv").exists()


def test_checkout_from_before_folders_were_keyed_keeps_working(appliance_env: Path, tmp_path: Path) -> None:
    """Upgrade: data/repos/analytics cloned by an older version is still used while its origin is the
    configured repo; a same-named folder cloned from another repo is not."""
    team_a, team_b = _two_remotes_named_analytics(tmp_path)
    legacy = appliance_env / "data" / "repos" / "analytics"
    legacy.parent.mkdir(parents=True)
    team_a.clone(legacy)
    pushed = team_a.commit("dbt/models/marts/new_model.sql", "select 1 as id\n", "add a model")
    settings = load_settings()

    source_a = RepoSource.from_settings(settings, repo=str(team_a.bare))
    assert source_a.checkout == legacy
    assert update_code(source_a).sha == pushed

    source_b = RepoSource.from_settings(settings, repo=str(team_b.bare))
    assert source_b.checkout != legacy
    assert update_code(source_b).sha == git("rev-parse", "HEAD", cwd=team_b.author_clone)
    assert git("rev-parse", "HEAD", cwd=legacy) == pushed


def test_checkout_of_another_repo_is_repointed_when_nothing_can_be_lost(
    monkeypatch: pytest.MonkeyPatch,
    appliance_remote: GitRemote,
    appliance_env: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ELT_GIT_CHECKOUT_DIR holds a clean clone of the old repo; the configured repo (a move of it,
    with one more commit) has its HEAD: origin is re-pointed and the new repo's commit deployed."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    moved = tmp_path / "moved" / "analytics.git"
    moved.parent.mkdir()
    git("clone", "-q", "--bare", str(appliance_remote.bare), str(moved), cwd=tmp_path)
    git("push", "-q", str(moved), "HEAD:main", cwd=appliance_remote.author_clone)
    git("remote", "set-url", "origin", str(moved), cwd=appliance_remote.author_clone)
    pushed = appliance_remote.commit("moved.txt", "moved\n", "first commit after the move")
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))

    with caplog.at_level(logging.INFO, logger="elt.git_repo"):
        deployed = update_code(RepoSource.from_settings(load_settings(), repo=str(moved)))

    assert deployed.sha == pushed
    assert deployed.repo == str(moved)
    assert git("remote", "get-url", "origin", cwd=checkout) == str(moved)
    assert git("for-each-ref", "refs/elt-candidate/", cwd=checkout) == ""
    assert (
        f"{checkout}: re-pointed origin from {appliance_remote.bare} to the configured repo {moved} (clean, and HEAD is on it)"
    ) in caplog.messages


def test_an_unreachable_configured_repo_is_named_when_checking_another_repos_checkout(
    monkeypatch: pytest.MonkeyPatch, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    checkout = appliance_remote.clone(tmp_path / "checkout")
    missing = tmp_path / "moved" / "analytics.git"
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    before = _snapshot(checkout)
    with pytest.raises(GitError) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(missing)))
    assert str(error.value).startswith(f"git fetch of {missing} failed: fatal: "), str(error.value)
    assert _snapshot(checkout) == before
    assert git("remote", "get-url", "origin", cwd=checkout) == str(appliance_remote.bare)


def test_checkout_of_another_repo_is_never_deployed(monkeypatch: pytest.MonkeyPatch, appliance_env: Path, tmp_path: Path) -> None:
    """ELT_GIT_CHECKOUT_DIR holds A's clone but B is configured and shares no history: the run stops
    naming both repos and the fix; the checkout, its origin and its files are as they were."""
    team_a, team_b = _two_remotes_named_analytics(tmp_path)
    checkout = team_a.clone(tmp_path / "checkout")
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    before = _snapshot(checkout)

    with pytest.raises(GitOriginMismatch) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(team_b.bare)))

    head = before[0]
    assert str(error.value) == (
        f"{checkout} is a checkout of {team_a.bare}, not of the configured repo {team_b.bare}, "
        f"and its HEAD {head[:12]} is on no branch of {team_b.bare}; nothing was deployed. "
        f"Move the folder away so all-etl clones {team_b.bare} afresh, or set ELT_GIT_REPO back to {team_a.bare}"
    )
    assert _snapshot(checkout) == before
    assert git("remote", "get-url", "origin", cwd=checkout) == str(team_a.bare)
    assert git("for-each-ref", "refs/elt-candidate/", cwd=checkout) == ""


def test_dirty_checkout_of_another_repo_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """Even when the configured repo has the same history, uncommitted edits in a checkout of
    another repo stop the run before anything is fetched or re-pointed."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    mirror = tmp_path / "mirror" / "analytics.git"
    mirror.parent.mkdir()
    git("clone", "-q", "--bare", str(appliance_remote.bare), str(mirror), cwd=tmp_path)
    model = checkout / "dbt" / "models" / "marts" / "daily_revenue.sql"
    model.write_text(model.read_text() + "\n-- hotfix on the VM\n")
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    before = _snapshot(checkout)

    with pytest.raises(
        GitOriginMismatch,
        match=re.escape("it has uncommitted changes in dbt/models/marts/daily_revenue.sql; nothing was deployed"),
    ):
        update_code(RepoSource.from_settings(load_settings(), repo=str(mirror)))
    assert _snapshot(checkout) == before
    assert git("remote", "get-url", "origin", cwd=checkout) == str(appliance_remote.bare)


@pytest.mark.slow
def test_deployed_commit_artifact_names_the_repo_fetched(prefect_server, appliance_env: Path, tmp_path: Path) -> None:
    """The update-code flow's deployed-commit artifact, read back from a real Prefect server, names
    the repo the commit came from: B after switching from A to a same-named B."""
    from elt.flows import update_code as update_code_flow

    team_a, team_b = _two_remotes_named_analytics(tmp_path)
    update_code_flow(repo=str(team_a.bare))
    deployed = update_code_flow(repo=str(team_b.bare))

    (latest, *_) = prefect_server.artifacts("deployed-commit")
    (row,) = json.loads(latest["data"]) if isinstance(latest["data"], str) else latest["data"]
    assert (row["commit"], row["branch"], row["repo"]) == (deployed.sha, "main", str(team_b.bare))


def test_unreachable_remote_is_transient_and_keeps_the_checkout(
    monkeypatch: pytest.MonkeyPatch, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """The configured remote refuses connections (nothing listens on its port): the error is
    transient (Prefect's retry may succeed), names the URL, and the checkout keeps its commit and
    files, so --skip-pull still builds it."""
    url = _url_nothing_listens_on()
    checkout = appliance_remote.clone(tmp_path / "checkout")
    git("remote", "set-url", "origin", url, cwd=checkout)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    before = _snapshot(checkout)

    with pytest.raises(GitRemoteUnreachable) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=url))

    assert error.value.transient
    assert str(error.value).startswith(f"git fetch of {url} failed: ")
    assert _snapshot(checkout) == before


def test_reachable_remote_is_named_without_its_credentials(tiny_remote: GitRemote, tmp_path: Path) -> None:
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare))
    assert check_reachable(source) == f"{tiny_remote.bare} reachable"
    checkout = tiny_remote.clone(tmp_path / "checkout")
    assert check_reachable(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout))) == (
        f"{tiny_remote.bare} reachable"  # a checkout: the remote its branch tracks
    )
    git("checkout", "-q", "-b", "local-only", cwd=checkout)
    assert check_reachable(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout))) == (
        f"{checkout}: no upstream branch; all-etl deploys local HEAD"
    )


def test_unreachable_remote_is_a_git_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-remote.git"
    with pytest.raises(GitError) as error:
        check_reachable(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(missing)))
    assert str(error.value).startswith(f"git ls-remote of {missing} failed: fatal: ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("stderr", "kind", "advice"),
    [
        ("fatal: Authentication failed for 'https://git.example/x.git/'", ConfigurationError, True),
        ("git@github.com: Permission denied (publickey).", ConfigurationError, True),
        ("fatal: could not read Username for 'https://git.example': terminal prompts disabled", ConfigurationError, True),
        (
            "remote: Write access to repository not granted.\nfatal: unable to access: The requested URL returned error: 403",
            ConfigurationError,
            True,
        ),
        (
            "fatal: unable to access 'https://git.example/x.git/': Could not resolve host: git.example",
            GitRemoteUnreachable,
            False,
        ),
        ("ssh: Could not resolve hostname git.example: Name or service not known", GitRemoteUnreachable, False),
        ("ssh: connect to host git.example port 22: Connection refused", GitRemoteUnreachable, False),
        ("ssh: connect to host git.example port 22: Connection timed out", GitRemoteUnreachable, False),
        ("fatal: repository 'https://git.example/x.git/' not found", GitError, False),
    ],
)
def test_remote_failures_are_told_apart(stderr: str, kind: type, advice: bool) -> None:
    """Credentials to fix, a network to wait for (transient), or anything else."""
    source = RepoSource.from_settings(load_settings(git_token="tok-SECRET-123"), repo="https://git.example/x.git")
    failure = _remote_error(gitpython.GitCommandError(["git", "fetch"], 128, stderr), source, "fetch")
    assert type(failure) is kind
    one_line = " | ".join(line.strip().strip("'") for line in stderr.splitlines())
    expected = f"git fetch of https://git.example/x.git failed: {one_line}"
    assert str(failure) == expected + (" (check ELT_GIT_TOKEN or ELT_GIT_SSH_KEY_PATH)" if advice else "")


def test_git_error_without_output_gives_its_exit_code_and_long_output_its_end() -> None:
    source = RepoSource.from_settings(load_settings(), repo="https://git.example/x.git")
    silent = _remote_error(gitpython.GitCommandError(["git", "fetch"], 128, ""), source, "fetch")
    assert str(silent) == "git fetch of https://git.example/x.git failed: exit code 128"
    noisy = _remote_error(gitpython.GitCommandError(["git", "fetch"], 1, "a" * 300 + "\n\n  " + "X" * 300), source, "fetch")
    assert str(noisy) == "git fetch of https://git.example/x.git failed: " + ("a" * 300 + " | " + "X" * 300)[-500:]


def test_token_in_git_output_is_scrubbed(tmp_path: Path) -> None:
    """git may echo the token anywhere in its output, not only inside a URL."""
    source = RepoSource.from_settings(load_settings(git_token="tok-SECRET-123"), repo="https://git.example/x.git")
    failure = _remote_error(
        gitpython.GitCommandError(["git", "fetch"], 128, "fatal: bad credential tok-SECRET-123 for x"), source, "fetch"
    )
    assert str(failure) == "git fetch of https://git.example/x.git failed: fatal: bad credential *** for x"


def test_check_checkout_refuses_a_folder_in_the_way_and_accepts_an_empty_one(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    source = RepoSource.from_settings(settings, repo="https://git.example/x.git")
    check_checkout(source, will_pull=True)  # nothing there yet: update-code clones
    source.checkout.mkdir(parents=True)
    check_checkout(source, will_pull=True)
    (source.checkout / "notes.txt").write_text("mine")
    with pytest.raises(GitError) as error:
        check_checkout(source, will_pull=True)
    assert str(error.value) == f"{source.checkout} exists and is not a git checkout; move it away or set ELT_GIT_CHECKOUT_DIR"


def test_check_checkout_refuses_what_update_code_would(tiny_remote: GitRemote, tmp_path: Path) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout))
    check_checkout(source, will_pull=True)
    (checkout / "dbt" / "dbt_project.yml").write_text("edited on the VM\n")
    with pytest.raises(GitDirtyTree):
        check_checkout(source, will_pull=True)
    check_checkout(source, will_pull=False)  # --skip-pull builds the tree as it is


def test_check_checkout_refuses_a_checkout_of_another_repo_before_the_run(
    monkeypatch: pytest.MonkeyPatch, appliance_remote: GitRemote, appliance_env: Path, tmp_path: Path
) -> None:
    """The run's preflight, without the network: --skip-pull on another repo's checkout would
    build that repo, and uncommitted edits there would be lost to a re-point; both refused with
    the message naming both repos. A clean one with a pull ahead is left to update-code, which
    re-points it only when its HEAD is on the configured repo."""
    checkout = appliance_remote.clone(tmp_path / "checkout")
    mirror = tmp_path / "mirror" / "analytics.git"
    mirror.parent.mkdir()
    git("clone", "-q", "--bare", str(appliance_remote.bare), str(mirror), cwd=tmp_path)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    source = RepoSource.from_settings(load_settings(), repo=str(mirror))
    fix = (
        f"nothing was deployed. Move the folder away so all-etl clones {mirror} afresh, "
        f"or set ELT_GIT_REPO back to {appliance_remote.bare}"
    )

    check_checkout(source, will_pull=True)
    with pytest.raises(GitOriginMismatch) as error:
        check_checkout(source, will_pull=False)
    assert str(error.value) == (
        f"{checkout} is a checkout of {appliance_remote.bare}, not of the configured repo {mirror}, "
        f"and --skip-pull would build it as it is; {fix}"
    )

    for name in ("dbt/dbt_project.yml", "dbt/models/marts/daily_revenue.sql"):
        (checkout / name).write_text((checkout / name).read_text() + "\n# edited on the VM\n")
    with pytest.raises(GitOriginMismatch) as error:
        check_checkout(source, will_pull=True)
    assert str(error.value) == (
        f"{checkout} is a checkout of {appliance_remote.bare}, not of the configured repo {mirror}, "
        f"and it has uncommitted changes in dbt/dbt_project.yml, dbt/models/marts/daily_revenue.sql; {fix}"
    )


@pytest.mark.parametrize(
    ("location", "canonical"),
    [
        ("https://user:secret@GitHub.com/acme/analytics.git/", "https://github.com/acme/analytics"),
        ("https://github.com/acme/analytics", "https://github.com/acme/analytics"),
        ("HTTPS://github.com:8443/acme/analytics.git", "https://github.com:8443/acme/analytics"),
        ("git@github.com:acme/analytics.git", "ssh://github.com/acme/analytics"),
        ("git@github.com:/acme/analytics", "ssh://github.com/acme/analytics"),
        ("ssh://git@github.com/acme/analytics.git", "ssh://github.com/acme/analytics"),
        ("https://github.com/acme/analytics.github.io", "https://github.com/acme/analytics.github.io"),
        ("git@git.example:team/odd:name.git", "ssh://git.example/team/odd:name"),
        ("git@git.example:Xteam/analytics.git", "ssh://git.example/Xteam/analytics"),
    ],
)
def test_the_same_repo_written_differently_has_one_canonical_location(location: str, canonical: str) -> None:
    """What origin checks compare: a checkout of the same repo is never taken for another's, and
    the credentials in a URL never become part of what identifies it."""
    assert canonical_location(location) == canonical


def test_local_repos_are_identified_by_their_absolute_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "repos" / "analytics.git").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "repos")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = str(tmp_path / "repos" / "analytics.git")
    for written in (
        "repos/analytics.git",
        "~/repos/analytics.git",
        "link/analytics.git",
        f"file://{tmp_path}/repos/analytics.git",
    ):
        assert canonical_location(written) == expected, written
    assert canonical_location("repos/other.git") != expected


# --------------------------------------------------------------------------- what each message and log line says


@pytest.mark.parametrize(
    ("repo", "shown"),
    [
        ("https://ghp_TOPSECRET123@git.example/team/analytics.git", "https://***@git.example/team/analytics.git"),
        ("HTTPS://deploy:ghp_TOPSECRET123@git.example/team/analytics.git", "HTTPS://***@git.example/team/analytics.git"),
        ("http://ghp_TOPSECRET123@git.example/team/analytics.git", "http://***@git.example/team/analytics.git"),
        ("ssh://deploy:ghp_TOPSECRET123@git.example/team/analytics.git", "ssh://***@git.example/team/analytics.git"),
    ],
)
def test_every_url_with_a_credential_is_refused_with_the_credential_masked(repo: str, shown: str) -> None:
    """A token alone as the user name (https://TOKEN@host), an upper-case scheme, and a password
    over SSH are credentials too; the message never shows them."""
    with pytest.raises(ConfigurationError) as error:
        RepoSource.from_settings(load_settings(), repo=repo)
    assert str(error.value) == (
        f"repo: {shown} has credentials written into it; remove them from the URL "
        "and set ELT_GIT_TOKEN (and ELT_GIT_USERNAME if your host needs a user name) instead"
    )


def test_a_user_name_alone_over_ssh_is_not_a_credential(tmp_path: Path) -> None:
    for repo in ("ssh://git@git.example/team/analytics.git", "git@git.example:team/analytics.git"):
        assert RepoSource.from_settings(load_settings(home=tmp_path), repo=repo).location == repo


def test_scrubbed_and_shown_locations_never_carry_a_credential() -> None:
    """scrub_location (messages: credentials masked) and shown_location (the deployed repo:
    credentials dropped) over every transport; a user name alone over SSH stays."""
    for url, scrubbed, shown in [
        ("https://deploy:tok123@git.example/a.git", "https://***@git.example/a.git", "https://git.example/a.git"),
        ("HTTPS://tok123@git.example/a.git", "HTTPS://***@git.example/a.git", "HTTPS://git.example/a.git"),
        ("ssh://deploy:tok123@git.example/a.git", "ssh://***@git.example/a.git", "ssh://git.example/a.git"),
        ("ssh://git@git.example/a.git", "ssh://git@git.example/a.git", "ssh://git@git.example/a.git"),
        ("https://git.example:8443/a.git", "https://git.example:8443/a.git", "https://git.example:8443/a.git"),
    ]:
        assert (scrub_location(url), shown_location(url)) == (scrubbed, shown), url
    assert scrub_location("fatal: unable to access 'https://deploy:tok123@git.example/a.git/': 403") == (
        "fatal: unable to access 'https://***@git.example/a.git/': 403"
    )


def test_repo_comes_from_ELT_GIT_REPO_and_the_ssh_key_from_ELT_GIT_SSH_KEY_PATH(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path
) -> None:
    """Without a repo parameter the configured repo is cloned; a relative key path is read from
    ELT_HOME, and a key that is not there stops the run naming the variable and the file."""
    monkeypatch.setenv("ELT_GIT_REPO", str(tiny_remote.bare))
    monkeypatch.setenv("ELT_GIT_SSH_KEY_PATH", "keys/deploy_key")
    source = RepoSource.from_settings(load_settings(home=tmp_path))
    assert (source.location, source.managed) == (str(tiny_remote.bare), True)
    assert source.ssh_key_path == tmp_path / "keys" / "deploy_key"
    with pytest.raises(ConfigurationError) as error:
        update_code(source)
    assert str(error.value) == f"ELT_GIT_SSH_KEY_PATH: {tmp_path / 'keys' / 'deploy_key'} does not exist"
    assert not source.checkout.exists()


def test_without_ELT_GIT_REPO_the_checkout_holding_ELT_HOME_is_used_in_place(tiny_remote: GitRemote, tmp_path: Path) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    source = RepoSource.from_settings(load_settings(home=checkout / "dbt"))
    assert source == RepoSource(str(checkout), checkout, None)
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    with pytest.raises(ConfigurationError) as error:
        RepoSource.from_settings(load_settings(home=outside))
    assert str(error.value) == (
        f"{outside} is not inside a git checkout; set ELT_GIT_REPO to the repo that holds the dbt project"
    )


@pytest.mark.parametrize(
    ("repo", "name"),
    [
        ("https://git.example/team/analytics.git/", "analytics"),
        ("git@git.example:analytics.git", "analytics"),
        ("https://git.example/team/ELX", "ELX"),
        ("https://git.example/.git", "project"),
    ],
)
def test_a_remote_repo_is_cloned_into_a_folder_named_after_it(repo: str, name: str, tmp_path: Path) -> None:
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=repo)
    digest = hashlib.sha256(canonical_location(repo).encode()).hexdigest()[:8]
    assert source.checkout == tmp_path / "data" / "repos" / f"{name}-{digest}"


def test_a_folder_without_an_origin_is_not_taken_for_an_older_checkout(tiny_remote: GitRemote, tmp_path: Path) -> None:
    legacy = tmp_path / "data" / "repos" / "remote"
    legacy.parent.mkdir(parents=True)
    tiny_remote.clone(legacy)
    git("remote", "remove", "origin", cwd=legacy)
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare))
    assert source.checkout.parent == legacy.parent and source.checkout != legacy


def test_first_clone_is_logged_and_takes_the_configured_branch(
    tiny_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    git("push", "-q", "origin", "HEAD:release", cwd=tiny_remote.author_clone)
    released = tiny_remote.commit("release.txt", "r\n", "on release only")
    git("push", "-q", "origin", "HEAD:release", cwd=tiny_remote.author_clone)
    git("reset", "-q", "--hard", "HEAD~1", cwd=tiny_remote.author_clone)
    git("push", "-q", "-f", "origin", "HEAD:main", cwd=tiny_remote.author_clone)
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare), branch="release")
    with caplog.at_level(logging.INFO, logger="elt.git_repo"):
        deployed = update_code(source)
    assert (deployed.branch, deployed.sha, deployed.previous_sha) == ("release", released, None)
    assert caplog.messages == [f"Cloning {tiny_remote.bare} into {source.checkout}"]


def test_a_folder_in_the_way_is_never_cloned_over(tmp_path: Path) -> None:
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo="https://git.example/x.git")
    source.checkout.mkdir(parents=True)
    (source.checkout / "notes.txt").write_text("mine")
    with pytest.raises(GitError) as error:
        update_code(source)
    assert str(error.value) == f"{source.checkout} exists and is not a git checkout; move it away or set ELT_GIT_CHECKOUT_DIR"
    assert [path.name for path in source.checkout.iterdir()] == ["notes.txt"]


def test_a_second_run_on_its_own_clone_neither_repoints_nor_refuses(
    tiny_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(home=tmp_path)
    update_code(RepoSource.from_settings(settings, repo=str(tiny_remote.bare)))
    pushed = tiny_remote.commit("next.txt", "n\n", "next")
    source = RepoSource.from_settings(settings, repo=str(tiny_remote.bare))
    check_checkout(source, will_pull=False)
    with caplog.at_level(logging.WARNING, logger="elt.git_repo"):
        assert update_code(source).sha == pushed
    assert caplog.messages == []


def _commit_files(checkout: Path, names: list[str]) -> None:
    for name in names:
        (checkout / name).write_text(f"{name}\n")
    git("add", *names, cwd=checkout)
    git("commit", "-q", "-m", "files", cwd=checkout)


@pytest.mark.parametrize(("count", "listed", "more"), [(2, 2, ""), (10, 10, ""), (11, 10, " …")])
def test_dirty_tree_message_names_the_first_ten_files(tmp_path: Path, count: int, listed: int, more: str) -> None:
    checkout = tmp_path / "solo"
    checkout.mkdir()
    git("init", "-q", "-b", "main", cwd=checkout)
    _identify_checkout(checkout)
    names = [f"model_{index:02d}.sql" for index in range(count)]
    _commit_files(checkout, names)
    for name in names:
        (checkout / name).write_text("edited on the VM\n")
    with pytest.raises(GitDirtyTree) as error:
        update_code(RepoSource.from_settings(load_settings(), repo=str(checkout)))
    assert str(error.value) == (
        f"{checkout} has uncommitted changes in {', '.join(names[:listed])}{more}: "
        "commit or stash them (nothing was pulled), or run with --skip-pull"
    )


def _identify_checkout(checkout: Path) -> None:
    git("config", "user.email", "tests@example.invalid", cwd=checkout)
    git("config", "user.name", "tests", cwd=checkout)


def test_a_dirty_checkout_of_another_repo_names_its_first_five_changed_files(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path
) -> None:
    names = [f"model_{index}.sql" for index in range(6)]
    _commit_files(tiny_remote.author_clone, names)
    git("push", "-q", "origin", "HEAD:main", cwd=tiny_remote.author_clone)
    checkout = tiny_remote.clone(tmp_path / "checkout")
    mirror = tmp_path / "mirror.git"
    git("clone", "-q", "--bare", str(tiny_remote.bare), str(mirror), cwd=tmp_path)
    for name in names:
        (checkout / name).write_text("edited on the VM\n")
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(mirror))
    expected = (
        f"{checkout} is a checkout of {tiny_remote.bare}, not of the configured repo {mirror}, "
        f"and it has uncommitted changes in {', '.join(names[:5])}; nothing was deployed. "
        f"Move the folder away so all-etl clones {mirror} afresh, or set ELT_GIT_REPO back to {tiny_remote.bare}"
    )
    for refuse in (lambda: check_checkout(source, will_pull=True), lambda: update_code(source)):
        with pytest.raises(GitOriginMismatch) as error:
            refuse()
        assert str(error.value) == expected


def test_untracked_files_do_not_stop_a_pull(tiny_remote: GitRemote, tmp_path: Path) -> None:
    """A file git does not track (notes, a local profile) is not an uncommitted change: the pull goes on."""
    checkout = tiny_remote.clone(tmp_path / "checkout")
    (checkout / "notes.txt").write_text("mine\n")
    pushed = tiny_remote.commit("pushed.txt", "p\n", "a push")
    assert update_code(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout))).sha == pushed
    assert (checkout / "notes.txt").read_text() == "mine\n"


def test_an_untracked_file_the_pull_would_overwrite_stops_it(tiny_remote: GitRemote, tmp_path: Path) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    before = git("rev-parse", "HEAD", cwd=checkout)
    (checkout / "new_model.sql").write_text("mine\n")
    pushed = tiny_remote.commit("new_model.sql", "theirs\n", "a push")
    with pytest.raises(GitError) as error:
        update_code(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout)))
    assert str(error.value).startswith(f"{checkout}: fast-forward to {pushed[:12]} refused: error: ")
    assert "new_model.sql" in str(error.value) and "\n" not in str(error.value)
    assert (checkout / "new_model.sql").read_text() == "mine\n"
    assert git("rev-parse", "HEAD", cwd=checkout) == before


def test_the_pull_is_a_fast_forward_even_where_git_is_set_to_merge(tiny_remote: GitRemote, tmp_path: Path) -> None:
    """merge.ff=false in the checkout's config would make a merge commit: the deployed commit is upstream's."""
    checkout = tiny_remote.clone(tmp_path / "checkout")
    git("config", "merge.ff", "false", cwd=checkout)
    pushed = tiny_remote.commit("pushed.txt", "p\n", "a push")
    deployed = update_code(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout)))
    assert deployed.sha == pushed == git("rev-parse", "HEAD", cwd=checkout)


def test_a_detached_head_is_refused_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path
) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    git("checkout", "-q", "--detach", cwd=checkout)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare))
    with pytest.raises(GitError) as error:
        check_checkout(source, will_pull=True)
    assert str(error.value) == f"{checkout}: HEAD is detached; check out a branch (git -C {checkout} switch <branch>)"
    assert check_reachable(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout))) == (
        f"{checkout}: no upstream branch; all-etl deploys local HEAD"
    )


def test_a_branch_tracking_a_remote_not_called_origin_is_fetched_from_it(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    git("remote", "rename", "origin", "upstream", cwd=checkout)
    pushed = tiny_remote.commit("pushed.txt", "p\n", "a push")
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare))
    check_checkout(source, will_pull=False)
    with caplog.at_level(logging.WARNING, logger="elt.git_repo"):
        assert update_code(source).sha == pushed
    assert caplog.messages == []
    assert git("remote", cwd=checkout) == "upstream"


def test_a_branch_without_upstream_in_the_configured_repos_clone_is_deployed_as_it_is(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    git("branch", "--unset-upstream", cwd=checkout)
    head = git("rev-parse", "HEAD", cwd=checkout)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    with caplog.at_level(logging.INFO, logger="elt.git_repo"):
        deployed = update_code(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare)))
    assert (deployed.sha, deployed.previous_sha) == (head, head)
    assert caplog.messages == [f"{checkout}: branch 'main' tracks no remote branch; deploying local HEAD {head[:12]}"]
    assert git("remote", cwd=checkout) == "origin"


def test_a_checkout_without_a_remote_gets_the_configured_repo_as_origin(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A clean checkout with no remote whose HEAD is on the configured repo: origin is added, the
    warning says so, and the checkout's commit is deployed (its branch tracks nothing yet)."""
    checkout = tiny_remote.clone(tmp_path / "checkout")
    git("remote", "remove", "origin", cwd=checkout)
    head = git("rev-parse", "HEAD", cwd=checkout)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    source = RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare))
    with pytest.raises(GitOriginMismatch) as error:
        check_checkout(source, will_pull=False)
    assert str(error.value).startswith(
        f"{checkout} is a checkout of (no remote), not of the configured repo {tiny_remote.bare}, "
        "and --skip-pull would build it as it is;"
    )
    with caplog.at_level(logging.WARNING, logger="elt.git_repo"):
        assert update_code(source).sha == head
    assert git("remote", "get-url", "origin", cwd=checkout) == str(tiny_remote.bare)
    assert caplog.messages == [
        f"{checkout}: re-pointed origin from (no remote) to the configured repo {tiny_remote.bare} (clean, and HEAD is on it)"
    ]


def test_a_refused_checkout_of_another_repo_gets_none_of_its_refs_or_tags(
    monkeypatch: pytest.MonkeyPatch, appliance_env: Path, tmp_path: Path
) -> None:
    team_a, team_b = _two_remotes_named_analytics(tmp_path)
    git("tag", "v-team-b", cwd=team_b.author_clone)
    git("push", "-q", "origin", "v-team-b", cwd=team_b.author_clone)
    checkout = team_a.clone(tmp_path / "checkout")
    refs = git("for-each-ref", "--format=%(refname)", cwd=checkout)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    with pytest.raises(GitOriginMismatch):
        update_code(RepoSource.from_settings(load_settings(), repo=str(team_b.bare)))
    assert git("for-each-ref", "--format=%(refname)", cwd=checkout) == refs


def test_a_checkout_with_credentials_in_its_origin_is_named_without_them(
    monkeypatch: pytest.MonkeyPatch, tiny_remote: GitRemote, tmp_path: Path
) -> None:
    """Cloned before such URLs were refused: the message names the repo, not the token."""
    checkout = tiny_remote.clone(tmp_path / "checkout")
    git("remote", "set-url", "origin", "https://deploy:ghp_TOPSECRET123@git.example/team/old.git", cwd=checkout)
    monkeypatch.setenv("ELT_GIT_CHECKOUT_DIR", str(checkout))
    with pytest.raises(GitOriginMismatch) as error:
        check_checkout(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(tiny_remote.bare)), will_pull=False)
    assert str(error.value).startswith(f"{checkout} is a checkout of https://git.example/team/old.git, not of")
    assert "TOPSECRET" not in str(error.value)


def test_reachability_is_checked_against_the_remote_the_branch_tracks(tiny_remote: GitRemote, tmp_path: Path) -> None:
    checkout = tiny_remote.clone(tmp_path / "checkout")
    missing = tmp_path / "moved-away.git"
    git("remote", "set-url", "origin", str(missing), cwd=checkout)
    with pytest.raises(GitError) as error:
        check_reachable(RepoSource.from_settings(load_settings(home=tmp_path), repo=str(checkout)))
    assert str(error.value).startswith(f"git ls-remote of {missing} failed: fatal: ")


def test_reachability_check_sends_the_configured_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """doctor's ls-remote against a host answering 401: the token reaches it through GIT_ASKPASS,
    and the refusal names the settings."""
    monkeypatch.setenv("ELT_GIT_TOKEN", "ghp_TOPSECRET123")
    _DenyingGitHost.authorizations = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DenyingGitHost)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/team/analytics.git"
        with pytest.raises(ConfigurationError) as error:
            check_reachable(RepoSource.from_settings(load_settings(home=tmp_path), repo=url))
    finally:
        server.shutdown()
    assert str(error.value).startswith(f"git ls-remote of {url} failed: ")
    assert str(error.value).endswith("(check ELT_GIT_TOKEN or ELT_GIT_SSH_KEY_PATH)")
    assert "Basic " + base64.b64encode(b"x-access-token:ghp_TOPSECRET123").decode() in _DenyingGitHost.authorizations
