"""Pre-install the embedded connectors of a connections file at image build time.

Does what src/elt/extract/embedded.py does on first use: one venv per connector under the
connectors dir, made with uv, and `.installed-from` holding the exact pip spec, so the
worker finds them installed and the first run needs no PyPI access.

    python install_connectors.py airbyte/connections.yaml /opt/connectors
"""

import subprocess
import sys
from pathlib import Path

import yaml

UV = str(Path(sys.executable).parent / "uv")


def main(connections_file: str, connectors_dir: str) -> None:
    root = Path(connectors_dir)
    for connection in yaml.safe_load(Path(connections_file).read_text())["connections"]:
        source = connection["source"]
        pip = source.get("pip")
        if not pip or connection.get("enabled") is False:
            continue
        venv = root / source["connector"]
        marker = venv / ".installed-from"
        if marker.exists() and marker.read_text() == pip:
            continue
        subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
        subprocess.run([UV, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), pip], check=True)
        marker.write_text(pip)
        print(f"installed {source['connector']} from {pip} into {venv}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
