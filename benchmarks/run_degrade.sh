#!/usr/bin/env bash
# Issue 8 degrade benchmark: diffusion vs dae, vae, MAGIC and the degraded input (raw) on
# pbmc3k and baron pancreas, 5 seeds, moderate damage (bias_3p 0.5, dropout 0.3, noise sd 0.2).
#
#   degrade_reference  half of the cells stay clean; the neural methods train on them and repair
#                      the degraded other half (the DiffRepairer paper's setting)
#   degrade            every method sees only the degraded cells (screpair.impute on user data)
#
# One `screpair benchmark` call per dataset and protocol (an interrupted session keeps complete
# per-dataset results); combine_results.py then rewrites RESULTS.md from everything under results/.
# Usage: benchmarks/run_degrade.sh [PROTOCOLS] [SEEDS]   (defaults: degrade_reference, 0,1,2,3,4)
set -euo pipefail
cd "$(dirname "$0")/.."
D="${SCREPAIR_DATA:-../shared/data}"
[ -d "$D" ] || D=/work/shared/data
PROTOCOLS="${1:-degrade_reference}"
SEEDS="${2:-0,1,2,3,4}"
OUT=benchmarks/results
for proto in ${PROTOCOLS//,/ }; do
    for ds in "$D/baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad" \
              "$D/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad"; do
        name=$(basename "$ds" .h5ad)
        screpair benchmark --data "$ds" --methods raw,magic,dae,vae,diffusion \
            --protocol "$proto" --seeds "$SEEDS" --out "$OUT/D_${proto}_$name" --no-progress
    done
done
echo "done; merge with: python benchmarks/combine_results.py ... (see run_results.sh)"
