"""`elt`: run all-etl on this machine and check its configuration."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from pydantic import ValidationError

from elt import temporary_server
from elt.errors import EltError, first_line
from elt.settings import AirbyteBackend

if TYPE_CHECKING:
    from prefect.states import State

    from elt.reporting import EtlSummary
    from elt.settings import Settings

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The ELT appliance's command line.")


@app.command()
def run(
    connection: Annotated[
        list[str] | None, typer.Option("--connection", "-c", help="Sync only this connection (repeatable). Default: all.")
    ] = None,
    full_refresh: Annotated[
        bool, typer.Option("--full-refresh", help="Re-sync from scratch and rebuild incremental models.")
    ] = False,
    select: Annotated[
        str | None, typer.Option("--select", "-s", help="dbt node selection, e.g. 'marts' or '+daily_revenue'.")
    ] = None,
    exclude: Annotated[str | None, typer.Option("--exclude", help="dbt nodes to leave out.")] = None,
    skip_extract: Annotated[bool, typer.Option("--skip-extract", help="Do not sync Airbyte connections.")] = False,
    skip_pull: Annotated[bool, typer.Option("--skip-pull", help="Build the checkout as it is, without git pull.")] = False,
    skip_transform: Annotated[bool, typer.Option("--skip-transform", help="Do not run dbt.")] = False,
    repo: Annotated[
        str | None, typer.Option("--repo", help="Repo holding the dbt project (URL or path). Default: ELT_GIT_REPO.")
    ] = None,
    branch: Annotated[str | None, typer.Option("--branch", help="Branch to deploy. Default: ELT_GIT_BRANCH.")] = None,
    project_dir: Annotated[
        str | None, typer.Option("--project-dir", help="dbt project folder in the repo. Default: ELT_DBT_PROJECT_DIR.")
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help="dbt target. Default: ELT_DBT_TARGET or the warehouse.")] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Sync only Airbyte connections with this tag (server backend).")
    ] = None,
    connections_file: Annotated[
        str | None, typer.Option("--connections-file", help="Embedded connections file. Default: ELT_AIRBYTE_CONNECTIONS_FILE.")
    ] = None,
    env: Annotated[
        str | None, typer.Option("--env", help="Environment: environments/<env>.env over .env. Default: ELT_ENV.")
    ] = None,
    only_changed: Annotated[
        bool, typer.Option("--only-changed", help="Build only dbt nodes with new code, new rows or a failure last run.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of an error, not only its message.")] = False,
) -> None:
    """Run the all-etl flow here: sync connections, pull the dbt project, dbt build."""
    checked = dict(
        connections=connection or None,
        repo=repo,
        branch=branch,
        project_dir=project_dir,
        skip_extract=skip_extract,
        skip_pull=skip_pull,
        skip_transform=skip_transform,
        tag=tag,
        dbt_target=target,
        connections_file=connections_file,
        env=env,
    )
    with ExitStack() as stack:
        settings = _fail_on_bad_settings(debug, stack, **checked)
        # Read by Prefect once, when the temporary server starts: a busy machine needs the time.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        _or_exit(lambda: temporary_server.prepare(settings.path(settings.data_dir)))
        server = temporary_server.start()  # comes up while the imports below run

        from elt.flows import all_etl
        from elt.processes import run_with_watchdog

        if not skip_extract and settings.airbyte_backend == AirbyteBackend.embedded:
            from elt.extract.embedded import preload_pyairbyte

            preload_pyairbyte()
        if server:
            stack.enter_context(_or_exit(server.wait_and_use))

        # The watchdog starts before Prefect does: a temporary Prefect server is a child of the run too.
        # return_state=True: Prefect's engine returns the final State, not the flow's value.
        state = cast(
            "State[EtlSummary]",
            run_with_watchdog(
                all_etl,
                **checked,
                full_refresh=full_refresh,
                select=select,
                exclude=exclude,
                only_changed=only_changed,
                return_state=True,
            ),
        )
    _send_prefect_backlog()
    if not state.is_completed():
        if debug:
            _print_state_traceback(state)
        typer.secho(f"all-etl {state.name}: {_state_message(state)}", fg="red", err=True)
        raise typer.Exit(1)
    _print_summary(state.result())


@app.command()
def plan(
    select: Annotated[str | None, typer.Option("--select", "-s", help="dbt node selection, as for elt run.")] = None,
    exclude: Annotated[str | None, typer.Option("--exclude", help="dbt nodes to leave out.")] = None,
    repo: Annotated[
        str | None, typer.Option("--repo", help="Repo holding the dbt project (URL or path). Default: ELT_GIT_REPO.")
    ] = None,
    project_dir: Annotated[
        str | None, typer.Option("--project-dir", help="dbt project folder in the repo. Default: ELT_DBT_PROJECT_DIR.")
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help="dbt target. Default: ELT_DBT_TARGET or the warehouse.")] = None,
    env: Annotated[
        str | None, typer.Option("--env", help="Environment: environments/<env>.env over .env. Default: ELT_ENV.")
    ] = None,
) -> None:
    """Print what `elt run --only-changed` builds and skips, one line per dbt node with why, building
    nothing: the checkout as it is (no sync, no git pull); runs dbt source freshness."""
    from elt.dbt_runner import project_folder
    from elt.dbt_state import plan_checkout
    from elt.git_repo import RepoSource
    from elt.preflight import run_settings

    settings = _or_exit(lambda: run_settings(dbt_target=target, env=env))
    folder = project_folder(settings, RepoSource.from_settings(settings, repo), project_dir)
    planned = _or_exit(lambda: plan_checkout(settings, folder, select, exclude))
    for line in planned.lines():
        typer.echo(line)
    counts = planned.counts
    typer.echo(f"{counts['run']} to run, {counts['skip']} to skip: {planned.note}")


@app.command()
def doctor(
    env: Annotated[str | None, typer.Option("--env", help="Check this environment. Default: ELT_ENV.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of each failed check.")] = False,
) -> None:
    """Check the configuration and that every configured dependency is reachable; every check runs."""
    from elt.doctor import run_checks

    problems = 0
    for check in run_checks(env):
        if debug and check.traceback:
            typer.echo(check.traceback.rstrip(), err=True)
        if check.ok:
            mark = typer.style("ok  ", fg="green")
        else:
            mark = typer.style("FAIL", fg="red") if check.checked else typer.style("skip", fg="yellow")
        first, *more = check.detail.splitlines() or [""]
        typer.echo(f"{mark} {check.name}: {first}")
        for line in more:
            typer.echo(f"       - {line}")
        problems += check.checked and not check.ok
    if problems:
        typer.secho(f"{problems} problem(s) found", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo("all checks passed")


@app.command()
def deploy() -> None:
    """Deploy all-etl to the Prefect server in PREFECT_API_URL: one deployment, or one per environment."""
    from elt.deployments import deploy as deploy_all
    from elt.settings import load_settings

    home = _or_exit(lambda: load_settings().home)
    for name in _or_exit(lambda: deploy_all(home)):
        typer.echo(f"deployed {name}")


warehouse_app = typer.Typer(no_args_is_help=True, help="Back up and restore the DuckDB warehouse.")
app.add_typer(warehouse_app, name="warehouse")


@warehouse_app.command("backup")
def warehouse_backup(
    destination: Annotated[Path, typer.Argument(help="File to write; '-' writes to stdout.")],
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for a running all-etl to finish.")] = 3600,
    env: Annotated[str | None, typer.Option("--env", help="This environment's warehouse. Default: ELT_ENV.")] = None,
) -> None:
    """A consistent copy of the warehouse, taken when no all-etl run is writing to it."""
    from elt.backup import backup_warehouse
    from elt.preflight import run_settings

    size = _or_exit(lambda: backup_warehouse(run_settings(env=env), destination, wait))
    typer.echo(f"warehouse backup: {size} bytes to {'stdout' if str(destination) == '-' else destination}", err=True)


@warehouse_app.command("restore")
def warehouse_restore(
    source: Annotated[Path, typer.Argument(help="Backup file; '-' reads stdin.")],
    env: Annotated[str | None, typer.Option("--env", help="This environment's warehouse. Default: ELT_ENV.")] = None,
) -> None:
    """Replace the warehouse with a backup (refused while an all-etl run uses it)."""
    from elt.backup import restore_warehouse
    from elt.preflight import run_settings

    size = _or_exit(lambda: restore_warehouse(run_settings(env=env), source))
    typer.echo(f"warehouse restored: {size} bytes from {'stdin' if str(source) == '-' else source}", err=True)


def _or_exit(action: Callable[[], T]) -> T:
    try:
        return action()
    except (EltError, ValidationError) as exc:
        typer.secho(f"error: {' | '.join(str(exc).splitlines())}", fg="red", err=True)
        raise typer.Exit(1) from None


alert_app = typer.Typer(no_args_is_help=True, help="The alert channels of .env (Slack, email, webhook).")
app.add_typer(alert_app, name="alert")


@alert_app.command("test")
def alert_test() -> None:
    """Send one test message to each configured alert channel and say what each answered."""
    from elt.alerts import NO_CHANNEL, channels, send_test
    from elt.settings import load_settings

    try:
        configured = channels(load_settings())
    except EltError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if not configured:
        typer.secho(f"error: {NO_CHANNEL}; set one in .env (docs/operations.md, Alerts)", fg="red", err=True)
        raise typer.Exit(2)
    answers = [send_test(channel) for channel in configured]
    for answer in answers:
        typer.echo(answer.line)
    if not all(answer.ok for answer in answers):
        raise typer.Exit(1)


def _fail_on_bad_settings(debug: bool, stack: ExitStack, **run: Any) -> Settings:
    """Refuse to start a run whose configuration can't work, before Prefect spins up: one line
    naming the variable or file and the fix (src/elt/preflight.py has every check). Until `stack`
    closes, the flow's own check of this run returns these checked settings."""
    from elt import preflight

    try:
        return stack.enter_context(preflight.checked_once(**run))
    except EltError as exc:
        if debug:
            traceback.print_exc()
        typer.secho(f"error: {' | '.join(str(exc).splitlines())}", fg="red", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # a check itself broke: say so in one line; --debug shows where
        if debug:
            raise
        typer.secho(
            f"error: checking the configuration failed: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from None


def _send_prefect_backlog() -> None:
    """Send the logs and events Prefect still queues, so that its shutdown warnings ("Still processing
    items") come before the run's last line and not after it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30, at_exit=False)


def _print_state_traceback(state: State[Any]) -> None:
    try:
        state.result()
    except Exception:  # noqa: BLE001 - any failure of the flow: --debug prints its traceback
        traceback.print_exc()


def _state_message(state: State[Any]) -> str:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the flow's own exception carries the message the user needs
        return first_line(exc)
    return state.message or "no message"


def _print_summary(summary: EtlSummary) -> None:
    typer.echo("")
    typer.secho("all-etl completed", fg="green", bold=True)
    if summary.extract:
        for name, rows in summary.extract.rows_per_stream.items():
            typer.echo(f"  loaded   {name:<40} {rows:>10,} rows")
    if summary.deployed:
        typer.echo(f"  commit   {summary.deployed.sha} ({summary.deployed.branch})")
    if summary.dbt_run:
        counts: dict[str, int] = {}
        for node in summary.dbt_run.results:
            counts[node.status] = counts.get(node.status, 0) + 1
        typer.echo(f"  dbt      {summary.dbt_run.command}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
        if summary.dbt_run.plan:
            planned = summary.dbt_run.plan.counts
            typer.echo(f"  plan     only changed: {planned['run']} built, {planned['skip']} skipped")
    for table, rows in summary.mart_rows.items():
        typer.echo(f"  mart     {table:<40} {rows:>10,} rows")
    if summary.dbt_run and summary.dbt_run.cost:
        typer.echo(f"  cost     {summary.dbt_run.cost}")
    if summary.stage_seconds:
        typer.echo("  time     " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in summary.stage_seconds.items()))
