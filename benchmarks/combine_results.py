"""Merge several ``screpair benchmark`` result folders into one report (benchmarks/RESULTS.md).

Long peers (scVI at its defaults) are best run as separate ``screpair benchmark`` invocations so
that a partial run still leaves usable results; this script concatenates their ``results.csv``
files and writes the combined ``results.csv``, ``summary.md`` and plots.

Usage::

    python benchmarks/combine_results.py OUT_DIR RUN_DIR [RUN_DIR ...] [--command TEXT] [--md PATH]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd

from screpair.evaluate._benchmark import write_outputs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the combined results")
    p.add_argument("runs", nargs="+", help="folders holding a results.csv each")
    p.add_argument("--command", default=None, help="the command that regenerates the report")
    p.add_argument("--md", default=None, help="also copy summary.md here (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    frames = [pd.read_csv(Path(r) / "results.csv") for r in args.runs if (Path(r) / "results.csv").is_file()]
    if not frames:
        p.error("no results.csv found in the given folders")
    results = pd.concat(frames, ignore_index=True)
    written = write_outputs(results, args.out, command=args.command)
    if args.md:
        shutil.copyfile(written["md"][0], args.md)
    print(f"combined {len(frames)} run(s), {len(results)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
