"""Pre-install the embedded connectors of a connections file at image build time.

Runs the appliance's own installer (src/elt/extract/embedded.py, `ensure_connector`): one venv
per connector under the connectors dir, `<connector>` a symlink to it, `.installed-from`
holding the exact pip spec, so the worker finds them installed and the first run needs no
PyPI access.

    python install_connectors.py airbyte/connections.yaml /opt/connectors
"""

import sys
from pathlib import Path

from elt.extract.connections import load_connections
from elt.extract.embedded import ensure_connector


def main(connections_file: str, connectors_dir: str) -> None:
    path = Path(connections_file)
    for spec in load_connections(path):
        if spec.enabled and spec.source.pip:
            executable = ensure_connector(spec, Path(connectors_dir), path)
            print(f"{spec.source.connector} from {spec.source.pip}: {executable}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
