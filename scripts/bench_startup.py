"""Start-up of the `retr` command: wall time of whole processes, and what each one loads.

For every checkout given (--tree, default this one) and every command (`--help`, and with
--index `index info` and `index check` on that index), it runs `retr ARGS` --runs times in a
fresh interpreter (the checkout first on sys.path, as the installed `retr` entry point imports
`retrieval.cli:app`) and prints the median and range of the wall seconds, the modules loaded
and whether torch was among them; then `python -X importtime -c "import retrieval.cli"`'s
cumulative microseconds for `retrieval.cli` (median of --runs). The machine's load average is
printed too: on a shared machine, compare medians of runs made one after the other.

    python scripts/bench_startup.py --tree ../main --tree . --index retr-index
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROBE = (
    "import json, sys\n"
    "from retrieval.cli import app\n"
    "try:\n"
    "    app(sys.argv[1:], standalone_mode=False)\n"
    "finally:\n"
    "    print(json.dumps([len(sys.modules), 'torch' in sys.modules]), file=sys.stderr)\n"
)


def run_once(tree: Path, args: list[str]) -> tuple[float, int, bool]:
    """(wall seconds, modules loaded, torch loaded) of `retr ARGS` with `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "RETR_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd="/"
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"retr {' '.join(args)} failed in {tree}:\n{done.stderr[-2000:]}")
    modules, torch = json.loads(done.stderr.strip().splitlines()[-1])
    return wall, modules, torch


def import_us(tree: Path) -> int:
    """Cumulative microseconds of `import retrieval.cli` (python -X importtime)."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import retrieval.cli"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        check=True,
    )
    line = next(x for x in done.stderr.splitlines() if x.rstrip().endswith("| retrieval.cli"))
    return int(line.split("|")[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, action="append", help="checkout(s) to time (default: .)")
    p.add_argument("--index", type=Path, help="an index for `index info` and `index check`")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    trees = a.tree or [Path(".")]
    commands = [["--help"]]
    if a.index is not None:
        commands += [["index", "info", "--index", str(a.index.resolve())]]
        commands += [["index", "check", "--index", str(a.index.resolve())]]
    console = Console(width=150)
    console.print(f"load average before: {os.getloadavg()[0]:.2f}")
    table = Table(title=f"retr start-up, {a.runs} runs each (wall seconds of whole processes)")
    for col in ("checkout", "command", "median s", "min s", "max s", "modules", "torch"):
        table.add_column(col, justify="left" if col in ("checkout", "command") else "right")
    for args in commands:
        for tree in trees:  # the checkouts in turn per command: drift hits both alike
            runs = [run_once(tree, args) for _ in range(a.runs)]
            walls = [r[0] for r in runs]
            table.add_row(
                str(tree),
                "retr " + " ".join(args[:2]),
                f"{statistics.median(walls):.3f}",
                f"{min(walls):.3f}",
                f"{max(walls):.3f}",
                str(runs[-1][1]),
                "yes" if runs[-1][2] else "no",
            )
    console.print(table)
    imports = Table(title="python -X importtime -c 'import retrieval.cli' (cumulative)")
    imports.add_column("checkout")
    imports.add_column("median ms", justify="right")
    for tree in trees:
        us = [import_us(tree) for _ in range(a.runs)]
        imports.add_row(str(tree), f"{statistics.median(us) / 1000:.0f}")
    console.print(imports)
    console.print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
