"""Update code: fast-forward the checkout that holds the dbt project, with GitPython.

Never discards local work: a dirty tree or a diverged history stops with an error that
names the repo and what is in the way. Never deploys another repo's code: a remote repo is
cloned into a folder of its own (data/repos/<name>-<hash of its URL>), and a checkout whose
origin is not the configured repo is re-pointed only when nothing can be lost, else the run
stops. Credentials reach git through the environment (GIT_ASKPASS for a token,
GIT_SSH_COMMAND for a deploy key); a repo URL with credentials written into it is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import git

from elt.errors import ConfigurationError, TerminalError, TransientError
from elt.settings import Settings

logger = logging.getLogger(__name__)


class GitError(TerminalError):
    pass


class GitRemoteUnreachable(TransientError):
    pass


class GitDirtyTree(GitError):
    pass


class GitHistoryDiverged(GitError):
    pass


class GitOriginMismatch(GitError):
    pass


@dataclass(frozen=True)
class Deployed:
    repo: str  # the repo the commit was fetched from, without credentials
    checkout: Path
    branch: str
    sha: str
    previous_sha: str | None

    @property
    def changed(self) -> bool:
        return self.previous_sha != self.sha


@dataclass(frozen=True)
class RepoSource:
    """Where the code comes from (`location`) and where it is checked out (`checkout`).

    `managed`: the checkout is this appliance's clone of `location` (so its origin must be
    `location`), not a repo used in place.
    """

    location: str
    checkout: Path
    branch: str | None
    token: str | None = None
    ssh_key_path: Path | None = None
    username: str | None = None
    managed: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, repo: str | None = None, branch: str | None = None) -> RepoSource:
        location = refuse_credentials(repo, "repo") if repo else settings.git_repo
        branch = branch or settings.git_branch

        def source(location: str, checkout: Path, managed: bool = False) -> RepoSource:
            return cls(
                location,
                checkout,
                branch,
                token=settings.git_token.get_secret_value() if settings.git_token else None,
                ssh_key_path=settings.path(settings.git_ssh_key_path) if settings.git_ssh_key_path else None,
                username=settings.git_username,
                managed=managed,
            )

        if location is None:
            checkout = _enclosing_worktree(settings.home)
            return source(str(checkout), checkout)
        if not is_url(location):
            local = (settings.home / Path(location).expanduser()).resolve()
            if _is_worktree(local):
                return source(str(local), local)
            location = str(local)
        if settings.git_checkout_dir:
            checkout = settings.path(settings.git_checkout_dir)
        else:
            checkout = _checkout_folder(settings.path(settings.data_dir) / "repos", location)
        return source(location, checkout, managed=True)


def is_url(location: str) -> bool:
    """A URL git fetches over a transport (scheme://... or scp-like user@host:path), not a local path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location)) or bool(re.match(r"^[^/:]+:(?!//)", location))


def refuse_credentials(location: str, name: str) -> str:
    """`location` unchanged, or a ConfigurationError naming `name` when it has credentials in it."""
    problem = credentials_problem(location)
    if problem:
        raise ConfigurationError(f"{name}: {problem}")
    return location


def credentials_problem(location: str) -> str | None:
    """What is wrong with a repo URL that has a user name or password written into it: it would be
    stored in Prefect's flow-run parameters and in the checkout's git config. The URL is shown
    with the credentials masked. Over SSH a user name alone (git@host) is not a credential."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/@]*)@", location)
    if match and (match.group(1).lower() in ("http", "https") or ":" in match.group(2)):
        return (
            f"{scrub_location(location)} has credentials written into it; remove them from the URL "
            f"and set ELT_GIT_TOKEN (and ELT_GIT_USERNAME if your host needs a user name) instead"
        )
    return None


def canonical_location(location: str) -> str:
    """What identifies a repo: no credentials, no trailing '/' or '.git', scheme and host in lower
    case, scp-like `git@host:path` written as ssh://host/path, a local path absolute.

    >>> canonical_location("https://user:secret@GitHub.com/acme/analytics.git/")
    'https://github.com/acme/analytics'
    >>> canonical_location("git@github.com:acme/analytics.git")
    'ssh://github.com/acme/analytics'
    """
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if not is_url(location):
        return str(Path(location).expanduser().resolve())
    if "://" not in location:
        userhost, path = location.split(":", 1)
        location = f"ssh://{userhost}/{path.lstrip('/')}"
    parts = urlsplit(location)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    path = re.sub(r"(\.git)?/*$", "", parts.path)
    return f"{parts.scheme.lower()}://{host}{path}"


def _checkout_folder(repos: Path, location: str) -> Path:
    """data/repos/<name>-<8 hex of the canonical location>: two repos with the same name never
    share a folder. A checkout made before folders were keyed (data/repos/<name>) keeps being
    used while its origin is this repo."""
    name = re.sub(r"\.git$", "", location.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]) or "project"
    keyed = repos / f"{name}-{hashlib.sha256(canonical_location(location).encode()).hexdigest()[:8]}"
    legacy = repos / name
    if not keyed.exists() and _is_worktree(legacy) and _origin_matches(legacy, location):
        return legacy
    return keyed


def _origin_matches(checkout: Path, location: str) -> bool:
    try:
        url = git.Repo(checkout).remote("origin").url
    except (ValueError, git.GitError):
        return False
    return canonical_location(url) == canonical_location(location)


def update_code(source: RepoSource) -> Deployed:
    """Clone on first use, else fetch and fast-forward; returns the deployed commit."""
    with _credentials(source) as env:
        if source.checkout.exists() and _is_worktree(source.checkout):
            if source.managed:
                _ensure_origin_is_the_configured_repo(source, env)
            return _fast_forward(source, env)
        if source.checkout.exists() and any(source.checkout.iterdir()):
            raise _not_a_checkout(source)
        return _clone(source, env)


def check_checkout(source: RepoSource, *, will_pull: bool) -> None:
    """Raise what `update_code` would refuse that can be seen without the network: a folder in the
    way, a checkout of another repo, a detached HEAD, the wrong branch, uncommitted changes.
    With `will_pull` False (--skip-pull) only another repo's checkout is refused."""
    if not source.checkout.exists():
        return
    if not _is_worktree(source.checkout):
        if any(source.checkout.iterdir()):
            raise _not_a_checkout(source)
        return
    repo = git.Repo(source.checkout)
    fetched_from = origin_mismatch(source)
    if fetched_from and not will_pull:
        raise _mismatch(source, fetched_from, "--skip-pull would build it as it is")
    if fetched_from and _dirty_files(repo):
        raise _mismatch(source, fetched_from, f"it has uncommitted changes in {', '.join(_dirty_files(repo)[:5])}")
    if will_pull:
        _check_branch_and_tree(repo, source)


def _not_a_checkout(source: RepoSource) -> GitError:
    return GitError(f"{source.checkout} exists and is not a git checkout; move it away or set ELT_GIT_CHECKOUT_DIR")


def _clone(source: RepoSource, env: dict[str, str]) -> Deployed:
    logger.info("Cloning %s into %s", _scrub(source.location, source), source.checkout)
    try:
        # GitPython passes no --branch for None: the remote's default branch.
        repo = git.Repo.clone_from(source.location, source.checkout, env=env, branch=source.branch)
    except git.GitCommandError as exc:
        raise _remote_error(exc, source, "clone") from None
    sha = repo.head.commit.hexsha
    return Deployed(shown_location(source.location), source.checkout, repo.active_branch.name, sha, None)


def origin_mismatch(source: RepoSource) -> str | None:
    """The URL of the remote a managed checkout would fetch from, when that is not the configured repo."""
    if not source.managed or not _is_worktree(source.checkout):
        return None
    url = _fetch_url(git.Repo(source.checkout))
    if url is not None and canonical_location(url) == canonical_location(source.location):
        return None
    return shown_location(url) if url else "(no remote)"


def _ensure_origin_is_the_configured_repo(source: RepoSource, env: dict[str, str]) -> None:
    """A checkout that came from another repo is re-pointed at the configured one only when
    that provably loses nothing: no uncommitted changes, and HEAD is on a branch of the
    configured repo. Otherwise the run stops naming both repos."""
    fetched_from = origin_mismatch(source)
    if fetched_from is None:
        return
    repo = git.Repo(source.checkout)
    configured = shown_location(source.location)
    if _dirty_files(repo):
        raise _mismatch(source, fetched_from, f"it has uncommitted changes in {', '.join(_dirty_files(repo)[:5])}")
    if not _head_is_on_a_branch_of(repo, source, env):
        raise _mismatch(source, fetched_from, f"its HEAD {repo.head.commit.hexsha[:12]} is on no branch of {configured}")
    remote_name = _fetch_remote_name(repo)
    if remote_name in [remote.name for remote in repo.remotes]:
        repo.remote(remote_name).set_url(source.location)
    else:
        repo.create_remote(remote_name, source.location)
    logger.warning(
        "%s: re-pointed %s from %s to the configured repo %s (clean, and HEAD is on it)",
        source.checkout,
        remote_name,
        fetched_from,
        configured,
    )


def _mismatch(source: RepoSource, fetched_from: str, reason: str) -> GitOriginMismatch:
    configured = shown_location(source.location)
    return GitOriginMismatch(
        f"{source.checkout} is a checkout of {fetched_from}, not of the configured repo {configured}, "
        f"and {reason}; nothing was deployed. Move the folder away so all-etl clones {configured} afresh, "
        f"or set ELT_GIT_REPO back to {fetched_from}"
    )


def _head_is_on_a_branch_of(repo: git.Repo, source: RepoSource, env: dict[str, str]) -> bool:
    namespace = "refs/elt-candidate/"
    try:
        with repo.git.custom_environment(**env):
            repo.git.fetch("--quiet", "--no-tags", source.location, f"+refs/heads/*:{namespace}*")
    except git.GitCommandError as exc:
        raise _remote_error(exc, source, "fetch") from None
    try:
        return bool(repo.git.for_each_ref("--contains", "HEAD", "--format=%(refname)", namespace).strip())
    finally:
        for ref in repo.git.for_each_ref("--format=%(refname)", namespace).split():
            repo.git.update_ref("-d", ref)


def _fetch_remote_name(repo: git.Repo) -> str:
    """The remote `_fast_forward` fetches from: the branch's upstream remote, else origin."""
    tracking = None if repo.head.is_detached else repo.active_branch.tracking_branch()
    return tracking.remote_name if tracking is not None else "origin"


def _fetch_url(repo: git.Repo) -> str | None:
    name = _fetch_remote_name(repo)
    return repo.remote(name).url if name in [remote.name for remote in repo.remotes] else None


def _dirty_files(repo: git.Repo) -> list[str]:
    return [line[3:] for line in repo.git.status("--porcelain", "--untracked-files=no").splitlines()]


def _check_branch_and_tree(repo: git.Repo, source: RepoSource) -> None:
    where = str(source.checkout)
    if repo.head.is_detached:
        raise GitError(f"{where}: HEAD is detached; check out a branch (git -C {where} switch <branch>)")
    current = repo.active_branch.name
    branch = source.branch or current
    if current != branch:
        raise GitError(
            f"{where}: on branch '{current}', but '{branch}' is to be deployed; "
            f"switch with git -C {where} switch {branch}, or set ELT_GIT_BRANCH"
        )
    dirty = _dirty_files(repo)
    if dirty:
        raise GitDirtyTree(
            f"{where} has uncommitted changes in {', '.join(dirty[:10])}"
            f"{' …' if len(dirty) > 10 else ''}: commit or stash them (nothing was pulled), or run with --skip-pull"
        )


def _fast_forward(source: RepoSource, env: dict[str, str]) -> Deployed:
    repo = git.Repo(source.checkout)
    where = str(source.checkout)
    _check_branch_and_tree(repo, source)
    current = repo.active_branch
    branch = current.name
    previous = repo.head.commit.hexsha

    tracking = current.tracking_branch()
    if tracking is None:
        logger.info("%s: branch '%s' tracks no remote branch; deploying local HEAD %s", where, branch, previous[:12])
        return Deployed(shown_location(source.location), source.checkout, branch, previous, previous)

    remote = repo.remote(tracking.remote_name)
    fetched_from = shown_location(remote.url)
    with repo.git.custom_environment(**env):
        try:
            remote.fetch(tracking.remote_head)
        except git.GitCommandError as exc:
            raise _remote_error(exc, source, "fetch", remote_url=remote.url) from None

    upstream = tracking.commit
    if repo.is_ancestor(upstream, repo.head.commit):
        ahead = len(list(repo.iter_commits(f"{upstream.hexsha}..HEAD")))
        if ahead:
            logger.warning("%s: %d local commit(s) not on %s; deploying local HEAD", where, ahead, tracking.name)
        return Deployed(fetched_from, source.checkout, branch, previous, previous)
    if not repo.is_ancestor(repo.head.commit, upstream):
        raise GitHistoryDiverged(
            f"{where}: branch '{branch}' and {tracking.name} have diverged "
            f"(local {previous[:12]}, remote {upstream.hexsha[:12]}); nothing was changed. "
            f"Rebase or reset the checkout by hand (git -C {where} status)"
        )
    try:
        repo.git.merge("--ff-only", upstream.hexsha)
    except git.GitCommandError as exc:
        # An untracked file that the update would overwrite lands here; git leaves the tree as it was.
        raise GitError(f"{where}: fast-forward to {upstream.hexsha[:12]} refused: {_stderr(exc)}") from None
    sha = repo.head.commit.hexsha
    logger.info("%s: fast-forwarded %s → %s", where, previous[:12], sha[:12])
    return Deployed(fetched_from, source.checkout, branch, sha, previous)


def check_reachable(source: RepoSource) -> str:
    """`git ls-remote` of the remote update-code fetches from, with the configured credentials."""
    url = source.location
    if _is_worktree(source.checkout):
        repo = git.Repo(source.checkout)
        tracking = None if repo.head.is_detached else repo.active_branch.tracking_branch()
        if tracking is None:
            return f"{source.checkout}: no upstream branch; all-etl deploys local HEAD"
        url = repo.remote(tracking.remote_name).url
    with _credentials(source) as env:
        try:
            git.cmd.Git().ls_remote("--heads", url, env=env)
        except git.GitCommandError as exc:
            raise _remote_error(exc, source, "ls-remote", remote_url=url) from None
    return f"{shown_location(url)} reachable"


def _remote_error(exc: git.GitCommandError, source: RepoSource, action: str, remote_url: str | None = None) -> Exception:
    message = _scrub(_stderr(exc), source)
    url = _scrub(remote_url or source.location, source)
    text = f"git {action} of {url} failed: {message}"
    lowered = message.lower()
    if any(hint in lowered for hint in ("authentication", "permission denied", "could not read username", "403")):
        return ConfigurationError(text + " (check ELT_GIT_TOKEN or ELT_GIT_SSH_KEY_PATH)")
    if any(hint in lowered for hint in ("could not resolve host", "connection refused", "timed out", "unable to access")):
        return GitRemoteUnreachable(text)
    return GitError(text)


def _stderr(exc: git.GitCommandError) -> str:
    lines = [line.strip() for line in str(exc.stderr or "").splitlines() if line.strip()]
    lines = [re.sub(r"^stderr: ", "", line).strip("'") for line in lines]
    return " | ".join(line for line in lines if line)[-500:] or f"exit code {exc.status}"


def _scrub(text: str, source: RepoSource) -> str:
    if source.token:
        text = text.replace(source.token, "***")
    return scrub_location(text)


# The user info of a URL that is a credential: all of it over HTTP(S) (a token may be the user
# name), a password over any other transport (over SSH a user name alone, git@host, is not one).
# Schemes are case-insensitive (RFC 3986).
_CREDENTIALS_IN_URL = (r"(https?://)[^/@\s]+@", r"([a-z][a-z0-9+.-]*://)[^/@:\s]*:[^/@\s]*@")


def scrub_location(text: str) -> str:
    """Hide credentials written into a URL (https://user:token@host/..., ssh://user:password@host/...)."""
    for pattern in _CREDENTIALS_IN_URL:
        text = re.sub(pattern, r"\1***@", text, flags=re.IGNORECASE)
    return text


def shown_location(location: str) -> str:
    """A repo URL as it may appear in logs and artifacts: a checkout cloned before such URLs were
    refused may still have credentials in its remote URL; they are dropped, not masked."""
    for pattern in _CREDENTIALS_IN_URL:
        location = re.sub("^" + pattern, r"\1", location, flags=re.IGNORECASE)
    return location


@contextmanager
def _credentials(source: RepoSource) -> Iterator[dict[str, str]]:
    env = {"GIT_TERMINAL_PROMPT": "0"}
    if source.ssh_key_path:
        if not source.ssh_key_path.exists():
            raise ConfigurationError(f"ELT_GIT_SSH_KEY_PATH: {source.ssh_key_path} does not exist")
        env["GIT_SSH_COMMAND"] = f"ssh -i {source.ssh_key_path} -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"
    if not source.token:
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="elt-git-") as folder:
        askpass = Path(folder) / "askpass.sh"
        askpass.write_text(
            '#!/bin/sh\ncase "$1" in\n  Username*) echo "$ELT_GIT_ASKPASS_USERNAME" ;;\n'
            '  *) echo "$ELT_GIT_ASKPASS_TOKEN" ;;\nesac\n'
        )
        askpass.chmod(stat.S_IRWXU)
        yield {
            **env,
            "GIT_ASKPASS": str(askpass),
            "ELT_GIT_ASKPASS_USERNAME": source.username or "x-access-token",
            "ELT_GIT_ASKPASS_TOKEN": source.token,
        }


def _is_worktree(path: Path) -> bool:
    return (path / ".git").exists()


def _enclosing_worktree(start: Path) -> Path:
    for folder in (start.resolve(), *start.resolve().parents):
        if _is_worktree(folder):
            return folder
    raise ConfigurationError(f"{start} is not inside a git checkout; set ELT_GIT_REPO to the repo that holds the dbt project")
