"""Check before working: what `elt run` can check without moving data, before the first sync.

`check_run` stops at the first problem with one ConfigurationError (one line naming the
variable or file and the fix); `elt run` calls it before Prefect starts. `elt doctor` calls
each check on its own so that it can report all of them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from elt import dbt_runner
from elt.errors import ConfigurationError, yaml_problem
from elt.extract import refuse_tag
from elt.git_repo import RepoSource, check_checkout, is_url, refuse_credentials
from elt.settings import NON_SETTING_VARIABLES, AirbyteBackend, Settings, load_settings, setting_variables
from elt.warehouse import warehouse_for


def check_run(
    *,
    connections: list[str] | None = None,
    repo: str | None = None,
    branch: str | None = None,
    project_dir: str | None = None,
    skip_extract: bool = False,
    skip_pull: bool = False,
    skip_transform: bool = False,
    tag: str | None = None,
    dbt_target: str | None = None,
    connections_file: str | None = None,
    env: str | None = None,
) -> Settings:
    """Every check of one `elt run`, in the order the run would meet the problems; returns the
    settings, loaded once with the run's `dbt_target`, `connections_file` and `env` (--target,
    --connections-file, --env) over ELT_DBT_TARGET, ELT_AIRBYTE_CONNECTIONS_FILE and ELT_ENV.

    Inside `checked_once(...)` of the same run it returns that block's settings without checking again."""
    run = _Run.of(
        connections=connections,
        repo=repo,
        branch=branch,
        project_dir=project_dir,
        skip_extract=skip_extract,
        skip_pull=skip_pull,
        skip_transform=skip_transform,
        tag=tag,
        dbt_target=dbt_target,
        connections_file=connections_file,
        env=env,
    )
    already = _checked.get()
    if already is not None and already[0] == run:
        return already[1]
    check_environment()
    settings = run_settings(dbt_target, connections_file, env)
    warehouse_for(settings).check_settings()
    if not skip_extract:
        refuse_tag(settings, tag)
        check_connections(settings, connections, streams=False)
    if not (skip_pull and skip_transform):  # otherwise the run never touches the repo
        source = check_repo(settings, repo, branch, will_pull=not skip_pull)
        if not skip_transform:
            check_dbt_project(settings, source, project_dir)
    if not skip_extract:
        # Last: without a cached catalog this starts the connector (discover), so cheaper checks go first.
        check_connections(settings, connections, streams=True)
    return settings


def run_settings(dbt_target: str | None = None, connections_file: str | None = None, env: str | None = None) -> Settings:
    """The settings of one run: the environment and `.env` (and the environment's file), with the
    run's own dbt target, connections file and environment (flow parameters, --target,
    --connections-file and --env) where given."""
    overrides = {"dbt_target": dbt_target, "airbyte_connections_file": connections_file, "env": env}
    return load_settings(**{name: value for name, value in overrides.items() if value is not None})


@contextmanager
def checked_once(**run: Any) -> Iterator[Settings]:
    """`check_run(**run)` now; inside the block, `check_run` of the same run returns these settings
    instead of loading and checking again. `elt run` checks before Prefect starts (a fast,
    one-line error) and then runs the flow in this process, whose first step is the same check
    (a deployment run's only one)."""
    settings = check_run(**run)
    token = _checked.set((_Run.of(**run), settings))
    try:
        yield settings
    finally:
        _checked.reset(token)


class _Run(NamedTuple):
    """The arguments of one check_run, compared to tell whether a run was checked already."""

    connections: tuple[str, ...]
    repo: str | None
    branch: str | None
    project_dir: str | None
    skip_extract: bool
    skip_pull: bool
    skip_transform: bool
    tag: str | None
    dbt_target: str | None
    connections_file: str | None
    env: str | None

    @classmethod
    def of(cls, connections: list[str] | None = None, **run: Any) -> _Run:
        """From check_run's keyword arguments; those not given take check_run's defaults."""
        fields: dict[str, Any] = {"repo": None, "branch": None, "project_dir": None, "tag": None, "dbt_target": None}
        fields |= {"connections_file": None, "env": None, "skip_extract": False, "skip_pull": False, "skip_transform": False}
        return cls(connections=tuple(connections or ()), **(fields | run))


_checked: ContextVar[tuple[_Run, Settings] | None] = ContextVar("elt_checked_run", default=None)


def check_environment(environ: Mapping[str, str] | None = None, dotenv: Path = Path(".env")) -> str:
    """Refuse ELT_ variables that set nothing: a misspelled setting silently leaves its default in
    place (ELT_WAREHOUSE misspelled loads DuckDB instead of Snowflake), so it stops the run."""
    problems = unknown_variables(os.environ if environ is None else environ, dotenv)
    if problems:
        raise ConfigurationError("; ".join(problems))
    return "no unknown ELT_ variables"


def unknown_variables(environ: Mapping[str, str], dotenv: Path = Path(".env")) -> list[str]:
    """One message per ELT_ variable in `environ` or the `.env` file that is no setting.

    >>> unknown_variables({"ELT_AIRBYTE_BACKED": "server"}, Path("/nonexistent/.env"))
    ['ELT_AIRBYTE_BACKED: unknown setting; did you mean ELT_AIRBYTE_BACKEND?']
    """
    from dotenv import dotenv_values

    known = setting_variables() | NON_SETTING_VARIABLES
    suffixes = {known_name.removeprefix("ELT_"): known_name for known_name in known if known_name.startswith("ELT_")}
    in_file = dotenv_values(dotenv) if dotenv.is_file() else {}
    problems = []
    for name in sorted({*environ, *in_file}):
        # pydantic-settings matches names case-insensitively, so elt_warehouse is ELT_WAREHOUSE.
        if not name.upper().startswith("ELT_") or name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper().removeprefix("ELT_"), sorted(suffixes), n=1)
        hint = f"; did you mean {suffixes[close[0]]}?" if close else " (every setting is listed in .env.example)"
        where = "" if name in environ else f" (in {dotenv.resolve()})"
        problems.append(f"{name}: unknown setting{hint}{where}")
    return problems


def check_repo(settings: Settings, repo: str | None = None, branch: str | None = None, *, will_pull: bool = True) -> RepoSource:
    """The repo setting (or --repo) names a repo and holds no credentials; a checkout already on
    disk is one that update-code can fast-forward (or, with --skip-pull, build as it is)."""
    name = "--repo" if repo else "ELT_GIT_REPO"
    if repo:
        refuse_credentials(repo, name)
    source = RepoSource.from_settings(settings, repo, branch)
    if source.managed and not is_url(source.location):
        path = Path(source.location)
        if not path.exists():
            raise ConfigurationError(f"{name}: {path} does not exist; give the path of a git repo or its URL")
        if not ((path / "HEAD").is_file() and (path / "objects").is_dir()):
            raise ConfigurationError(f"{name}: {path} is not a git repository; give the path of a git repo or its URL")
    if source.ssh_key_path and not source.ssh_key_path.is_file():
        raise ConfigurationError(f"ELT_GIT_SSH_KEY_PATH: {source.ssh_key_path} does not exist; point it at the deploy key")
    check_checkout(source, will_pull=will_pull)
    return source


def check_connections(settings: Settings, names: list[str] | None = None, *, streams: bool = True) -> str:
    """The embedded connections file parses, names the connections asked for, every `${VAR}` in
    their config is set, and every stream is offered
    by its source. The server backend's connections live in Airbyte: `elt doctor` asks it."""
    if settings.airbyte_backend is not AirbyteBackend.embedded:
        return "connections are defined in the Airbyte server"
    from elt.extract.connections import load_connections, unset_references
    from elt.extract.embedded import EmbeddedBackend

    path = settings.path(settings.airbyte_connections_file)
    backend = EmbeddedBackend(settings, load_connections(path))
    selected = [backend.connection(name).name for name in names] if names else backend.connection_names()
    environment = settings.environment()
    for name in selected:
        unset = unset_references(backend.connection(name), environment)
        if unset:
            key, variable = unset[0]
            raise ConfigurationError(
                f"{path}: connection '{name}': {key} refers to ${{{variable}}}, which is not set; "
                f"set {variable} in the environment or .env"
            )
    if streams:
        backend.check_streams(selected)
    return f"{len(selected)} connection(s) in {path}: {', '.join(selected) or 'none enabled'}"


def check_dbt_project(settings: Settings, source: RepoSource, project_dir: str | None = None) -> str:
    """The dbt project folder exists in the checkout and holds a readable dbt_project.yml.
    A repo not cloned yet can't be checked: its first run clones it."""
    name = "--project-dir" if project_dir else "ELT_DBT_PROJECT_DIR"
    folder = dbt_runner.project_folder(settings, source, project_dir)
    if not source.checkout.exists():
        return f"{source.checkout} not checked out yet; all-etl clones it on its first run"
    project_file = folder / "dbt_project.yml"
    if not project_file.is_file():
        found = _dbt_projects_in(source.checkout)
        hint = f" (dbt projects in the repo: {', '.join(found)})" if found else ""
        problem = "does not exist" if not folder.exists() else "has no dbt_project.yml"
        raise ConfigurationError(f"{name}: {folder} {problem}; set {name} to the dbt project's folder in the repo{hint}")
    try:
        document = yaml.safe_load(project_file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigurationError(yaml_problem(project_file, exc)) from None
    if not isinstance(document, dict) or not document.get("profile"):
        raise ConfigurationError(f"{project_file}: no 'profile' key; add `profile: <name>` (the appliance renders that profile)")
    return f"{folder} has dbt_project.yml (profile {document['profile']})"


def _dbt_projects_in(checkout: Path) -> list[str]:
    """Folders up to two levels down that hold a dbt_project.yml, relative to the checkout."""
    found = [*checkout.glob("dbt_project.yml"), *checkout.glob("*/dbt_project.yml"), *checkout.glob("*/*/dbt_project.yml")]
    folders = [str(path.parent.relative_to(checkout)) for path in found if "dbt_packages" not in path.parts]
    return sorted(folders)[:5]
