"""Merge several ``screpair benchmark`` result folders into one report (benchmarks/RESULTS.md).

Long peers (scVI at its defaults) are best run as separate ``screpair benchmark`` invocations so
that a partial run still leaves usable results; this script concatenates their ``results.csv``
files and writes the combined ``results.csv``, ``summary.md`` and plots.

Usage::

    python benchmarks/combine_results.py OUT_DIR RUN_DIR [RUN_DIR ...] [--command TEXT] [--md PATH]
        [--section NAME [--intro FILE]]

With ``--section NAME`` the summary replaces only the part of ``--md`` between the markers
``<!-- section:NAME -->`` and ``<!-- /section:NAME -->`` (appended when absent), so one report can
hold several independently regenerated sections; ``--intro`` puts a file's text before it.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pandas as pd

from screpair.evaluate._benchmark import write_outputs


def _replace_section(md: Path, name: str, summary: Path, intro: str | None) -> None:
    body = summary.read_text()
    body = re.sub(r"\A# screpair benchmark\n+", "", body)  # the report has its own title
    if intro:
        body = Path(intro).read_text().rstrip() + "\n\n" + body
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = md.read_text() if md.is_file() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip() + "\n\n" + block
    tmp = md.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the combined results")
    p.add_argument("runs", nargs="+", help="folders holding a results.csv each")
    p.add_argument("--command", default=None, help="the command that regenerates the report")
    p.add_argument("--md", default=None, help="also copy summary.md here (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--section", default=None, help="replace only this marked section of --md")
    p.add_argument("--intro", default=None, help="text file put before the section's summary")
    args = p.parse_args(argv)
    frames = [pd.read_csv(Path(r) / "results.csv") for r in args.runs if (Path(r) / "results.csv").is_file()]
    if not frames:
        p.error("no results.csv found in the given folders")
    results = pd.concat(frames, ignore_index=True)
    written = write_outputs(results, args.out, command=args.command)
    if args.md and args.section:
        _replace_section(Path(args.md), args.section, Path(written["md"][0]), args.intro)
    elif args.md:
        shutil.copyfile(written["md"][0], args.md)
    print(f"combined {len(frames)} run(s), {len(results)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
