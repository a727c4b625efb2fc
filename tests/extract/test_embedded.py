"""The embedded backend's errors for connectors it can't run: one line naming file, connection and field."""

from pathlib import Path

import pytest

from elt.errors import ConfigurationError
from elt.extract.connections import load_connections
from elt.extract.embedded import ConnectorInstallFailed, ConnectorNotInstalled, EmbeddedBackend
from elt.settings import load_settings

CONNECTION = """
connections:
  - name: shop
    source: {connector: %s}
    streams: [users]
    destination: {schema: raw_shop}
"""


def _backend(tmp_path: Path, source: str) -> EmbeddedBackend:
    path = tmp_path / "connections.yaml"
    path.write_text(CONNECTION % source)
    settings = load_settings(home=tmp_path, airbyte_connections_file=path, connectors_dir=tmp_path / "connectors")
    return EmbeddedBackend(settings)


def test_unknown_connector_without_package(tmp_path: Path) -> None:
    backend = _backend(tmp_path, "source-nowhere-to-be-found")
    with pytest.raises(ConnectorNotInstalled) as error:
        backend.sync("shop", full_refresh=False)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'connections.yaml'}: connection 'shop': source.connector:")
    assert "source.pip" in message and "\n" not in message


def test_connector_package_that_does_not_install(tmp_path: Path) -> None:
    """A real install attempt against the package index, for a package that does not exist."""
    backend = _backend(tmp_path, "source-nowhere, pip: airbyte-source-nowhere-elt-appliance-test==0.0.1")
    with pytest.raises(ConnectorInstallFailed) as error:
        backend.sync("shop", full_refresh=False)
    message = str(error.value)
    assert "connection 'shop': source.pip: installing 'airbyte-source-nowhere-elt-appliance-test==0.0.1' failed" in message
    assert "\n" not in message


def test_unknown_connection_name_lists_the_known_ones(tmp_path: Path) -> None:
    backend = _backend(tmp_path, "source-faker")
    with pytest.raises(ConfigurationError, match=r"connection 'shopp' is not in .*enabled connections: shop"):
        backend.sync("shopp", full_refresh=False)


def test_shipped_connections_file_is_usable(tmp_path: Path) -> None:
    from tests.conftest import REPO_ROOT

    settings = load_settings(home=REPO_ROOT)
    assert EmbeddedBackend(settings, load_connections(REPO_ROOT / "airbyte" / "connections.yaml")).connection_names() == ["faker"]
