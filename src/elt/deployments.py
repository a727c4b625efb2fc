"""The all-etl deployments: prefect/prefect.yaml as it is, or with environments defined
(environments/<name>.env), one deployment per environment, `all-etl/<name>`, each running with
its environment (flow parameter `env`) and its own concurrency limit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from elt.errors import ConfigurationError
from elt.settings import environment_names

PREFECT_FILE = Path("prefect") / "prefect.yaml"


def deployments_config(home: Path) -> dict[str, Any]:
    """prefect.yaml's content, its one deployment repeated per environment when any is defined."""
    path = home / PREFECT_FILE
    try:
        config: dict[str, Any] = yaml.safe_load(path.read_text())
        (template,) = config["deployments"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"{path}: not a prefect.yaml with one deployment ({exc})") from None
    names = environment_names(home)
    if names:
        config["deployments"] = [
            {
                **template,
                "name": name,
                "description": f"{template.get('description', '')} Environment {name} (environments/{name}.env).".strip(),
                "parameters": {**(template.get("parameters") or {}), "env": name},
            }
            for name in names
        ]
    return config


def deploy(home: Path) -> list[str]:
    """Create the work pool if it is missing, then `prefect deploy` every deployment; the names
    deployed, as flow/deployment."""
    config = deployments_config(home)
    for pool in sorted({deployment["work_pool"]["name"] for deployment in config["deployments"]}):
        _ensure_process_pool(pool)
    with tempfile.TemporaryDirectory(prefix="elt-deploy-") as folder:
        prefect_file = Path(folder) / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            str(Path(sys.executable).with_name("prefect")),
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(prefect_file),
        ]
        completed = subprocess.run(command, cwd=home, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = " | ".join(line.strip() for line in (completed.stdout + completed.stderr).strip().splitlines()[-5:])
        raise ConfigurationError(f"prefect deploy of {home / PREFECT_FILE} failed: {tail}")
    return [f"all-etl/{deployment['name']}" for deployment in config["deployments"]]


def _ensure_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
