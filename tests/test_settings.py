"""The one settings object: defaults load, bad values name their variable, secrets stay hidden."""

from pathlib import Path

import pytest

from elt.errors import ConfigurationError
from elt.settings import AirbyteBackend, Warehouse, load_settings


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
