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
