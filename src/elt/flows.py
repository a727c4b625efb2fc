"""The `all-etl` flow: extract-load, update code, transform — each a child flow in the Prefect UI.

This module only wires the system modules together; read it top to bottom.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from elt import dbt, git_repo, warehouse
from elt.extract.base import (
    ExtractBackend,
    ExtractFailed,
    ExtractReport,
    SyncFailure,
    SyncResult,
    UnknownConnections,
)
from elt.settings import AirbyteBackend, Settings, Warehouse, load_settings


@dataclass
class EtlSummary:
    extract: ExtractReport | None = None
    deployed: git_repo.Deployed | None = None
    dbt_run: dbt.DbtRun | None = None
    mart_rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def make_backend(settings: Settings) -> ExtractBackend:
    if settings.airbyte_backend is AirbyteBackend.embedded:
        from elt.extract.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    raise NotImplementedError("ELT_AIRBYTE_BACKEND=server is not available in this version; use 'embedded'")


@task(task_run_name="sync-{connection}", cache_policy=NO_CACHE)
def sync_connection(backend: ExtractBackend, connection: str, full_refresh: bool) -> SyncResult:
    result = backend.sync(connection, full_refresh=full_refresh)
    get_run_logger().info(
        "%s: %d rows (%s) in %.1fs",
        connection,
        result.rows,
        ", ".join(f"{stream} {rows}" for stream, rows in result.rows_per_stream.items()),
        result.seconds,
    )
    return result


@flow(name="extract-load")
def extract_load(connections: list[str] | None = None, full_refresh: bool = False) -> ExtractReport:
    """Sync the chosen connections (all when none are named) concurrently; fail if any sync fails."""
    settings = load_settings()
    backend = make_backend(settings)
    names = connections or backend.connection_names()
    unknown = sorted(set(names) - set(backend.connection_names()))
    if unknown:
        raise UnknownConnections(unknown, backend.connection_names())

    futures = {name: sync_connection.submit(backend, name, full_refresh) for name in names}
    report = ExtractReport()
    for name, future in futures.items():
        try:
            report.synced.append(future.result())
        except Exception as exc:  # each failure is recorded; the stage fails below, after all syncs end
            report.failed.append(SyncFailure(name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))

    create_table_artifact(
        key="extract-load-results",
        table=[
            {"connection": result.connection, "stream": stream, "rows": rows, "seconds": round(result.seconds, 1)}
            for result in report.synced
            for stream, rows in result.rows_per_stream.items()
        ]
        + [{"connection": failure.connection, "stream": "-", "rows": None, "seconds": None, "error": failure.error} for failure in report.failed],
        description="Rows loaded per stream by this run's syncs",
    )
    if report.failed:
        raise ExtractFailed(report)
    return report


@flow(name="update-code")
def update_code(repo: str | None = None, branch: str | None = None) -> git_repo.Deployed:
    """Fast-forward the repo that holds the dbt project and record the deployed commit."""
    settings = load_settings()
    deployed = git_repo.update_code(git_repo.RepoSource.from_settings(settings, repo, branch))
    get_run_logger().info("Deployed %s@%s (%s)", deployed.branch, deployed.sha, "updated" if deployed.changed else "unchanged")
    create_markdown_artifact(
        key="deployed-commit",
        markdown=f"Deployed commit `{deployed.sha}` of `{deployed.branch}` from `{git_repo.scrub_location(deployed.repo)}`"
        + (f" (was `{deployed.previous_sha}`)" if deployed.changed and deployed.previous_sha else ""),
        description="The commit of the dbt project this run built",
    )
    return deployed


@flow(name="transform")
def transform(
    project_dir: str,
    select: str | None = None,
    exclude: str | None = None,
    full_refresh: bool = False,
    retry_failed: bool = False,
) -> dbt.DbtRun:
    """`dbt deps` when needed, then `dbt build` (or `dbt retry` when the parent run is retrying)."""
    settings = load_settings()
    logger = get_run_logger()
    project = dbt.DbtProject.at(Path(project_dir))
    env = dbt.dbt_environment(settings)
    target = settings.effective_dbt_target

    with tempfile.TemporaryDirectory(prefix="elt-profiles-") as rendered:
        profiles_dir = project.path if settings.dbt_use_project_profiles else Path(rendered)
        if settings.dbt_use_project_profiles and not (project.path / "profiles.yml").is_file():
            raise dbt.DbtInvocationError(
                f"{project.path}: ELT_DBT_USE_PROJECT_PROFILES is set but the project has no profiles.yml"
            )
        if not settings.dbt_use_project_profiles:
            (profiles_dir / "profiles.yml").write_text(dbt.render_profile(settings, project.profile_name))

        run_dbt = dict(profiles_dir=profiles_dir, target=target, env=env, log=logger)
        if project.has_packages:
            dbt.check(dbt.run_dbt(project, ["deps"], **run_dbt))

        if retry_failed and project.run_results_path.exists():
            logger.info("Parent run is a retry: running `dbt retry` to rebuild only what failed or was skipped")
            arguments = ["retry"]
        else:
            arguments = ["build"]
            arguments += ["--select", select] if select else []
            arguments += ["--exclude", exclude] if exclude else []
            arguments += ["--full-refresh"] if full_refresh else []
        run = dbt.run_dbt(project, arguments, on_node=_emit_node_event, **run_dbt)

    _publish_node_results(run)
    return dbt.check(run)


def _emit_node_event(node: dict) -> None:
    emit_event(
        event=f"dbt.node.{str(node['status']).replace(' ', '_')}",
        resource={
            "prefect.resource.id": f"dbt.node.{node['unique_id']}",
            "prefect.resource.name": str(node["name"]),
            "dbt.resource_type": str(node["resource_type"]),
        },
        payload={"status": node["status"], "seconds": node["seconds"], "message": node["message"]},
    )


def _publish_node_results(run: dbt.DbtRun) -> None:
    if not run.results:
        return
    create_table_artifact(
        key="dbt-node-results",
        table=[
            {
                "node": node.unique_id,
                "status": node.status,
                "seconds": node.seconds,
                "rows_affected": node.rows_affected,
                "message": node.short_message if node.failed else (node.message or ""),
            }
            for node in run.results
        ],
        description=f"dbt {run.command}: one row per node",
    )


@flow(name="all-etl")
def all_etl(
    connections: list[str] | None = None,
    full_refresh: bool = False,
    select: str | None = None,
    exclude: str | None = None,
    skip_extract: bool = False,
    skip_pull: bool = False,
    skip_transform: bool = False,
    repo: str | None = None,
    branch: str | None = None,
    project_dir: str | None = None,
) -> EtlSummary:
    """Sync the Airbyte connections, `git pull` the dbt project's repo, then `dbt build`.

    `connections`: names to sync (all when empty). `select`/`exclude`: dbt node selection.
    `repo`, `branch`, `project_dir`: override ELT_GIT_REPO, ELT_GIT_BRANCH, ELT_DBT_PROJECT_DIR.
    """
    settings = load_settings()
    summary = EtlSummary()
    try:
        if not skip_extract:
            runner = ThreadPoolTaskRunner(max_workers=settings.extract_concurrency)
            summary.extract = extract_load.with_options(task_runner=runner)(connections, full_refresh)

        source = git_repo.RepoSource.from_settings(settings, repo, branch)
        if not skip_pull:
            summary.deployed = update_code(repo, branch)

        if not skip_transform:
            folder = source.checkout / (project_dir or settings.dbt_project_dir)
            summary.dbt_run = transform(
                str(folder), select, exclude, full_refresh, retry_failed=(flow_run.run_count or 1) > 1
            )
            if settings.warehouse is Warehouse.duckdb:
                summary.mart_rows = warehouse.mart_row_counts(settings)
    except Exception as exc:
        summary.error = str(exc)
        raise
    finally:
        create_markdown_artifact(key="all-etl-summary", markdown=render_summary(summary), description="What this all-etl run did")
    return summary


def render_summary(summary: EtlSummary) -> str:
    lines = ["# all-etl run", ""]
    if summary.error:
        lines += [f"**Failed:** {summary.error}", ""]
    lines += ["## Extract-load", ""]
    if summary.extract is None:
        lines += ["Skipped or did not finish.", ""]
    else:
        lines += ["| connection.stream | rows |", "|---|---:|"]
        lines += [f"| {name} | {rows:,} |" for name, rows in summary.extract.rows_per_stream.items()]
        lines += [""]
    lines += ["## Code", ""]
    if summary.deployed is None:
        lines += ["Not pulled in this run.", ""]
    else:
        lines += [f"Commit `{summary.deployed.sha}` on `{summary.deployed.branch}`", ""]
    lines += ["## dbt", ""]
    if summary.dbt_run is None:
        lines += ["Skipped or did not finish.", ""]
    else:
        counts: dict[str, int] = {}
        for node in summary.dbt_run.results:
            counts[node.status] = counts.get(node.status, 0) + 1
        lines += [f"`dbt {summary.dbt_run.command}`: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items())), ""]
    if summary.mart_rows:
        lines += ["## Marts", "", "| table | rows |", "|---|---:|"]
        lines += [f"| {table} | {rows:,} |" for table, rows in summary.mart_rows.items()]
    return "\n".join(lines) + "\n"
