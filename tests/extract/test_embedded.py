"""The embedded backend's errors for connectors it can't run: one line naming file, connection and field."""

import subprocess
import sys
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


@pytest.mark.slow
def test_pyairbyte_preloaded_by_elt_run_is_the_one_a_sync_gets_and_prefect_logging_stays() -> None:
    """`elt run` imports PyAirbyte in the background while Prefect starts; a sync's import waits
    for it and finds Prefect's log handlers in place, and what the run logs meanwhile is printed
    by Prefect, never as airbyte_cdk's JSON (its entrypoint configures logging when imported).
    In a fresh interpreter: the import happens once per process."""
    script = (
        "import logging, sys, threading\n"
        "from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "def shape():\n"
        "    return [(type(h).__name__, type(h.formatter).__name__) for h in logging.getLogger().handlers]\n"
        "before = shape()\n"
        "from elt.extract import embedded\n"
        "preload = embedded.preload_pyairbyte()\n"
        "run_log = logging.getLogger('prefect.elt_run')\n"
        "logged = 0\n"
        "while preload.is_alive():\n"
        "    logged += 1\n"
        "    run_log.info('run line %d', logged)\n"
        "    preload.join(timeout=0.01)\n"
        "airbyte = embedded._import_pyairbyte()\n"
        "run_log.info('run line after')\n"
        "print(airbyte is sys.modules['airbyte'], shape() == before, shape())\n"
        "preload.join(timeout=300)\n"
        "print(preload.is_alive(), shape() == before, logged)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr[-2000:]
    during, after = completed.stdout.strip().splitlines()[-2:]
    assert during.startswith("True True "), during
    *alive_and_shape, logged = after.split()
    assert alive_and_shape == ["False", "True"] and int(logged) > 10, after
    output = completed.stdout + completed.stderr
    run_lines = [line for line in output.splitlines() if "run line" in line]
    assert len(run_lines) == int(logged) + 1, run_lines[-3:]
    assert [line for line in run_lines if '"type"' in line or not line.rstrip().endswith(tuple("0123456789r"))] == []
    assert all(" | INFO    | prefect.elt_run - run line" in line for line in run_lines), run_lines[:3]
