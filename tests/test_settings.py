"""The one settings object: defaults load, bad values name their variable, secrets stay hidden."""

import os
import re
from pathlib import Path

import pytest

from elt.errors import ConfigurationError
from elt.settings import (
    NON_SETTING_VARIABLES,
    AirbyteBackend,
    Warehouse,
    environment_names,
    load_settings,
    load_settings_or_defaults,
    setting_variables,
)
from tests.conftest import REPO_ROOT


def test_defaults_describe_the_embedded_appliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing configured, the appliance runs PyAirbyte into DuckDB under ELT_HOME/data."""
    monkeypatch.setenv("ELT_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.warehouse is Warehouse.duckdb
    assert settings.airbyte_backend is AirbyteBackend.embedded
    assert settings.path(settings.duckdb_path) == tmp_path / "data" / "warehouse.duckdb"
    assert settings.effective_dbt_target == "duckdb"


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Values in `.env` in the working directory configure the appliance like variables do."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ELT_DBT_THREADS=7\nSNOWFLAKE_ACCOUNT=acme-xy123\n")
    settings = load_settings()
    assert settings.dbt_threads == 7
    assert settings.snowflake_account == "acme-xy123"


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELT_WAREHOUSE", "bigquery")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    message = str(error.value)
    assert "ELT_WAREHOUSE" in message and "\n" not in message


def test_when_dbt_starts_is_one_of_two_named_values(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().dbt_start.value == "with-syncs"
    monkeypatch.setenv("ELT_DBT_START", "after-syncs")
    assert load_settings().dbt_start.value == "after-syncs"
    monkeypatch.setenv("ELT_DBT_START", "later")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert str(error.value) == "invalid settings: ELT_DBT_START: Input should be 'with-syncs' or 'after-syncs'"


def test_secrets_are_hidden_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNOWFLAKE_PASSWORD", "p@ss:w0rd/with@signs")
    monkeypatch.setenv("ELT_GIT_TOKEN", "ghp_supersecret")
    settings = load_settings()
    assert settings.snowflake_password.get_secret_value() == "p@ss:w0rd/with@signs"
    shown = repr(settings) + str(settings)
    assert "p@ss:w0rd" not in shown and "ghp_supersecret" not in shown


def test_repo_url_with_credentials_is_refused_without_printing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token written into ELT_GIT_REPO would reach Prefect's flow-run parameters and logs: the
    setting is refused, pointing at ELT_GIT_TOKEN, and the token is masked in the message."""
    monkeypatch.setenv("ELT_GIT_REPO", "https://deploy:ghp_TOPSECRET123@git.example/team/analytics.git")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert str(error.value) == (
        "invalid settings: ELT_GIT_REPO: https://***@git.example/team/analytics.git has credentials written into it; "
        "remove them from the URL and set ELT_GIT_TOKEN (and ELT_GIT_USERNAME if your host needs a user name) instead"
    )


@pytest.mark.parametrize(
    "url",
    ["git@github.com:acme/analytics.git", "ssh://git@github.com/acme/analytics.git", "https://github.com/acme/analytics.git"],
)
def test_repo_urls_without_credentials_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The user in an SSH URL (git@) is no secret: SSH URLs load as they are."""
    monkeypatch.setenv("ELT_GIT_REPO", url)
    assert load_settings().git_repo == url


def test_invalid_values_fall_back_to_defaults_for_doctor(monkeypatch: pytest.MonkeyPatch) -> None:
    """`elt doctor` gets settings it can run its other checks with, and every invalid variable named."""
    monkeypatch.setenv("ELT_WAREHOUSE", "bigquery")
    monkeypatch.setenv("ELT_DBT_THREADS", "many")
    monkeypatch.setenv("SNOWFLAKE_PORT", "not-a-port")
    monkeypatch.setenv("ELT_DBT_SCHEMA", "analytics")
    settings, invalid = load_settings_or_defaults()
    assert settings.warehouse is Warehouse.duckdb and settings.dbt_threads == 4 and settings.snowflake_port is None
    assert settings.dbt_schema == "analytics"
    assert invalid == {
        "warehouse": "ELT_WAREHOUSE: Input should be 'duckdb' or 'snowflake'",
        "dbt_threads": "ELT_DBT_THREADS: Input should be a valid integer, unable to parse string as an integer",
        "snowflake_port": "SNOWFLAKE_PORT: Input should be a valid integer, unable to parse string as an integer",
    }


def test_every_elt_variable_the_project_mentions_is_a_setting_or_allowed() -> None:
    """The unknown-variable check must not flag what the compose stack, setup.sh, the docs or the
    code itself set: every ELT_ name in those files is a setting or on NON_SETTING_VARIABLES."""
    known = setting_variables() | NON_SETTING_VARIABLES
    files = [REPO_ROOT / "setup.sh", REPO_ROOT / ".env.example", REPO_ROOT / "Makefile", REPO_ROOT / "prefect" / "prefect.yaml"]
    files += [path for path in (REPO_ROOT / "docker").rglob("*") if path.is_file()]
    files += list((REPO_ROOT / "src").rglob("*.py")) + list((REPO_ROOT / "docs").rglob("*.md")) + [REPO_ROOT / "README.md"]
    files.remove(REPO_ROOT / "src" / "elt" / "preflight.py")  # its doctest shows a misspelled name
    mentioned = {
        (name, path.relative_to(REPO_ROOT).as_posix())
        for path in files
        for name in re.findall(r"\bELT_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace"))
    }
    # Not environment variables: a Snowflake user name in the docs, a probe schema's suffix, the
    # misspelling docs/reliability.md quotes.
    not_variables = {"ELT_TRANSFORMER", "ELT_DOCTOR_PROBE", "ELT_AIRBYTE_BACKED"}
    assert sorted((name, where) for name, where in mentioned if name not in known | not_variables) == []
    assert {"ELT_GIT_USERNAME", "ELT_AIRBYTE_BACKEND", "SNOWFLAKE_ACCOUNT", "ELT_SNOWFLAKE_ACCOUNT"} <= setting_variables()


def test_every_bad_value_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELT_WAREHOUSE", "bigquery")
    monkeypatch.setenv("SNOWFLAKE_PORT", "not-a-port")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert str(error.value) == (
        "invalid settings: ELT_WAREHOUSE: Input should be 'duckdb' or 'snowflake'; "
        "SNOWFLAKE_PORT: Input should be a valid integer, unable to parse string as an integer"
    )


def test_snowflake_settings_take_either_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """SNOWFLAKE_ACCOUNT (the connector's own name) or ELT_SNOWFLAKE_ACCOUNT; the first wins."""
    monkeypatch.setenv("ELT_SNOWFLAKE_ACCOUNT", "from-elt-name")
    assert load_settings().snowflake_account == "from-elt-name"
    monkeypatch.setenv("SNOWFLAKE_ACCOUNT", "from-snowflake-name")
    assert load_settings().snowflake_account == "from-snowflake-name"
    assert {"SNOWFLAKE_ACCOUNT", "ELT_SNOWFLAKE_ACCOUNT", "ELT_WAREHOUSE"} <= setting_variables()


def test_paths_are_relative_to_elt_home_and_absolute_ones_kept_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    settings = load_settings(home=tmp_path / "link")
    assert settings.path(Path("data/w.duckdb")) == tmp_path / "real" / "data" / "w.duckdb"
    assert settings.path(tmp_path / "link" / "w.duckdb") == tmp_path / "link" / "w.duckdb"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings.path(Path("~/w.duckdb")) == tmp_path / "w.duckdb"


def test_environment_is_the_dotenv_file_under_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What connections' ${VAR} references see: `.env` values, overridden by real variables."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ONLY_IN_FILE=file\nIN_BOTH=file\nNO_VALUE\n")
    monkeypatch.setenv("IN_BOTH", "process")
    monkeypatch.delenv("ONLY_IN_FILE", raising=False)
    monkeypatch.delenv("NO_VALUE", raising=False)
    environment = load_settings().environment()
    assert environment["ONLY_IN_FILE"] == "file" and environment["IN_BOTH"] == "process"
    assert "NO_VALUE" not in environment
    assert environment["PATH"] == os.environ["PATH"]


# --- environments (environments/<name>.env over .env) ------------------------------------------
def _home_with_environments(home: Path, **files: str) -> Path:
    (home / "environments").mkdir(parents=True)
    for name, text in files.items():
        (home / "environments" / f"{name}.env").write_text(text)
    return home


def test_an_environment_never_shares_the_default_data_folder_or_warehouse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unless its file names them, an environment's data folder is <data>/environments/<name> and
    its DuckDB file lies in that folder, even when .env (as on the worker) names the default's."""
    home = _home_with_environments(tmp_path, staging="ELT_GIT_BRANCH=staging\n")
    monkeypatch.chdir(home)
    (home / ".env").write_text("ELT_DUCKDB_PATH=/var/lib/elt/data/warehouse.duckdb\nELT_GIT_BRANCH=main\nELT_DBT_THREADS=3\n")
    staging = load_settings(home=home, env="staging")
    assert staging.env == "staging" and staging.home == home
    assert staging.path(staging.data_dir) == home / "data" / "environments" / "staging"
    assert staging.path(staging.duckdb_path) == home / "data" / "environments" / "staging" / "warehouse.duckdb"
    assert staging.git_branch == "staging"  # the environment's file over .env
    assert staging.dbt_threads == 3  # what the file does not set comes from .env
    default = load_settings(home=home)
    assert default.env is None and default.git_branch == "main"
    assert str(default.duckdb_path) == "/var/lib/elt/data/warehouse.duckdb"


def test_an_environment_file_that_names_its_folders_keeps_them(tmp_path: Path) -> None:
    home = _home_with_environments(
        tmp_path,
        own_data="ELT_DATA_DIR=/srv/own\n",
        own_duckdb="ELT_DUCKDB_PATH=/srv/wh.duckdb\n",
    )
    own_data = load_settings(home=home, env="own_data")
    assert (own_data.data_dir, own_data.duckdb_path) == (Path("/srv/own"), Path("/srv/own/warehouse.duckdb"))
    own_duckdb = load_settings(home=home, env="own_duckdb")
    assert own_duckdb.path(own_duckdb.data_dir) == home / "data" / "environments" / "own_duckdb"
    assert own_duckdb.duckdb_path == Path("/srv/wh.duckdb")


def test_the_runs_own_flags_win_over_the_environment_file(tmp_path: Path) -> None:
    home = _home_with_environments(tmp_path, staging="ELT_DBT_THREADS=2\nELT_GIT_BRANCH=staging\n")
    settings = load_settings(home=home, env="staging", dbt_threads=9)
    assert (settings.dbt_threads, settings.git_branch) == (9, "staging")


def test_the_runs_own_flags_win_over_the_environment_defaults_of_its_folders(tmp_path: Path) -> None:
    """An environment's own DuckDB file is a default: a run that names one keeps it."""
    home = _home_with_environments(tmp_path, staging="ELT_GIT_BRANCH=staging\n")
    settings = load_settings(home=home, env="staging", duckdb_path=tmp_path / "own.duckdb")
    assert settings.duckdb_path == tmp_path / "own.duckdb"
    assert settings.path(settings.data_dir) == home / "data" / "environments" / "staging"


def test_environment_chosen_by_ELT_ENV(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home_with_environments(tmp_path, staging="ELT_GIT_BRANCH=staging\n")
    monkeypatch.setenv("ELT_HOME", str(home))
    monkeypatch.setenv("ELT_ENV", "staging")
    assert load_settings().git_branch == "staging"


def test_a_missing_environment_is_named_with_those_defined(tmp_path: Path) -> None:
    home = _home_with_environments(tmp_path, staging="", prod="")
    with pytest.raises(ConfigurationError) as error:
        load_settings(home=home, env="stagng")
    assert str(error.value) == (
        f"ELT_ENV=stagng: {home / 'environments' / 'stagng.env'} does not exist "
        "(environments defined: prod, staging); create it or choose another"
    )
    with pytest.raises(ConfigurationError) as error:
        load_settings(home=tmp_path / "nowhere", env="staging")
    assert "(environments defined: none)" in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ELT_GIT_BRANCH=x\nELT_DBT_THREDS=4\nOTHER_TOOL=1\nelt_git_brnch=y\n",
            "ELT_DBT_THREDS, elt_git_brnch: unknown setting(s) (every setting is listed in .env.example)",
        ),
        ("ELT_HOME=/elsewhere\n", "ELT_ENV and ELT_HOME cannot be set by an environment's own file"),
        ("elt_env=prod\n", "ELT_ENV and ELT_HOME cannot be set by an environment's own file"),
        (
            "ELT_DBT_THREADS=many\n",
            "invalid settings: ELT_DBT_THREADS: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "ELT_DBT_THREADS=many\nELT_WAREHOUSE=bigquery\n",
            "invalid settings: ELT_WAREHOUSE: Input should be 'duckdb' or 'snowflake'; "
            "ELT_DBT_THREADS: Input should be a valid integer, unable to parse string as an integer",
        ),
    ],
)
def test_a_bad_environment_file_is_one_line_naming_the_file_and_variable(tmp_path: Path, text: str, message: str) -> None:
    home = _home_with_environments(tmp_path, staging=text)
    with pytest.raises(ConfigurationError) as error:
        load_settings(home=home, env="staging")
    assert str(error.value) == f"{home / 'environments' / 'staging.env'}: {message}"


def test_environment_names_are_the_files_in_environments(tmp_path: Path) -> None:
    assert environment_names(tmp_path) == []
    home = _home_with_environments(tmp_path, prod="", staging="", dev="")
    (home / "environments" / "notes.txt").write_text("not an environment")
    assert environment_names(home) == ["dev", "prod", "staging"]


def test_the_environment_file_is_over_dotenv_and_process_for_connection_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's ${VAR} in an environment: its file, then the process, then `.env`."""
    home = _home_with_environments(tmp_path, staging="FAKER_SEED=7\nIN_ALL=env-file\nNO_VALUE\n")
    monkeypatch.chdir(home)
    (home / ".env").write_text("IN_ALL=dotenv\nONLY_DOTENV=dotenv\n")
    monkeypatch.setenv("IN_ALL", "process")
    environment = load_settings(home=home, env="staging").environment()
    assert (environment["FAKER_SEED"], environment["IN_ALL"], environment["ONLY_DOTENV"]) == ("7", "env-file", "dotenv")
    assert "NO_VALUE" not in environment
    assert load_settings(home=home).environment()["IN_ALL"] == "process"


def test_doctor_settings_take_the_environment_from_ELT_ENV(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home_with_environments(tmp_path, staging="ELT_GIT_BRANCH=staging\n")
    monkeypatch.setenv("ELT_HOME", str(home))
    monkeypatch.setenv("ELT_ENV", "staging")
    settings, invalid = load_settings_or_defaults()
    assert (settings.env, settings.git_branch, invalid) == ("staging", "staging", {})


def test_doctor_settings_name_an_environment_name_that_is_not_valid_and_check_without_it(tmp_path: Path) -> None:
    """`elt doctor --env 'Bad Env'`: the name is the one problem, not a crash."""
    settings, invalid = load_settings_or_defaults(env="Bad Env")
    assert settings.env is None
    assert invalid == {"env": "ELT_ENV: String should match pattern '^[a-z0-9][a-z0-9_-]*$'"}


def test_doctor_settings_name_an_unusable_environment_and_check_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home_with_environments(tmp_path, staging="ELT_DBT_THREADS=many\n")
    monkeypatch.setenv("ELT_HOME", str(home))
    settings, invalid = load_settings_or_defaults(env="staging")
    assert settings.env is None
    assert invalid == {
        "env": f"{home / 'environments' / 'staging.env'}: invalid settings: ELT_DBT_THREADS: "
        "Input should be a valid integer, unable to parse string as an integer"
    }
    (home / "environments" / "staging.env").write_text("ELT_GIT_BRANCH=staging\n")
    monkeypatch.setenv("ELT_WAREHOUSE", "bigquery")
    settings, invalid = load_settings_or_defaults(env="staging")
    assert (settings.env, settings.git_branch, settings.warehouse) == ("staging", "staging", Warehouse.duckdb)
    assert list(invalid) == ["warehouse"] and invalid["warehouse"].startswith("ELT_WAREHOUSE: Input should be")
    (home / "environments" / "staging.env").write_text("ELT_WAREHOUSE=snowflake\n")
    settings, invalid = load_settings_or_defaults(env="staging")
    assert (settings.env, settings.warehouse, list(invalid)) == ("staging", Warehouse.snowflake, ["warehouse"])
