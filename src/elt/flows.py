"""The `all-etl` flow: extract-load, update code, transform — each a child flow in the Prefect UI.

This module only wires the system modules together; read it top to bottom. What a run shows in
Prefect (summary, artifacts, events) is src/elt/reporting.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import flow_run
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from elt import alerts, dbt_runner, dbt_state, git_repo, prefect_heartbeats, preflight, processes, reporting, run_lock
from elt.errors import EltError, TransientError, first_line
from elt.extract import backend_for
from elt.extract.base import ExtractBackend, ExtractFailed, ExtractReport, SyncFailure, SyncResult, UnknownConnections
from elt.reporting import EtlSummary
from elt.settings import AirbyteBackend, DbtStart, Settings, load_settings
from elt.warehouse import warehouse_for
from prefect import Task, flow, get_run_logger, task

__all__ = ["EtlSummary", "all_etl", "extract_load", "transform", "update_code"]

prefect_heartbeats.install()  # each of a run's flow runs ends when it ends, not up to 1 s later

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


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry_condition_fn: retry only what a retry can fix (errors.TransientError)."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is terminal: no retry
        return False
    return False


@task(task_run_name="sync-{connection}", cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
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
    backend = backend_for(settings, tag)
    known = backend.connection_names()
    names = connections or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UnknownConnections(unknown, known)

    report = ExtractReport()
    sync = sync_connection.with_options(retries=settings.sync_attempts - 1, retry_delay_seconds=settings.sync_retry_delay_seconds)
    futures = {name: sync.submit(backend, name, full_refresh) for name in names}
    try:
        for name, future in futures.items():
            try:
                report.synced.append(future.result())
            except Exception as exc:  # noqa: BLE001 - recorded; the stage fails below, once every sync has ended
                report.failed.append(SyncFailure(name, first_line(exc)))
    except BaseException:
        # The flow run is being cancelled or killed: stop the syncs this run started.
        backend.cancel_started_jobs()
        processes.stop_children()  # before the task runner waits for the sync threads to end
        raise

    reporting.publish_syncs(report)
    if report.failed:
        raise ExtractFailed(report)
    return report


@flow(name="update-code")
def update_code(repo: str | None = None, branch: str | None = None) -> git_repo.Deployed:
    """Fast-forward the repo that holds the dbt project and record the deployed commit."""
    deployed = git_repo.update_code(git_repo.RepoSource.from_settings(_settings(), repo, branch))
    reporting.publish_deployed(deployed)
    return deployed


@flow(name="transform")
def transform(
    project_dir: str,
    select: str | None = None,
    exclude: str | None = None,
    full_refresh: bool = False,
    retry_failed: bool = False,
    skip_downstream_of: list[str] | None = None,
    only_changed: bool = False,
    commit: str | None = None,
) -> dbt_runner.DbtRun:
    """`dbt deps` when needed, then `dbt build` (or `dbt retry` when the parent run is retrying).

    `skip_downstream_of`: connections whose sync failed; their sources and everything built on
    them are left out, so nothing stale is rebuilt as if it were fresh. So are those of a source
    `dbt source freshness` finds older than its error_after; the run then fails naming it.
    `only_changed`: build only what changed since the saved state of the last build (src/elt/dbt_state.py).
    `commit`: the deployed commit the build's state is saved under (default: the checkout's HEAD).
    """
    settings = _settings()
    alerts.label_run_with_commit()  # the commit all-etl pulled: a dbt warning's alert names it
    logger = get_run_logger()
    project = dbt_runner.DbtProject.at(Path(project_dir))
    warehouse = warehouse_for(settings)
    warehouse.prepare_for_dbt()

    with dbt_runner.dbt_for(settings, project) as dbt:
        if project.has_packages:
            dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["deps"], log=logger))

        freshness: list[dbt_runner.SourceFreshness] = []
        plan: dbt_state.Plan | None = None
        store = dbt_state.StateStore(settings)
        stale: list[str] = []
        if retry_failed and project.run_results_path.exists():
            logger.info("Parent run is a retry: running `dbt retry` to rebuild only what failed or was skipped")
            arguments = ["retry"]
        else:
            stale += dbt_runner.downstream_of_connections(dbt, skip_downstream_of) if skip_downstream_of else []
            if skip_downstream_of:
                logger.warning(
                    "Not building %s: downstream of failed connection(s) %s",
                    " ".join(stale) or "nothing",
                    ", ".join(skip_downstream_of),
                )
            connection_selectors = list(stale)
            freshness = dbt_runner.check_freshness(dbt, stale, log=logger)
            stale += _left_out_as_stale(freshness, logger)
            arguments = dbt_runner.build_arguments(select, exclude, full_refresh=full_refresh, stale=stale)
            if only_changed:
                left_out = dbt_state.left_out_reasons(connection_selectors, skip_downstream_of or [], freshness)
                plan = dbt_state.plan_build(dbt, store, freshness, left_out, select, exclude, full_refresh=full_refresh)
                reporting.publish_plan(plan)
                arguments = plan.arguments
        run = dbt_runner.run_dbt(dbt, arguments, log=logger)
        run.freshness, run.plan = freshness, plan
        complete = plan.complete if plan else not (stale or select or exclude)
        dbt_state.keep_state(
            store, run, commit or dbt_state.deployed_commit(project), complete=complete, with_sources=bool(freshness), log=logger
        )

    reporting.publish_dbt_run(run, warehouse)
    return dbt_runner.raise_if_failed(run)


def _dbt_early(settings: Settings, *, skip_extract: bool, skip_transform: bool) -> AbstractContextManager[Callable[[], None]]:
    """dbt's process, started before the transform needs it, so that dbt's import overlaps the
    syncs; the block calls what it yields once they are done. Embedded syncs run the connector and
    PyAirbyte on this machine, where dbt's process adds its memory (~150 MB) to their peak:
    ELT_DBT_START=after-syncs starts it when they end instead (bench P3 measures both)."""
    if skip_transform:
        return nullcontext(_nothing_to_start)
    after_syncs = (
        not skip_extract and settings.airbyte_backend is AirbyteBackend.embedded and settings.dbt_start is DbtStart.after_syncs
    )
    return dbt_runner.dbt_started_early(settings, now=not after_syncs)


def _nothing_to_start() -> None:
    pass


def _left_out_as_stale(freshness: list[dbt_runner.SourceFreshness], logger: Any) -> list[str]:
    """Selectors of the sources freshness blocks, each logged with why."""
    for source in freshness:
        if source.blocks:
            logger.warning("Not building %s: %s", source.selector, source.line)
        elif source.status == "warn":
            logger.warning("%s (building it anyway: only error_after leaves it out)", source.line)
    return [source.selector for source in freshness if source.blocks]


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
    env: str | None = None,
    only_changed: bool = False,
) -> EtlSummary:
    """Sync the Airbyte connections, `git pull` the dbt project's repo, then `dbt build`.

    `connections`: names to sync (all when empty). `select`/`exclude`: dbt node selection.
    `repo`, `branch`, `project_dir`: override ELT_GIT_REPO, ELT_GIT_BRANCH, ELT_DBT_PROJECT_DIR.
    `tag`: sync only Airbyte connections with this tag (server backend).
    `dbt_target`, `connections_file`: override ELT_DBT_TARGET, ELT_AIRBYTE_CONNECTIONS_FILE.
    `env`: the environment (environments/<env>.env over .env), overriding ELT_ENV.
    `only_changed`: build only the dbt nodes with new code, new rows or a failure last time (docs/operations.md).
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
        tag=tag,
        dbt_target=dbt_target,
        connections_file=connections_file,
        env=env,
    )
    summary = EtlSummary()
    extract_failure: ExtractFailed | None = None
    # The lock before any sync; taking it marks a previous run that died Crashed.
    with (
        _settings_of_this_run(settings),
        run_lock.hold(settings, str(flow_run.id)),
        _dbt_early(settings, skip_extract=skip_extract, skip_transform=skip_transform) as start_dbt,
    ):
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
            start_dbt()

            source = git_repo.RepoSource.from_settings(settings, repo, branch)
            if not skip_pull:
                with summary.timed("update-code"):
                    summary.deployed = update_code(repo, branch)
                reporting.show_deployed_commit_as_version(summary.deployed)
                alerts.label_run_with_commit(summary.deployed.sha)

            if not skip_transform:
                folder = dbt_runner.project_folder(settings, source, project_dir)
                failed = [failure.connection for failure in extract_failure.report.failed] if extract_failure else None
                with summary.timed("transform"):
                    summary.dbt_run = transform(
                        str(folder),
                        select,
                        exclude,
                        full_refresh,
                        retry_failed=(flow_run.run_count or 1) > 1,
                        skip_downstream_of=failed,
                        only_changed=only_changed,
                        commit=summary.deployed.sha if summary.deployed else None,
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
            reporting.publish_summary(summary)
    return summary
