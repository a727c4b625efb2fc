"""The `all-etl` flow: extract-load, update code, transform — each a child flow in the Prefect UI.

This module only wires the system modules together; read it top to bottom.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.events import emit_event
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from elt import dbt_runner, git_repo, preflight, processes, run_lock
from elt.errors import EltError
from elt.extract.base import (
    ExtractBackend,
    ExtractFailed,
    ExtractReport,
    SyncFailure,
    SyncResult,
    UnknownConnections,
)
from elt.settings import AirbyteBackend, Settings, load_settings
from elt.warehouse import Warehouse, warehouse_for
from prefect import flow, get_client, get_run_logger, task

# The settings of the all-etl run in progress in this process. Its child flows read them here:
# a Settings object can't be a flow parameter (Prefect records parameters in the flow run).
_run_settings: ContextVar[Settings | None] = ContextVar("elt_run_settings", default=None)


def _settings() -> Settings:
    """The running all-etl's settings; loaded afresh for a child flow run on its own."""
    return _run_settings.get() or load_settings()


@contextmanager
def _settings_of_this_run(settings: Settings) -> Iterator[None]:
    token = _run_settings.set(settings)
    try:
        yield
    finally:
        _run_settings.reset(token)


@dataclass
class EtlSummary:
    extract: ExtractReport | None = None
    deployed: git_repo.Deployed | None = None
    dbt_run: dbt_runner.DbtRun | None = None
    mart_rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.stage_seconds[stage] = round(time.monotonic() - started, 2)


def make_backend(settings: Settings, tag: str | None = None) -> ExtractBackend:
    if settings.airbyte_backend is AirbyteBackend.embedded:
        from elt.extract.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    from elt.extract.server import ServerBackend

    return ServerBackend(settings, tag=tag)


@task(task_run_name="sync-{connection}", cache_policy=NO_CACHE)
def sync_connection(backend: ExtractBackend, connection: str, full_refresh: bool) -> SyncResult:
    result = backend.sync(connection, full_refresh=full_refresh)
    detail = ", ".join(f"{stream} {rows}" for stream, rows in (result.rows_per_stream or {}).items())
    get_run_logger().info("%s: %d rows%s in %.1fs", connection, result.rows, f" ({detail})" if detail else "", result.seconds)
    return result


@flow(name="extract-load")
def extract_load(connections: list[str] | None = None, full_refresh: bool = False, tag: str | None = None) -> ExtractReport:
    """Sync the chosen connections (all, or those with `tag`, when none are named) concurrently.

    Every sync runs to its end even when another fails; the stage then fails naming the failed ones.
    """
    settings = _settings()
    backend = make_backend(settings, tag)
    known = backend.connection_names()
    names = connections or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UnknownConnections(unknown, known)

    report = ExtractReport()
    futures = {name: sync_connection.submit(backend, name, full_refresh) for name in names}
    try:
        for name, future in futures.items():
            try:
                report.synced.append(future.result())
            except Exception as exc:  # noqa: BLE001 - recorded; the stage fails below, once every sync has ended
                report.failed.append(SyncFailure(name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    except BaseException:
        # The flow run is being cancelled or killed: stop the syncs this run started.
        backend.cancel_started_jobs()
        processes.stop_children()  # before the task runner waits for the sync threads to end
        raise

    create_table_artifact(key="extract-load-results", table=_sync_rows(report), description="This run's syncs")
    if report.failed:
        raise ExtractFailed(report)
    return report


def _sync_rows(report: ExtractReport) -> list[dict]:
    rows = []
    for result in report.synced:
        streams = result.rows_per_stream or {"": result.rows}
        rows += [
            {
                "connection": result.connection,
                "stream": stream,
                "status": "succeeded",
                "rows": count,
                "bytes": result.bytes_synced,
                "seconds": round(result.seconds, 1),
                "job": result.job_id,
                "link": result.job_url,
            }
            for stream, count in streams.items()
        ]
    rows += [
        {
            "connection": failure.connection,
            "stream": "",
            "status": "failed",
            "rows": None,
            "bytes": None,
            "seconds": None,
            "job": None,
            "link": failure.error,
        }
        for failure in report.failed
    ]
    return rows


@flow(name="update-code")
def update_code(repo: str | None = None, branch: str | None = None) -> git_repo.Deployed:
    """Fast-forward the repo that holds the dbt project and record the deployed commit."""
    settings = _settings()
    deployed = git_repo.update_code(git_repo.RepoSource.from_settings(settings, repo, branch))
    get_run_logger().info("Deployed %s@%s (%s)", deployed.branch, deployed.sha, "updated" if deployed.changed else "unchanged")
    create_table_artifact(
        key="deployed-commit",
        table=[
            {
                "commit": deployed.sha,
                "branch": deployed.branch,
                "pulled": "updated" if deployed.changed else "unchanged",
                "previous commit": deployed.previous_sha if deployed.changed else "",
                "repo": git_repo.scrub_location(deployed.repo),
            }
        ],
        description="The commit of the dbt project this run built",
    )
    return deployed


def _show_deployed_commit_as_version(deployed: git_repo.Deployed) -> None:
    """The deployment's Version in the Prefect UI becomes the commit this run deployed
    (`prefect deploy` records the commit of deploy time, which every `git pull` makes stale).

    Only when it differs: Prefect drops a deployment's future auto-scheduled runs on every
    update (and its scheduler makes them again).
    """
    deployment_id = deployment.id
    if not deployment_id:
        return
    with get_client(sync_client=True) as client:
        if client.read_deployment(deployment_id).version != deployed.sha:
            client.update_deployment(deployment_id, DeploymentUpdate(version=deployed.sha))


@flow(name="transform")
def transform(
    project_dir: str,
    select: str | None = None,
    exclude: str | None = None,
    full_refresh: bool = False,
    retry_failed: bool = False,
    skip_downstream_of: list[str] | None = None,
) -> dbt_runner.DbtRun:
    """`dbt deps` when needed, then `dbt build` (or `dbt retry` when the parent run is retrying).

    `skip_downstream_of`: connections whose sync failed; their sources and everything built on
    them are left out, so nothing stale is rebuilt as if it were fresh.
    """
    settings = _settings()
    logger = get_run_logger()
    project = dbt_runner.DbtProject.at(Path(project_dir))
    warehouse = warehouse_for(settings)
    warehouse.prepare_for_dbt()

    with dbt_runner.dbt_for(settings, project) as dbt:
        if project.has_packages:
            dbt_runner.check(dbt_runner.run_dbt(dbt, ["deps"], log=logger))

        if retry_failed and project.run_results_path.exists():
            logger.info("Parent run is a retry: running `dbt retry` to rebuild only what failed or was skipped")
            arguments = ["retry"]
        else:
            excluded = [exclude] if exclude else []
            if skip_downstream_of:
                stale = dbt_runner.downstream_of_connections(dbt, skip_downstream_of)
                logger.warning(
                    "Not building %s: downstream of failed connection(s) %s",
                    " ".join(stale) or "nothing",
                    ", ".join(skip_downstream_of),
                )
                excluded += stale
            arguments = ["build"]
            arguments += ["--select", select] if select else []
            arguments += ["--exclude", " ".join(excluded)] if excluded else []
            arguments += ["--full-refresh"] if full_refresh else []
        run = dbt_runner.run_dbt(dbt, arguments, log=logger)
    for node in run.results:
        _emit_node_event(node)

    _publish_node_results(run)
    run.cost = _publish_cost(warehouse)
    return dbt_runner.check(run)


_UNEVENTFUL = frozenset({"success", "pass"})


def _emit_node_event(node: dbt_runner.NodeResult) -> None:
    """A Prefect event for each node that did not simply succeed, so automations can react to it.

    Successes are in the dbt-node-results artifact; an event each would cost this process CPU
    per node for nothing an automation needs.
    """
    if node.status in _UNEVENTFUL:
        return
    emit_event(
        event=f"dbt.node.{node.status.replace(' ', '_')}",
        resource={
            "prefect.resource.id": f"dbt.node.{node.unique_id}",
            "prefect.resource.name": node.unique_id.split(".")[-1],
            "dbt.resource_type": node.unique_id.split(".")[0],
        },
        payload={"status": node.status, "seconds": node.seconds, "message": node.short_message},
    )


def _publish_cost(warehouse: Warehouse) -> str | None:
    """Cost of this all-etl run (embedded load and dbt), as an artifact and one line; when the
    warehouse can't say, both say why. None where queries cost nothing (DuckDB)."""
    key = f"{warehouse.name.lower()}-cost"
    try:
        cost = warehouse.run_cost()
    except Exception as exc:  # noqa: BLE001 - observability only: the data is built; say why the cost is missing
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        get_run_logger().warning("%s cost of this run is unknown: %s", warehouse.name, reason)
        create_markdown_artifact(key=key, markdown=f"Cost unknown: {reason}")
        return f"unknown: {reason}"
    if cost is None:
        return None
    create_table_artifact(key=key, table=cost.rows, description=cost.description)
    return cost.line


def _publish_node_results(run: dbt_runner.DbtRun) -> None:
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
@processes.guard_run  # the run's children end with it, kill -9 included
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
    tag: str | None = None,
    dbt_target: str | None = None,
    connections_file: str | None = None,
) -> EtlSummary:
    """Sync the Airbyte connections, `git pull` the dbt project's repo, then `dbt build`.

    `connections`: names to sync (all when empty). `select`/`exclude`: dbt node selection.
    `repo`, `branch`, `project_dir`: override ELT_GIT_REPO, ELT_GIT_BRANCH, ELT_DBT_PROJECT_DIR.
    `tag`: sync only Airbyte connections with this tag (server backend).
    `dbt_target`, `connections_file`: override ELT_DBT_TARGET, ELT_AIRBYTE_CONNECTIONS_FILE.
    A failed sync does not stop the run: dbt builds everything not downstream of it, then the
    run fails naming the failed connections.
    """
    # A deployment run (UI, schedule) is checked here, before any sync; under `elt run` this
    # returns the settings the CLI checked before Prefect started.
    settings = preflight.check_run(
        connections=connections,
        repo=repo,
        branch=branch,
        project_dir=project_dir,
        skip_extract=skip_extract,
        skip_pull=skip_pull,
        skip_transform=skip_transform,
        dbt_target=dbt_target,
        connections_file=connections_file,
    )
    # The lock before any sync; taking it marks a previous run that died Crashed.
    with _settings_of_this_run(settings), run_lock.hold(settings, str(flow_run.id)):
        return _all_stages(
            settings,
            connections,
            full_refresh,
            select,
            exclude,
            skip_extract,
            skip_pull,
            skip_transform,
            repo,
            branch,
            project_dir,
            tag,
        )


def _all_stages(
    settings: Settings,
    connections: list[str] | None,
    full_refresh: bool,
    select: str | None,
    exclude: str | None,
    skip_extract: bool,
    skip_pull: bool,
    skip_transform: bool,
    repo: str | None,
    branch: str | None,
    project_dir: str | None,
    tag: str | None,
) -> EtlSummary:
    summary = EtlSummary()
    extract_failure: ExtractFailed | None = None
    try:
        if not skip_extract:
            runner = ThreadPoolTaskRunner[Any](max_workers=settings.extract_concurrency)
            with summary.timed("extract-load"):
                # Prefect types task_runner as a TaskRunner of plain PrefectFutures; the thread pool's are a subclass.
                configured = extract_load.with_options(task_runner=runner)  # type: ignore[arg-type]
                state = configured(connections, full_refresh, tag, return_state=True)
            try:
                summary.extract = state.result()
            except ExtractFailed as failure:
                summary.extract, extract_failure = failure.report, failure

        source = git_repo.RepoSource.from_settings(settings, repo, branch)
        if not skip_pull:
            with summary.timed("update-code"):
                summary.deployed = update_code(repo, branch)
            _show_deployed_commit_as_version(summary.deployed)

        if not skip_transform:
            folder = dbt_runner.project_folder(settings, source, project_dir)
            failed_connections = [failure.connection for failure in extract_failure.report.failed] if extract_failure else None
            with summary.timed("transform"):
                summary.dbt_run = transform(
                    str(folder),
                    select,
                    exclude,
                    full_refresh,
                    retry_failed=(flow_run.run_count or 1) > 1,
                    skip_downstream_of=failed_connections,
                )
            summary.mart_rows = warehouse_for(settings).mart_row_counts(summary.dbt_run)
        if extract_failure:
            raise extract_failure
    except Exception as exc:
        summary.error = str(exc)
        if extract_failure and exc is not extract_failure:
            summary.error = f"{extract_failure}; and then: {exc}"
            raise EltError(summary.error) from exc
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
        lines += [
            f"`dbt {summary.dbt_run.command}`: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items())),
            "",
        ]
    if summary.stage_seconds:
        lines += ["## Time", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in summary.stage_seconds.items()]
        lines += [""]
    if summary.mart_rows:
        lines += ["## Marts", "", "| table | rows |", "|---|---:|"]
        lines += [f"| {table} | {rows:,} |" for table, rows in summary.mart_rows.items()]
    return "\n".join(lines) + "\n"
