#!/usr/bin/env bash
# Regenerate benchmarks/RESULTS.md: every screpair method and the peers (MAGIC, scVI) on three
# real datasets from ../shared/data, masked-value protocol (issue 5) plus MCV, clustering and DEG,
# 5 seeds. Outputs: benchmarks/results/{results.csv,summary.md,*.png}; RESULTS.md is summary.md.
#
# Usage: benchmarks/run_results.sh [METHODS] [PROTOCOLS] [SEEDS]
#   METHODS   default: every registered method + gene_mean, magic, scvi
#   PROTOCOLS default: masked,mcv,clustering,deg
#   SEEDS     default: 0,1,2,3,4
# Needs the bench extra (magic-impute, scvi-tools); missing peers are recorded as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${SCREPAIR_DATA:-../shared/data}"
[ -d "$DATA_DIR" ] || DATA_DIR=/work/shared/data
DATA="$DATA_DIR/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad,$DATA_DIR/baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad,$DATA_DIR/soumillon2014_d3/soumillon2014_d3_sc_1754cells.h5ad"
REGISTERED="$(python -c 'import screpair; print(",".join(screpair.available_methods()))')"
METHODS="${1:-gene_mean,${REGISTERED},magic,scvi}"
PROTOCOLS="${2:-masked,mcv,clustering,deg}"
SEEDS="${3:-0,1,2,3,4}"
OUT=benchmarks/results
screpair benchmark --data "$DATA" --methods "$METHODS" --protocol "$PROTOCOLS" --seeds "$SEEDS" --out "$OUT"
cp "$OUT/summary.md" benchmarks/RESULTS.md
echo "wrote benchmarks/RESULTS.md"
