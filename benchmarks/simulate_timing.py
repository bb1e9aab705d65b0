"""Timing of the simulators (issue 3): the cnnImpute preset must be written in seconds.

Prints wall time and peak traced memory (``tracemalloc``: numpy/scipy buffers) of

- ``simulate.splat(preset="cnnimpute")`` (2000 x 4000) and a 10,000 x 10,000 Splat run,
- writing the cnnImpute dataset with ``screpair.write`` (gzip h5ad, what ``screpair simulate`` does),
- ``simulate.degrade``, ``simulate.mask`` and ``simulate.mcv_split`` on the cnnImpute dataset,

and the ratio of each to the cnnImpute simulation time. Usage::

    python benchmarks/simulate_timing.py            # all
    python benchmarks/simulate_timing.py --no-large # skip the 10k x 10k run
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import screpair
from screpair import simulate


def _timed(label: str, fn, ref: float | None = None):
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    ratio = f"  ({seconds / ref:.2f}x the cnnImpute simulation)" if ref else ""
    print(f"{label:<44s} {seconds:7.2f} s   peak {peak:8.1f} MiB{ratio}")
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-large", action="store_true", help="skip the 10k x 10k run")
    args = parser.parse_args()

    sim, ref = _timed(
        "splat(preset='cnnimpute') 2000 x 4000", lambda: simulate.splat(preset="cnnimpute", rng=0)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.h5ad"
        _timed("screpair.write(cnnImpute sim, .h5ad)", lambda: screpair.write(sim, path), ref)
        print(f"{'':<44s} file size {path.stat().st_size / 2**20:.1f} MiB")
    kw = {
        "layer": "true_counts",
        "bias_3p": (0.0, 1.0),
        "dropout_rate": (0.0, 0.5),
        "noise_sd": (0.0, 0.4),
    }
    _timed(
        "degrade(cnnImpute sim, ranges per cell)", lambda: simulate.degrade(sim, rng=0, **kw), ref
    )
    _timed("mask(cnnImpute sim, frac=0.1)", lambda: simulate.mask(sim, layer="counts", rng=0), ref)
    _timed(
        "mcv_split(cnnImpute sim)", lambda: simulate.mcv_split(sim, layer="true_counts", rng=0), ref
    )
    if not args.no_large:
        _timed("splat(10000, 10000)", lambda: simulate.splat(10_000, 10_000, rng=0), ref)


if __name__ == "__main__":
    main()
