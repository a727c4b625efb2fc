"""`elt doctor`: every configured dependency, checked for real, each problem named."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator

from elt.errors import EltError
from elt.settings import AirbyteBackend, Settings, load_settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class Problems(EltError):
    """Several things to fix, one per line."""

    def __init__(self, summary: str, problems: list[str]) -> None:
        super().__init__(summary + "\n" + "\n".join(problems))


class NotChecked(EltError):
    """A check that needs what an earlier check found broken (the warehouse): said once, not failed again."""


def _needs_warehouse(settings: Settings) -> None:
    from elt.warehouse import known_problem

    problem = known_problem(settings)
    if problem:
        raise NotChecked(f"not checked: {problem}")


def run_checks() -> Iterator[Check]:
    try:
        settings = load_settings()
    except EltError as exc:
        yield Check("settings", False, str(exc))
        return
    yield Check("settings", True, f"warehouse {settings.warehouse.value}, Airbyte backend {settings.airbyte_backend.value}")
    for name, check in _checks(settings):
        try:
            yield Check(name, True, check())
        except Problems as exc:
            yield Check(name, False, str(exc))
        except Exception as exc:  # every failure becomes a reported problem, never a crash
            yield Check(name, False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _checks(settings: Settings) -> list[tuple[str, Callable[[], str]]]:
    checks: list[tuple[str, Callable[[], str]]] = []
    if settings.airbyte_backend is AirbyteBackend.embedded:
        checks.append(("airbyte connections", lambda: _embedded_connections(settings)))
    else:
        checks.append(("airbyte server", lambda: _airbyte_server(settings)))
    checks += [
        ("warehouse", lambda: _warehouse(settings)),
        ("git repo", lambda: _git(settings)),
        ("dbt project", lambda: _dbt(settings)),
    ]
    if settings.effective_dbt_target == "snowflake":
        checks.append(("snowflake grants", lambda: _snowflake_grants(settings)))
    checks.append(("prefect api", _prefect))
    return checks


def _embedded_connections(settings: Settings) -> str:
    from elt.extract.connections import load_connections
    from elt.extract.embedded import EmbeddedBackend

    path = settings.path(settings.airbyte_connections_file)
    connections = load_connections(path)
    backend = EmbeddedBackend(settings, connections)
    missing = []
    for spec in connections:
        venv = settings.path(settings.connectors_dir) / spec.source.connector / "bin" / spec.source.connector
        if not (spec.source.executable or venv.exists() or spec.source.pip or shutil.which(spec.source.connector)):
            missing.append(spec.name)
    if missing:
        raise EltError(f"{path}: connection(s) {', '.join(missing)} name a connector that is not installed and has no 'pip' spec")
    return f"{len(backend.connection_names())} enabled in {path}"


def _airbyte_server(settings: Settings) -> str:
    """Reachable, credentials accepted, and the connections all-etl would sync exist and are active."""
    from elt.extract.server import AirbyteClient, ServerBackend

    client = AirbyteClient.from_settings(settings)
    client.health()
    backend = ServerBackend(settings, client)
    names = backend.connection_names()  # lists connections: proves the token works
    if not names:
        scope = f" tagged '{settings.airbyte_connection_tag}'" if settings.airbyte_connection_tag else ""
        raise EltError(f"{settings.airbyte_api_url}: no active connections{scope}; create them in the Airbyte UI (docs/airbyte.md)")
    auth = "client credentials" if settings.airbyte_client_id else "no auth"
    return f"{settings.airbyte_api_url} ({auth}): {len(names)} active connection(s): {', '.join(sorted(names))}"


def _warehouse(settings: Settings) -> str:
    from elt.warehouse import check_reachable

    check_reachable(settings)
    return "reachable"


def _git(settings: Settings) -> str:
    import git

    from elt.git_repo import RepoSource, scrub_location

    source = RepoSource.from_settings(settings)
    target = source.location
    if (source.checkout / ".git").exists():
        repo = git.Repo(source.checkout)
        tracking = None if repo.head.is_detached else repo.active_branch.tracking_branch()
        if tracking is None:
            return f"{source.checkout}: no upstream branch; all-etl deploys local HEAD"
        target = repo.remote(tracking.remote_name).url
    try:
        git.cmd.Git().ls_remote("--heads", target, env={"GIT_TERMINAL_PROMPT": "0"})
    except git.GitCommandError as exc:
        raise EltError(f"cannot reach {scrub_location(target)} (ELT_GIT_REPO): {str(exc.stderr).strip()[:200]}") from None
    return f"{scrub_location(target)} reachable"


def _dbt(settings: Settings) -> str:
    from elt import dbt
    from elt.git_repo import RepoSource

    folder = RepoSource.from_settings(settings).checkout / settings.dbt_project_dir
    if not folder.exists():
        return f"{folder} not checked out yet; all-etl clones it on its first run"
    project = dbt.DbtProject.at(folder)
    _needs_warehouse(settings)
    with dbt.profiles_dir(settings, project) as profiles_dir:
        completed = subprocess.run(
            [dbt.dbt_executable(), "debug", "--project-dir", str(project.path), "--profiles-dir", str(profiles_dir),
             "--target", settings.effective_dbt_target],
            cwd=project.path, env=dbt.dbt_environment(settings), capture_output=True, text=True, timeout=120,
        )
    if completed.returncode != 0:
        cause = dbt.failure_cause((completed.stdout + completed.stderr).splitlines(), completed.returncode)
        raise EltError(f"dbt debug failed in {project.path}: {cause}")
    return f"{project.path} (profile {project.profile_name}, target {settings.effective_dbt_target}) passes dbt debug"


def _snowflake_grants(settings: Settings) -> str:
    from elt import dbt, snowflake
    from elt.git_repo import RepoSource

    _needs_warehouse(settings)
    folder = RepoSource.from_settings(settings).checkout / settings.dbt_project_dir
    sources: list[tuple[str, str, str]] = []
    if folder.exists():
        project = dbt.DbtProject.at(folder)
        with dbt.profiles_dir(settings, project) as profiles_dir:
            listed = dbt.list_sources(project, profiles_dir=profiles_dir, target=settings.effective_dbt_target,
                                      env=dbt.dbt_environment(settings))
        sources = [(source.get("database") or "", source["schema"], source["name"]) for source in listed]
    report = snowflake.missing_grants(settings, sources, first_run_creates=_schemas_not_loaded_yet(settings))
    if report.problems:
        raise Problems(f"{len(report.problems)} missing grant(s) or object(s):", report.problems)
    detail = (
        f"role {settings.snowflake_role or '(default)'} can use {settings.snowflake_warehouse}, "
        f"read {len(sources) - report.unread_tables} source table(s) and build in {settings.snowflake_database}.{settings.snowflake_schema}"
    )
    if report.not_loaded_yet:
        detail += f"; raw schema {', '.join(report.not_loaded_yet)} not loaded yet (the first run creates it)"
    return detail


def _schemas_not_loaded_yet(settings: Settings) -> set[str]:
    """Raw schemas the embedded backend will create on its first run: those of its connections
    that it has never staged (PyAirbyte stages each sync in data/airbyte-staging.duckdb first).
    A schema it has staged, yet the role can't see in Snowflake, is a missing grant."""
    if settings.airbyte_backend is not AirbyteBackend.embedded:
        return set()
    from elt.extract.connections import load_connections

    schemas = {spec.destination.schema_.upper() for spec in load_connections(settings.path(settings.airbyte_connections_file))}
    staging = settings.path(settings.data_dir) / "airbyte-staging.duckdb"
    if not staging.exists():
        return schemas
    import duckdb

    try:
        with duckdb.connect(str(staging), read_only=True) as connection:
            staged = {name.upper() for (name,) in connection.execute(
                "select distinct table_schema from information_schema.tables").fetchall()}
    except duckdb.Error:  # held by a running sync: assume loaded, so a missing schema still fails
        return set()
    return schemas - staged


def _prefect() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return "PREFECT_API_URL unset: runs use a temporary local Prefect server"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error:
        raise EltError(f"PREFECT_API_URL={url} is not healthy: {error}")
    return f"{url} healthy"
