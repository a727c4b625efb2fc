"""dbt in its own process, against real DuckDB: results per node, failures named, profiles rendered."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
import yaml

from elt import dbt_runner
from elt.errors import ConfigurationError
from elt.settings import load_settings
from elt.warehouse import warehouse_for
from tests.conftest import REPO_ROOT, TINY_PROJECT


@pytest.fixture
def project(tmp_path: Path) -> dbt_runner.DbtProject:
    folder = tmp_path / "tiny_shop"
    shutil.copytree(TINY_PROJECT, folder)
    return dbt_runner.DbtProject.at(folder)


@pytest.fixture
def profiles_dir(tmp_path: Path, project: dbt_runner.DbtProject, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ELT_DUCKDB_PATH", str(tmp_path / "warehouse.duckdb"))
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "profiles.yml").write_text(dbt_runner.render_profile(load_settings(), project.profile_name))
    return folder


def _dbt(project: dbt_runner.DbtProject, profiles_dir: Path, target: str = "duckdb") -> dbt_runner.Dbt:
    return dbt_runner.Dbt(project, profiles_dir, target, dbt_runner.dbt_environment(load_settings()))


def _build(project: dbt_runner.DbtProject, profiles_dir: Path, *arguments: str) -> dbt_runner.DbtRun:
    return dbt_runner.run_dbt(_dbt(project, profiles_dir), ["build", *arguments])


def test_profile_is_rendered_under_the_projects_own_profile_name(
    tmp_path: Path, project: dbt_runner.DbtProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELT_DUCKDB_PATH", str(tmp_path / "w.duckdb"))
    rendered = yaml.safe_load(dbt_runner.render_profile(load_settings(), project.profile_name))
    assert list(rendered) == ["tiny_shop_warehouse"]
    output = rendered["tiny_shop_warehouse"]["outputs"]["duckdb"]
    assert output["type"] == "duckdb" and output["path"] == str(tmp_path / "w.duckdb")


def test_snowflake_profile_keeps_secrets_out_of_the_file(project: dbt_runner.DbtProject, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered file refers to the password through env_var(); only the dbt process's environment holds it."""
    for name, value in {
        "ELT_WAREHOUSE": "snowflake",
        "SNOWFLAKE_ACCOUNT": "acme",
        "SNOWFLAKE_USER": "u",
        "SNOWFLAKE_WAREHOUSE": "w",
        "SNOWFLAKE_DATABASE": "d",
        "SNOWFLAKE_PASSWORD": "p@ss/w0rd@",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    text = dbt_runner.render_profile(settings, project.profile_name)
    assert "p@ss/w0rd@" not in text
    output = yaml.safe_load(text)["tiny_shop_warehouse"]["outputs"]["snowflake"]
    assert output["password"] == "{{ env_var('SNOWFLAKE_PASSWORD') }}"
    assert dbt_runner.dbt_environment(settings)["SNOWFLAKE_PASSWORD"] == "p@ss/w0rd@"


def test_build_reports_every_node(project: dbt_runner.DbtProject, profiles_dir: Path, tmp_path: Path) -> None:
    run = dbt_runner.raise_if_failed(_build(project, profiles_dir))
    statuses = {node.unique_id: node.status for node in run.results}
    assert statuses["seed.tiny_shop.orders"] == "success"
    assert statuses["model.tiny_shop.customer_totals"] == "success"
    tests = [status for unique_id, status in statuses.items() if unique_id.startswith("test.tiny_shop.")]
    assert tests == ["pass", "pass"]
    model = next(node for node in run.results if node.unique_id == "model.tiny_shop.customer_totals")
    assert (model.relation_name, model.materialized) == ('"warehouse"."main_marts"."customer_totals"', "table")
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        assert connection.execute("select sum(order_count) from main_marts.customer_totals").fetchone()[0] == 3


def test_failed_models_are_all_named_and_downstream_is_skipped(project: dbt_runner.DbtProject, profiles_dir: Path) -> None:
    """Two models fail: the message names both, each with dbt's own cause; what needs one is skipped."""
    (project.path / "models" / "broken.sql").write_text("select * from {{ ref('orders') }} where no_such_column = 1\n")
    (project.path / "models" / "also_broken.sql").write_text("select other_missing_column from {{ ref('orders') }}\n")
    (project.path / "models" / "after_broken.sql").write_text("select * from {{ ref('broken') }}\n")
    run = _build(project, profiles_dir)
    with pytest.raises(dbt_runner.DbtBuildFailed) as error:
        dbt_runner.raise_if_failed(run)
    message = str(error.value)
    assert message.startswith("dbt build failed on 2 node(s): model.tiny_shop."), message
    failed = dict(re.findall(r"(model\.tiny_shop\.\w+) \(error: ([^;]*)\)", message))
    assert sorted(failed) == ["model.tiny_shop.also_broken", "model.tiny_shop.broken"], message
    assert "no_such_column" in failed["model.tiny_shop.broken"]
    assert "other_missing_column" in failed["model.tiny_shop.also_broken"]
    assert [node.unique_id for node in error.value.failed] == [node.unique_id for node in run.failed_nodes]
    statuses = {node.unique_id: node.status for node in run.results}
    assert statuses["model.tiny_shop.after_broken"] == "skipped"
    assert statuses["model.tiny_shop.customer_totals"] == "success"


def test_failed_test_names_the_test(project: dbt_runner.DbtProject, profiles_dir: Path) -> None:
    (project.path / "seeds" / "orders.csv").write_text("order_id,customer,amount\n1,ada,1\n2,,2\n")
    with pytest.raises(dbt_runner.DbtBuildFailed, match=r"test\.tiny_shop\.not_null_customer_totals_customer"):
        dbt_runner.raise_if_failed(_build(project, profiles_dir))


def test_retry_rebuilds_only_what_failed(project: dbt_runner.DbtProject, profiles_dir: Path) -> None:
    """`dbt retry` after a fix runs the failed node and what it skipped, not the whole project."""
    broken = project.path / "models" / "broken.sql"
    broken.write_text("select no_such_column from {{ ref('orders') }}\n")
    first = _build(project, profiles_dir)
    assert first.failed_nodes
    broken.write_text("select order_id from {{ ref('orders') }}\n")
    retried = dbt_runner.raise_if_failed(dbt_runner.run_dbt(_dbt(project, profiles_dir), ["retry"]))
    assert [node.unique_id for node in retried.results] == ["model.tiny_shop.broken"]


def test_unusable_profile_is_an_invocation_error(project: dbt_runner.DbtProject, tmp_path: Path) -> None:
    (tmp_path / "profiles.yml").write_text("some_other_profile: {target: x, outputs: {x: {type: duckdb, path: ':memory:'}}}\n")
    run = dbt_runner.run_dbt(_dbt(project, tmp_path, "x"), ["build"])
    with pytest.raises(dbt_runner.DbtInvocationError, match="tiny_shop_warehouse"):
        dbt_runner.raise_if_failed(run)


def test_missing_project_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as error:
        dbt_runner.DbtProject.at(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: no dbt_project.yml; set ELT_DBT_PROJECT_DIR (or --project-dir) to the dbt project's folder in the repo"
    )


def test_projects_own_profiles_when_told(project: dbt_runner.DbtProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ELT_DBT_USE_PROJECT_PROFILES: dbt reads the repo's profiles.yml (here: schema own_profile)."""
    monkeypatch.setenv("ELT_DBT_USE_PROJECT_PROFILES", "true")
    monkeypatch.setenv("TINY_SHOP_DUCKDB", str(tmp_path / "own.duckdb"))
    monkeypatch.setenv("ELT_DBT_TARGET", "local")
    settings = load_settings()
    with dbt_runner.dbt_for(settings, project) as dbt:
        assert dbt.profiles_dir == project.path
        run = dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["build"]))
    assert run.results
    with duckdb.connect(str(tmp_path / "own.duckdb"), read_only=True) as connection:
        assert connection.execute("select count(*) from own_profile_marts.customer_totals").fetchone()[0] == 2
    (project.path / "profiles.yml").unlink()
    with (
        pytest.raises(ConfigurationError, match=r"ELT_DBT_USE_PROJECT_PROFILES is set but the project has no profiles\.yml$"),
        dbt_runner.profiles_dir(settings, project),
    ):
        pass


def test_row_counts_are_of_this_runs_models_only(project: dbt_runner.DbtProject, profiles_dir: Path, tmp_path: Path) -> None:
    """Another project (tiny_shop) has built main_marts.customer_totals in the same warehouse;
    a second project's run counts only the table it built, in its real relation."""
    dbt_runner.raise_if_failed(_build(project, profiles_dir))
    other = tmp_path / "other_shop"
    shutil.copytree(TINY_PROJECT, other)
    (other / "dbt_project.yml").write_text(
        (other / "dbt_project.yml")
        .read_text()
        .replace("tiny_shop", "other_shop")
        .replace("profile: other_shop_warehouse", "profile: tiny_shop_warehouse")
    )
    (other / "models" / "schema.yml").unlink()
    (other / "models" / "customer_totals.sql").rename(other / "models" / "order_amounts.sql")
    (other / "models" / "big_orders.sql").write_text(
        "{{ config(materialized='view') }}\nselect * from {{ ref('orders') }} where amount > 5\n"
    )
    run = dbt_runner.raise_if_failed(_build(dbt_runner.DbtProject.at(other), profiles_dir))
    assert warehouse_for(load_settings()).mart_row_counts(run) == {"warehouse.main_marts.order_amounts": 2}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_warehouse_fails_with_dbts_own_error_logged_at_error(
    project: dbt_runner.DbtProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Snowflake on a closed port, and a deprecated property in the project so that dbt's
    deprecation summary is the last thing it prints: the failure names dbt's connection error,
    which is also logged at ERROR; the deprecation notice is a WARNING."""
    (project.path / "models" / "sources.yml").write_text(
        "version: 2\nsources:\n  - name: shop\n    meta: {owner: tests}\n    tables: [{name: raw_orders}]\n"
    )
    for name, value in {
        "ELT_WAREHOUSE": "snowflake",
        "SNOWFLAKE_ACCOUNT": "acme-test",
        "SNOWFLAKE_USER": "U",
        "SNOWFLAKE_PASSWORD": "p",
        "SNOWFLAKE_WAREHOUSE": "W",
        "SNOWFLAKE_DATABASE": "ANALYTICS",
        "SNOWFLAKE_HOST": "127.0.0.1",
        "SNOWFLAKE_PORT": str(_closed_port()),
        "SNOWFLAKE_PROTOCOL": "http",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    (tmp_path / "profiles.yml").write_text(dbt_runner.render_profile(settings, project.profile_name))
    with caplog.at_level(logging.INFO, logger="tests.dbt"):
        dbt = dbt_runner.Dbt(project, tmp_path, "snowflake", dbt_runner.dbt_environment(settings))
        run = dbt_runner.run_dbt(dbt, ["build"], log=logging.getLogger("tests.dbt"))
    assert "Deprecation" in " ".join(run.output_tail[-6:])  # what the old tail-based message reported
    with pytest.raises(dbt_runner.DbtInvocationError) as error:
        dbt_runner.raise_if_failed(run)
    assert str(error.value).startswith(
        f'dbt build in {project.path} could not run: Database error while listing schemas in database "ANALYTICS": '
        "250001: Could not connect to Snowflake backend after "
    ), str(error.value)
    errors = [record.getMessage().strip() for record in caplog.records if record.levelno == logging.ERROR]
    assert any(message.startswith("250001: Could not connect to Snowflake backend") for message in errors), errors
    assert not any("Deprecat" in message for message in errors)
    assert any(
        "PropertyMovedToConfigDeprecation" in record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
    )


def test_default_project_names_its_connection_under_config_without_deprecations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dbt 1.10+ wants a source's `meta` under `config:`; the connection is still found there."""
    project_dir = tmp_path / "appliance"
    shutil.copytree(REPO_ROOT / "dbt", project_dir, ignore=shutil.ignore_patterns("target", "logs"))
    monkeypatch.setenv("ELT_DUCKDB_PATH", str(tmp_path / "w.duckdb"))
    settings = load_settings()
    project = dbt_runner.DbtProject.at(project_dir)
    with dbt_runner.dbt_for(settings, project) as dbt:
        parsed = dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["parse", "--no-partial-parse"]))
        assert not any("Deprecation" in line for line in parsed.output_tail), parsed.output_tail
        assert dbt_runner.downstream_of_connections(dbt, ["faker"]) == [
            "source:faker.products+",
            "source:faker.purchases+",
            "source:faker.users+",
        ]


def _project_fed_by_two_connections(project: dbt_runner.DbtProject) -> None:
    """The tiny project plus two sources: shop.orders fed by connection `shop` (meta under
    `config:`, as dbt 1.10+ wants), crm.customers fed by `crm` or `crm_backup` (a list, in the
    older top-level `meta`); a model on each and one that joins both."""
    models = project.path / "models"
    (models / "sources.yml").write_text(
        yaml.safe_dump(
            {
                "version": 2,
                "sources": [
                    {"name": "shop", "config": {"meta": {"airbyte_connection": "shop"}}, "tables": [{"name": "orders"}]},
                    {"name": "crm", "meta": {"airbyte_connection": ["crm", "crm_backup"]}, "tables": [{"name": "customers"}]},
                ],
            }
        )
    )
    (models / "shop_orders.sql").write_text("select * from {{ source('shop', 'orders') }}\n")
    (models / "crm_customers.sql").write_text("select * from {{ source('crm', 'customers') }}\n")
    (models / "orders_with_customers.sql").write_text(
        "select * from {{ ref('shop_orders') }} join {{ ref('crm_customers') }} using (customer)\n"
    )


def _would_build(dbt: dbt_runner.Dbt, arguments: list[str]) -> set[str]:
    """What `dbt build <arguments>` selects, as dbt itself resolves it (`dbt ls`, nothing built)."""
    assert arguments[0] == "build"
    listed = dbt.run_captured("ls", *arguments[1:], "--output", "json", "--output-keys", "unique_id", "--quiet")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return {json.loads(line)["unique_id"] for line in listed.stdout.splitlines() if line.startswith("{")}


def test_failed_connection_leaves_out_its_sources_and_everything_downstream(
    project: dbt_runner.DbtProject, profiles_dir: Path
) -> None:
    """The selection the flow passes to `dbt build` after connection `crm` failed, resolved by
    dbt on the real project: crm's source, the model on it, the model joining it and their
    tests are left out; the rest (and a user's own --exclude) stays as asked."""
    _project_fed_by_two_connections(project)
    dbt = _dbt(project, profiles_dir)
    sources = {source["unique_id"]: source for source in dbt_runner.list_sources(dbt)}
    assert sorted(sources) == ["source.tiny_shop.crm.customers", "source.tiny_shop.shop.orders"]
    assert [sources["source.tiny_shop.shop.orders"][key] for key in ("schema", "name")] == ["shop", "orders"]
    assert sources["source.tiny_shop.shop.orders"]["meta"] == {"airbyte_connection": "shop"}
    assert sources["source.tiny_shop.crm.customers"]["meta"] == {"airbyte_connection": ["crm", "crm_backup"]}

    everything = _would_build(dbt, dbt_runner.build_arguments())
    assert dbt_runner.downstream_of_connections(dbt, ["crm_backup", "no_such_connection"]) == ["source:crm.customers+"]
    stale = dbt_runner.downstream_of_connections(dbt, ["crm"])
    assert stale == ["source:crm.customers+"]
    left_out = everything - _would_build(dbt, dbt_runner.build_arguments(stale=stale))
    assert left_out == {
        "source.tiny_shop.crm.customers",
        "model.tiny_shop.crm_customers",
        "model.tiny_shop.orders_with_customers",
    }

    both = dbt_runner.downstream_of_connections(dbt, ["shop", "crm"])
    assert both == ["source:crm.customers+", "source:shop.orders+"]
    built = _would_build(dbt, dbt_runner.build_arguments(exclude="customer_totals", stale=both))
    assert built == {"seed.tiny_shop.orders"}
    assert dbt_runner.downstream_of_connections(dbt, ["faker"]) == []


@pytest.mark.slow
def test_a_failed_connection_leaves_out_what_a_table_whose_name_holds_a_dot_feeds(
    project: dbt_runner.DbtProject, profiles_dir: Path
) -> None:
    """dbt splits a `source:` selector at each dot: `source:faker.users.v2+` selected nothing
    (`does not match any enabled nodes`), and the model on the failed sync's table was built.
    The selector dbt is given now leaves out the table and what it feeds, and nothing else
    (users_v3 differs from users.v2 at more than the dot)."""
    (project.path / "models" / "sources.yml").write_text(
        yaml.safe_dump(
            {
                "version": 2,
                "sources": [
                    {
                        "name": "faker",
                        "config": {"meta": {"airbyte_connection": "faker"}},
                        "tables": [{"name": "users.v2"}, {"name": "users_v3", "config": {"meta": {"airbyte_connection": "v3"}}}],
                    }
                ],
            }
        )
    )
    (project.path / "models" / "users_v2.sql").write_text("select * from {{ source('faker', 'users.v2') }}\n")
    (project.path / "models" / "users_v3.sql").write_text("select * from {{ source('faker', 'users_v3') }}\n")
    dbt = _dbt(project, profiles_dir)
    try:
        stale = dbt_runner.downstream_of_connections(dbt, ["faker"])
        everything = _would_build(dbt, dbt_runner.build_arguments())
        assert everything - _would_build(dbt, dbt_runner.build_arguments(stale=stale)) == {
            "source.tiny_shop.faker.users.v2",
            "model.tiny_shop.users_v2",
        }
        assert stale == ["source:faker.users?v2+"]
    finally:
        dbt.close()


def test_freshness_checks_only_sources_with_a_freshness_block_and_not_those_left_out(
    project: dbt_runner.DbtProject, profiles_dir: Path, tmp_path: Path
) -> None:
    """Real `dbt source freshness` on DuckDB. Source `shop` has a freshness block (warn after 24 h,
    error after 48 h): orders loaded 72 h ago is an error, customers 30 h ago a warning, payments
    1 h ago passes, refunds has no table (a runtime error, which dbt 1.11 leaves out of
    sources.json), returns is left out (its sync failed) though 100 h old. crm.contacts, 300 h
    old, has no freshness block: never checked."""
    (project.path / "models" / "sources.yml").write_text(
        yaml.safe_dump(
            {
                "version": 2,
                "sources": [
                    {
                        "name": "shop",
                        "schema": "raw_shop",
                        "config": {
                            "loaded_at_field": "_airbyte_extracted_at",
                            "freshness": {
                                "warn_after": {"count": 24, "period": "hour"},
                                "error_after": {"count": 48, "period": "hour"},
                            },
                        },
                        "tables": [{"name": name} for name in ("orders", "customers", "payments", "refunds", "returns")],
                    },
                    {"name": "crm", "schema": "raw_crm", "tables": [{"name": "contacts"}]},
                ],
            }
        )
    )
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    loaded = {
        "raw_shop.orders": 72,
        "raw_shop.customers": 30,
        "raw_shop.payments": 1,
        "raw_shop.returns": 100,
        "raw_crm.contacts": 300,
    }
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as connection:
        connection.execute("create schema raw_shop; create schema raw_crm")
        for table, hours in loaded.items():
            connection.execute(
                f"create table {table} as select 1 as id, ?::timestamptz as _airbyte_extracted_at", [now - timedelta(hours=hours)]
            )

    def minute(hours: int) -> str:
        return (now - timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M UTC")

    results = dbt_runner.check_freshness(_dbt(project, profiles_dir), ["source:shop.returns+"])
    assert [(source.source, source.status, source.line) for source in results] == [
        ("shop.customers", "warn", f"source shop.customers is stale: last loaded {minute(30)}, warn_after 24 hours"),
        ("shop.orders", "error", f"source shop.orders is stale: last loaded {minute(72)}, error_after 48 hours"),
        ("shop.payments", "pass", f"source shop.payments is fresh: last loaded {minute(1)}"),
        (
            "shop.refunds",
            "runtime error",
            "source shop.refunds freshness could not be checked: Catalog Error: Table with name refunds does not exist!",
        ),
    ]
    assert [source.blocks for source in results] == [False, True, False, True]


def test_a_project_without_freshness_blocks_is_never_gated(project: dbt_runner.DbtProject, profiles_dir: Path) -> None:
    """A source without a freshness block is never checked: dbt is not even started when no YAML
    file mentions freshness, and checks nothing when one does only in a description."""
    (project.path / "models" / "sources.yml").write_text("version: 2\nsources:\n  - name: crm\n    tables: [{name: contacts}]\n")
    assert dbt_runner.check_freshness(_dbt(project, profiles_dir)) == []
    assert not (project.path / "target").exists()  # decided from the YAML: no dbt invocation
    (project.path / "models" / "sources.yml").write_text(
        "version: 2\nsources:\n  - name: crm\n    description: no freshness block\n    tables: [{name: contacts}]\n"
    )
    assert dbt_runner.check_freshness(_dbt(project, profiles_dir)) == []  # dbt ran, and checked nothing


def test_a_stages_dbt_commands_run_in_one_dbt_process_that_leaves_the_warehouse_free_between_them(
    project: dbt_runner.DbtProject, profiles_dir: Path, tmp_path: Path
) -> None:
    """Seed, ls and build run in one dbt process (dbt's start-up and the parse paid once); between
    two commands the DuckDB file is free, so another process writes to it, and the build reads that write."""
    dbt = _dbt(project, profiles_dir)
    try:
        assert dbt_runner.run_dbt(dbt, ["seed"]).return_code == 0
        assert dbt._driver is not None
        driver = dbt._driver.pid
        with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as connection:
            connection.execute(
                "insert into main.orders (order_id, customer, amount) values (99, 'written_between_commands', 1000)"
            )
        listed = dbt.run_captured("ls", "--resource-type", "model", "--output", "name", "--quiet")
        assert listed.returncode == 0 and "customer_totals" in listed.stdout.split()
        run = dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["run", "--select", "customer_totals"]))
        assert [node.status for node in run.results] == ["success"]
        assert dbt._driver.pid == driver
    finally:
        dbt.close()
    _wait_until_ended(driver)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        (total,) = connection.execute(
            "select total_amount from main_marts.customer_totals where customer = 'written_between_commands'"
        ).fetchone()
    assert total == 1000


def test_a_killed_dbt_process_fails_its_command_with_the_signal_and_the_next_command_starts_another(
    project: dbt_runner.DbtProject, profiles_dir: Path
) -> None:
    dbt = _dbt(project, profiles_dir)
    try:
        assert dbt_runner.run_dbt(dbt, ["seed"]).return_code == 0
        assert dbt._driver is not None
        killed = dbt._driver.pid
        os.kill(killed, signal.SIGKILL)
        with pytest.raises(dbt_runner.DbtInvocationError) as error:
            dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["build"]))
        assert str(error.value) == f"dbt build in {project.path} could not run: the dbt process was killed (signal 9)"
        assert dbt_runner.run_dbt(dbt, ["seed"]).return_code == 0
        assert dbt._driver.pid != killed
    finally:
        dbt.close()


def test_a_project_that_does_not_parse_fails_the_command_with_dbts_error(
    project: dbt_runner.DbtProject, profiles_dir: Path
) -> None:
    (project.path / "models" / "broken.sql").write_text("select * from {{ ref('no_such_model') }}\n")
    dbt = _dbt(project, profiles_dir)
    try:
        run = dbt_runner.run_dbt(dbt, ["build"])
    finally:
        dbt.close()
    assert run.return_code == 2 and run.results == []
    with pytest.raises(dbt_runner.DbtInvocationError) as error:
        dbt_runner.raise_if_failed(run)
    assert str(error.value).startswith(f"dbt build in {project.path} could not run: ")
    assert "no_such_model" in str(error.value)


def test_a_dbt_process_started_early_serves_the_first_dbt_of_its_thread_or_ends_with_its_block(
    project: dbt_runner.DbtProject, profiles_dir: Path, tmp_path: Path
) -> None:
    """all-etl starts dbt's process before the syncs (dbt's import overlaps them). The transform's
    Dbt takes it over: its seed finds the project's CSVs although the process started elsewhere,
    and its model reads the environment the Dbt has, not the one the process started with (the
    syncs set variables meanwhile). One nobody used ends with the block."""
    (project.path / "models" / "env_probe.sql").write_text('select \'{{ env_var("ELT_TEST_PROBE", "unset") }}\' as probe\n')
    settings = load_settings()
    with dbt_runner.dbt_started_early(settings):
        early = dbt_runner._early_drivers[threading.get_ident()]
        env = dbt_runner.dbt_environment(settings) | {"ELT_TEST_PROBE": "set after the start"}
        dbt = dbt_runner.Dbt(project, profiles_dir, "duckdb", env)
        try:
            seeded = dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["seed"]))
            dbt_runner.raise_if_failed(dbt_runner.run_dbt(dbt, ["run", "--select", "env_probe"]))
            assert dbt._driver is early
        finally:
            dbt.close()
    assert [node.unique_id for node in seeded.results] == ["seed.tiny_shop.orders"]
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        assert connection.execute("select probe from main_marts.env_probe").fetchall() == [("set after the start",)]
    _wait_until_ended(early.pid)
    with dbt_runner.dbt_started_early(settings):
        unused = dbt_runner._early_drivers[threading.get_ident()]
        assert unused.poll() is None
    assert threading.get_ident() not in dbt_runner._early_drivers
    _wait_until_ended(unused.pid)


def test_a_command_writing_elsewhere_parses_there_too_and_leaves_the_project_folder_alone(
    project: dbt_runner.DbtProject, profiles_dir: Path, tmp_path: Path
) -> None:
    """The dbt-docs service's project folder is read-only; it runs `dbt docs generate
    --target-path X --log-path Y`, so the parse before the command must write there as well."""
    for leftover in ("target", "logs"):
        shutil.rmtree(project.path / leftover, ignore_errors=True)
    dbt = _dbt(project, profiles_dir)
    try:
        completed = dbt.run_captured(
            "docs", "generate", "--target-path", str(tmp_path / "docs-target"), "--log-path", str(tmp_path / "docs-logs")
        )
    finally:
        dbt.close()
    assert completed.returncode == 0, completed.stdout
    assert {"manifest.json", "catalog.json", "index.html"} <= {path.name for path in (tmp_path / "docs-target").iterdir()}
    assert (tmp_path / "docs-logs" / "dbt.log").exists()
    assert sorted(path.name for path in project.path.iterdir() if path.name in ("target", "logs")) == []


def test_after_only_a_selection_the_manifest_a_plan_reads_is_written_by_parse(
    project: dbt_runner.DbtProject, profiles_dir: Path
) -> None:
    """The parse the dbt process runs before a command writes no manifest (the command writes it,
    if it writes one), and `dbt ls` writes none: after only an `ls`, `Dbt.parse()` writes this
    parse to target/manifest.json for the plan to read, not leaving it missing or an older build's."""
    shutil.rmtree(project.path / "target", ignore_errors=True)
    dbt = _dbt(project, profiles_dir)
    try:
        listed = dbt.run_captured("ls", "--resource-type", "model", "--output", "name", "--quiet")
        assert listed.returncode == 0 and listed.stdout.split() == ["customer_totals"]
        assert not (project.path / "target" / "manifest.json").exists()
        before_the_ls = dbt.parse_seconds
        assert before_the_ls > 0  # the process parsed the project first
        dbt.parse()
        with_the_parse = dbt.parse_seconds
        assert with_the_parse > before_the_ls  # the parse command is a parse
        assert dbt.run_captured("ls", "--resource-type", "model", "--quiet").returncode == 0
        assert dbt.parse_seconds == with_the_parse  # on the parse it has
    finally:
        dbt.close()
    manifest = json.loads((project.path / "target" / "manifest.json").read_text())
    assert "model.tiny_shop.customer_totals" in manifest["nodes"]


def _wait_until_ended(pid: int, seconds: float = 30) -> None:
    """A closed dbt process exits by itself, reaped in the background: it must be gone in time."""
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the dbt process {pid} was still running {seconds} s after its Dbt was closed")
        time.sleep(0.05)
