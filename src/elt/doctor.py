"""`elt doctor`: every configured dependency, checked for real, each problem named.

Every check runs, whatever failed before it: an invalid setting is reported and the other
checks run with its default (a check that depends on it says so instead).
"""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from elt.errors import EltError, first_line
from elt.settings import AirbyteBackend, Settings, environment_names, load_settings, load_settings_or_defaults


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    traceback: str | None = None  # of a failed check, for `elt doctor --debug`
    checked: bool = True  # False: it needs what another check found broken; that one counts, this doesn't


class Problems(EltError):
    """Several things to fix, one per line."""

    def __init__(self, summary: str, problems: list[str]) -> None:
        super().__init__(summary + "\n" + "\n".join(problems))


class NotChecked(EltError):
    """A check that needs what an earlier check found broken (the warehouse): said once, not failed again."""


def _needs_warehouse(settings: Settings) -> None:
    from elt.warehouse import warehouse_for

    problem = warehouse_for(settings).known_problem()
    if problem:
        raise NotChecked(f"not checked: {problem}")


def run_checks(env: str | None = None) -> Iterator[Check]:
    settings, invalid = load_settings_or_defaults(env)
    if invalid:
        yield Check(
            "settings",
            False,
            f"{len(invalid)} invalid setting(s); the checks below use the default instead\n" + "\n".join(invalid.values()),
        )
    else:
        where = f"environment {settings.env} ({settings.path(settings.data_dir)}), " if settings.env else ""
        yield Check(
            "settings", True, f"{where}warehouse {settings.warehouse.value}, Airbyte backend {settings.airbyte_backend.value}"
        )
    for name, depends_on, check in _checks(settings):
        blocked = sorted(problem.split(":", 1)[0] for field, problem in invalid.items() if field.startswith(depends_on))
        if blocked:
            yield Check(name, False, f"not checked: {', '.join(blocked)} is invalid (see settings)", checked=False)
            continue
        try:
            yield Check(name, True, check())
        except NotChecked as exc:
            yield Check(name, False, str(exc), checked=False)
        except Problems as exc:
            yield Check(name, False, str(exc), traceback.format_exc())
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reported problem, never a crash
            yield Check(name, False, first_line(exc), traceback.format_exc())


def _checks(settings: Settings) -> list[tuple[str, tuple[str, ...], Callable[[], str]]]:
    """(name, the settings fields it depends on (name prefixes), the check)."""
    from elt import preflight
    from elt.warehouse import warehouse_for

    paths = ("home", "data_dir", "env")
    checks: list[tuple[str, tuple[str, ...], Callable[[], str]]] = [
        ("environment", (), preflight.check_environment),
    ]
    if settings.airbyte_backend is AirbyteBackend.embedded:
        checks.append(("airbyte connections", ("airbyte_", "connectors_dir", *paths), lambda: _embedded_connections(settings)))
    else:
        checks.append(("airbyte server", ("airbyte_",), lambda: _airbyte_server(settings)))
    checks += [
        ("warehouse", ("warehouse", "duckdb_path", "snowflake_", *paths), lambda: _warehouse(settings)),
        ("git repo", ("git_", *paths), lambda: _git(settings)),
        ("dbt project", ("git_", "dbt_", *paths), lambda: _dbt_project(settings)),
    ]
    warehouse = warehouse_for(settings)
    if warehouse.checks_grants:
        checks.append(
            (f"{warehouse.name.lower()} grants", ("snowflake_", "warehouse", "git_", "dbt_"), lambda: _grants(settings))
        )
    if environment_names(settings.home):
        checks.append(("environments", ("home",), lambda: _environments(settings)))
    checks.append(("alerts", ("slack_", "alert_"), lambda: _alerts(settings)))
    checks.append(("disk space", ("min_free_gb", *paths), lambda: _disk_space(settings)))
    checks.append(("prefect api", (), _prefect))
    return checks


def _environments(settings: Settings) -> str:
    """Every environment's file loads, and no two environments share a data folder or warehouse."""
    from elt.warehouse import warehouse_for

    names = environment_names(settings.home)
    problems: list[str] = []
    owners: dict[tuple[str, str], str] = {}
    default = Settings(home=settings.home, env=None) if settings.env else settings
    for name in [None, *names]:
        try:
            loaded = load_settings(home=settings.home, env=name) if name else default
        except EltError as exc:
            problems.append(first_line(exc))
            continue
        shown = f"environment {name}" if name else "the default (no environment)"
        for kind, where in (("data folder", str(loaded.path(loaded.data_dir))), ("warehouse", warehouse_for(loaded).location)):
            other = owners.setdefault((kind, where), shown)
            if other != shown:
                problems.append(f"{other} and {shown} share the {kind} {where}: give each its own in environments/<name>.env")
    if problems:
        raise Problems(f"{len(problems)} problem(s) in environments/:", problems)
    return f"{len(names)} defined: {', '.join(names)}; each with its own data folder and warehouse"


def _disk_space(settings: Settings) -> str:
    """Free space where the warehouse, checkouts and connector caches grow."""
    folder = settings.path(settings.data_dir)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    usage = shutil.disk_usage(existing)
    free_gb, total_gb = usage.free / 1e9, usage.total / 1e9
    summary = f"{free_gb:.1f} GB free of {total_gb:.1f} GB on the disk of {folder}"
    if free_gb < settings.min_free_gb:
        raise EltError(f"{summary}, under ELT_MIN_FREE_GB={settings.min_free_gb:.15g}: free space or grow the disk")
    return summary


def _embedded_connections(settings: Settings) -> str:
    """The file, the connectors, every `${VAR}` and (with the embedded backend's check) every stream."""
    from elt import preflight
    from elt.extract.connections import load_connections
    from elt.extract.embedded import find_connector

    path = settings.path(settings.airbyte_connections_file)
    not_installable = []
    for spec in load_connections(path):
        if not spec.enabled:
            continue
        try:
            find_connector(spec, settings.path(settings.connectors_dir), path)
        except EltError as exc:
            not_installable.append(str(exc))
    if not_installable:
        raise Problems(f"{len(not_installable)} connector(s) not installed and not installable:", not_installable)
    return preflight.check_connections(settings)


def _airbyte_server(settings: Settings) -> str:
    """Reachable, credentials accepted, and the connections all-etl would sync exist and are active."""
    from elt.extract.server import AirbyteClient, ServerBackend

    client = AirbyteClient.from_settings(settings)
    client.health()
    backend = ServerBackend(settings, client)
    blocked = backend.not_runnable()  # lists connections: proves the token works
    names = [name for name in backend.connection_names() if name not in blocked]
    if not names:
        scope = f" tagged '{settings.airbyte_connection_tag}'" if settings.airbyte_connection_tag else ""
        raise EltError(
            f"{settings.airbyte_api_url}: no active connections{scope}; create them in the Airbyte UI (docs/airbyte.md)"
        )
    auth = "client credentials" if settings.airbyte_client_id else "no auth"
    not_synced = "".join(f"; not synced, a run fails on it: {name} ({why})" for name, why in sorted(blocked.items()))
    return f"{settings.airbyte_api_url} ({auth}): {len(names)} active connection(s): {', '.join(sorted(names))}{not_synced}"


def _warehouse(settings: Settings) -> str:
    from elt.warehouse import warehouse_for

    warehouse_for(settings).check_reachable()
    return "reachable"


def _git(settings: Settings) -> str:
    """The repo setting, the checkout on disk (what update-code would refuse), and the remote answers."""
    from elt import git_repo, preflight

    source = preflight.check_repo(settings)
    fetched_from = git_repo.origin_mismatch(source)
    if fetched_from:
        configured = git_repo.shown_location(source.location)
        raise EltError(
            f"{source.checkout} is a checkout of {fetched_from}, not of the configured repo {configured}; "
            f"`elt run` re-points it if it is clean and {configured} has its HEAD, else stops"
        )
    return git_repo.check_reachable(source)


def _dbt_project(settings: Settings) -> str:
    """The project folder and its dbt_project.yml (preflight), then `dbt debug` once it is checked out."""
    from elt import preflight
    from elt.git_repo import RepoSource

    source = RepoSource.from_settings(settings)
    detail = preflight.check_dbt_project(settings, source)
    if not source.checkout.exists():
        return detail
    return _dbt(settings)


def _dbt(settings: Settings) -> str:
    from elt import dbt_runner

    folder = dbt_runner.project_folder(settings)
    if not folder.exists():
        return f"{folder} not checked out yet; all-etl clones it on its first run"
    project = dbt_runner.DbtProject.at(folder)
    _needs_warehouse(settings)
    with dbt_runner.dbt_for(settings, project) as dbt:
        completed = dbt.run_captured("debug", timeout=120)
    if completed.returncode != 0:
        cause = dbt_runner.failure_cause((completed.stdout + completed.stderr).splitlines(), completed.returncode)
        raise EltError(f"dbt debug failed in {project.path}: {cause}")
    return f"{project.path} (profile {project.profile_name}, target {settings.effective_dbt_target}) passes dbt debug"


def _grants(settings: Settings) -> str:
    """What the run's role may do in the warehouse, probed as that role."""
    from elt import dbt_runner
    from elt.warehouse import MissingGrants, warehouse_for

    _needs_warehouse(settings)
    folder = dbt_runner.project_folder(settings)
    sources: list[tuple[str, str, str]] = []
    if folder.exists():
        with dbt_runner.dbt_for(settings, dbt_runner.DbtProject.at(folder)) as dbt:
            listed = dbt_runner.list_sources(dbt)
        sources = [(source.get("database") or "", source["schema"], source["name"]) for source in listed]
    try:
        return warehouse_for(settings).check_grants(sources, first_run_creates=_schemas_not_loaded_yet(settings))
    except MissingGrants as exc:
        raise Problems(f"{len(exc.problems)} missing grant(s) or object(s):", exc.problems) from None


def _schemas_not_loaded_yet(settings: Settings) -> set[str]:
    """Raw schemas the embedded backend will create on its first run: those of its connections
    that it has never staged (PyAirbyte stages each sync in data/airbyte-staging.duckdb first).
    A schema it has staged, yet the role can't see in Snowflake, is a missing grant."""
    if settings.airbyte_backend is not AirbyteBackend.embedded:
        return set()
    from elt.extract.connections import load_connections

    schemas = {spec.destination.schema_.upper() for spec in load_connections(settings.path(settings.airbyte_connections_file))}
    from elt.warehouse import warehouse_for

    staging = warehouse_for(settings).staging_path
    if not staging.exists():
        return schemas
    import duckdb

    try:
        with duckdb.connect(str(staging), read_only=True) as connection:
            staged = {
                name.upper()
                for (name,) in connection.execute("select distinct table_schema from information_schema.tables").fetchall()
            }
    except duckdb.Error:  # held by a running sync: assume loaded, so a missing schema still fails
        return set()
    return schemas - staged


def _alerts(settings: Settings) -> str:
    """Each configured alert channel's server answers; nothing is sent."""
    from elt.alerts import doctor_check

    return doctor_check(settings)


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
