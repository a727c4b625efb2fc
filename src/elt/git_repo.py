"""Update code: fast-forward the checkout that holds the dbt project, with GitPython.

Never discards local work: a dirty tree or a diverged history stops with an error that
names the repo and what is in the way. Credentials reach git through the environment
(GIT_ASKPASS for a token, GIT_SSH_COMMAND for a deploy key) and are scrubbed from any
message that leaves this module.
"""

from __future__ import annotations

import logging
import re
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


@dataclass(frozen=True)
class Deployed:
    repo: str
    checkout: Path
    branch: str
    sha: str
    previous_sha: str | None
    pulled: bool

    @property
    def changed(self) -> bool:
        return self.previous_sha != self.sha


@dataclass(frozen=True)
class RepoSource:
    """Where the code comes from (`location`) and where it is checked out (`checkout`)."""

    location: str
    checkout: Path
    branch: str | None
    token: str | None = None
    ssh_key_path: Path | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, repo: str | None = None, branch: str | None = None
    ) -> "RepoSource":
        location = repo or settings.git_repo
        token = settings.git_token.get_secret_value() if settings.git_token else None
        ssh_key = settings.path(settings.git_ssh_key_path) if settings.git_ssh_key_path else None
        branch = branch or settings.git_branch
        if location is None:
            checkout = _enclosing_worktree(settings.home)
            return cls(str(checkout), checkout, branch, token, ssh_key)
        local = Path(location).expanduser()
        if _is_worktree(local):
            return cls(str(local.resolve()), local.resolve(), branch, token, ssh_key)
        if settings.git_checkout_dir:
            checkout = settings.path(settings.git_checkout_dir)
        else:
            name = re.sub(r"\.git$", "", location.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
            checkout = settings.path(settings.data_dir) / "repos" / (name or "project")
        return cls(location, checkout, branch, token, ssh_key)


def update_code(source: RepoSource) -> Deployed:
    """Clone on first use, else fetch and fast-forward; returns the deployed commit."""
    with _credentials(source) as env:
        if source.checkout.exists() and _is_worktree(source.checkout):
            return _fast_forward(source, env)
        if source.checkout.exists() and any(source.checkout.iterdir()):
            raise GitError(
                f"{source.checkout} exists and is not a git checkout; move it away or set ELT_GIT_CHECKOUT_DIR"
            )
        return _clone(source, env)


def _clone(source: RepoSource, env: dict[str, str]) -> Deployed:
    logger.info("Cloning %s into %s", _scrub(source.location, source), source.checkout)
    options = {"branch": source.branch} if source.branch else {}
    try:
        repo = git.Repo.clone_from(source.location, source.checkout, env=env, **options)
    except git.GitCommandError as exc:
        raise _remote_error(exc, source, "clone") from None
    sha = repo.head.commit.hexsha
    return Deployed(source.location, source.checkout, repo.active_branch.name, sha, None, True)


def _fast_forward(source: RepoSource, env: dict[str, str]) -> Deployed:
    repo = git.Repo(source.checkout)
    where = str(source.checkout)
    if repo.head.is_detached:
        raise GitError(f"{where}: HEAD is detached; check out a branch (git -C {where} switch <branch>)")
    current = repo.active_branch
    branch = source.branch or current.name
    if current.name != branch:
        raise GitError(
            f"{where}: on branch '{current.name}', but '{branch}' is to be deployed; "
            f"switch with git -C {where} switch {branch}, or set ELT_GIT_BRANCH"
        )
    previous = repo.head.commit.hexsha

    dirty = [line[3:] for line in repo.git.status("--porcelain", "--untracked-files=no").splitlines()]
    if dirty:
        raise GitDirtyTree(
            f"{where} has uncommitted changes in {', '.join(dirty[:10])}"
            f"{' …' if len(dirty) > 10 else ''}: commit or stash them (nothing was pulled), or run with --skip-pull"
        )

    tracking = current.tracking_branch()
    if tracking is None:
        logger.info("%s: branch '%s' tracks no remote branch; deploying local HEAD %s", where, branch, previous[:12])
        return Deployed(source.location, source.checkout, branch, previous, previous, False)

    remote = repo.remote(tracking.remote_name)
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
        return Deployed(source.location, source.checkout, branch, previous, previous, True)
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
    return Deployed(source.location, source.checkout, branch, sha, previous, True)


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


def scrub_location(text: str) -> str:
    """Hide credentials written into a URL (https://user:token@host/...)."""
    return re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)


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
            '#!/bin/sh\ncase "$1" in\n  Username*) echo "${ELT_GIT_USERNAME:-x-access-token}" ;;\n'
            '  *) echo "$ELT_GIT_ASKPASS_TOKEN" ;;\nesac\n'
        )
        askpass.chmod(stat.S_IRWXU)
        yield {**env, "GIT_ASKPASS": str(askpass), "ELT_GIT_ASKPASS_TOKEN": source.token}


def _is_worktree(path: Path) -> bool:
    return (path / ".git").exists()


def _enclosing_worktree(start: Path) -> Path:
    for folder in (start.resolve(), *start.resolve().parents):
        if _is_worktree(folder):
            return folder
    raise ConfigurationError(
        f"{start} is not inside a git checkout; set ELT_GIT_REPO to the repo that holds the dbt project"
    )

