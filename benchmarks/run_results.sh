#!/usr/bin/env bash
# Regenerate benchmarks/RESULTS.md: every screpair method and the peers (MAGIC, scVI at its
# defaults) on three real datasets from ../shared/data, 5 seeds.
#
# The fast methods run in one `screpair benchmark` call; the neural baselines and scVI run one
# dataset per call (OMP_NUM_THREADS=1 so two runs can share a 2-core machine), so an interrupted
# session still leaves complete per-dataset results; combine_results.py merges whatever exists.
#
# Usage: benchmarks/run_results.sh [PROTOCOLS] [SEEDS]      (defaults: masked, 0,1,2,3,4)
# Needs the bench extra (magic-impute, scvi-tools); missing peers are recorded as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
D="${SCREPAIR_DATA:-../shared/data}"
[ -d "$D" ] || D=/work/shared/data
PROTOCOLS="${1:-masked}"
SEEDS="${2:-0,1,2,3,4}"
OUT=benchmarks/results
PBMC="$D/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad"
BARON="$D/baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad"
SOUM="$D/soumillon2014_d3/soumillon2014_d3_sc_1754cells.h5ad"

screpair benchmark --data "$PBMC,$BARON,$SOUM" --methods gene_mean,knn,alra,saver,cnn,magic \
    --protocol "$PROTOCOLS" --seeds "$SEEDS" --out "$OUT/A" --no-progress
for ds in "$BARON" "$SOUM" "$PBMC"; do
    name=$(basename "$ds" .h5ad)
    OMP_NUM_THREADS=1 screpair benchmark --data "$ds" --methods dae,vae,diffusion \
        --protocol "$PROTOCOLS" --seeds "$SEEDS" --out "$OUT/C_$name" --no-progress
    OMP_NUM_THREADS=1 screpair benchmark --data "$ds" --methods scvi \
        --protocol "$PROTOCOLS" --seeds "$SEEDS" --out "$OUT/B_$name" --no-progress
done
python benchmarks/combine_results.py "$OUT/all" "$OUT"/A "$OUT"/C_* "$OUT"/B_* \
    --command "bash benchmarks/run_results.sh $PROTOCOLS $SEEDS" --md benchmarks/RESULTS.md
echo "wrote benchmarks/RESULTS.md"
