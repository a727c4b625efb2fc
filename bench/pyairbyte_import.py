"""PyAirbyte's import as a sync makes it (only its DuckDB cache: elt.extract.pyairbyte_imports)
against the whole `import airbyte`, side by side: fresh interpreters, alternating, `--repeat`
pairs (3 by default). Prints the medians of wall time and peak memory, the modules imported,
and the ratios. Results land in bench/out/pyairbyte_import.md.

    .venv/bin/python bench/pyairbyte_import.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _harness import OUT, REPO_ROOT, machine, measure, table

IMPORT = """
import contextlib, sys
from elt.extract import embedded
if {whole}:
    embedded.only_what_duckdb_needs = contextlib.nullcontext
embedded._import_pyairbyte()
print(len(sys.modules))
"""
VARIANTS = {"whole `import airbyte`": True, "only the DuckDB cache (a sync's)": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peak_mb: dict[str, list[float]] = {name: [] for name in VARIANTS}
    modules: dict[str, str] = {}
    for round_ in range(repeat):
        for name, whole in VARIANTS.items():
            log = OUT / f"pyairbyte_import.{round_}.{int(whole)}.log"
            result = measure([sys.executable, "-c", IMPORT.format(whole=whole)], cwd=REPO_ROOT, log=log)
            if result.return_code != 0:
                raise SystemExit(f"{name} failed (exit {result.return_code}): see {log}")
            seconds[name].append(result.seconds)
            peak_mb[name].append(result.peak_mb)
            modules[name] = log.read_text().split()[-1]
            print(f"{name}: {result.seconds:.1f} s, {result.peak_mb:.0f} MB", flush=True)

    whole, trimmed = VARIANTS
    rows = [
        [name, f"{statistics.median(seconds[name]):.1f} s", f"{statistics.median(peak_mb[name]):.0f} MB", modules[name]]
        for name in VARIANTS
    ]
    time_ratio = statistics.median(seconds[trimmed]) / statistics.median(seconds[whole])
    memory_ratio = statistics.median(peak_mb[trimmed]) / statistics.median(peak_mb[whole])
    report = "\n".join(
        [
            f"# PyAirbyte's import, {repeat} alternating pairs ({machine()})",
            "",
            table(["import", "wall (median)", "peak memory (median)", "modules"], rows),
            "",
            f"only the DuckDB cache ÷ whole import: time {time_ratio:.2f}×, memory {memory_ratio:.2f}×",
        ]
    )
    (OUT / "pyairbyte_import.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
