#!/usr/bin/env bash
# Issue 8 degrade benchmark: diffusion vs dae, vae, MAGIC and the degraded input (raw) on
# pbmc3k and baron pancreas, 5 seeds, moderate damage (bias_3p 0.5, dropout 0.3, noise sd 0.2).
#
#   degrade_reference  half of the cells stay clean; the neural methods train on them and repair
#                      the degraded other half (the DiffRepairer paper's setting)
#   degrade            every method sees only the degraded cells (screpair.impute on user data)
#
# One `screpair benchmark` call per dataset and protocol (an interrupted session keeps complete
# per-dataset results); combine_results.py then rewrites the degrade section of RESULTS.md from
# every results/D_* run.
# Usage: benchmarks/run_degrade.sh [PROTOCOLS] [SEEDS]   (defaults: degrade_reference, 0,1,2,3,4)
#        benchmarks/run_degrade.sh ""                     (only rebuild the RESULTS.md section)
set -euo pipefail
cd "$(dirname "$0")/.."
D="${SCREPAIR_DATA:-../shared/data}"
[ -d "$D" ] || D=/work/shared/data
PROTOCOLS="${1-degrade_reference}"
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
INTRO=$(mktemp)
cat > "$INTRO" <<'TXT'
# Profile repair: degrade protocols (issue 8)

Clean real counts are damaged by `simulate.degrade` with the moderate setting (3' bias 0.5 on
gene lengths from `var["gene_length"]` or stand-in lengths, dropout 0.3, Gaussian noise sd 0.2 on
log1p(CP10k), stochastic rounding). `degrade_reference`: a random half of the cells stays clean;
dae, vae and diffusion train on it (pairs made by degrading it further) and repair the degraded
other half, the DiffRepairer paper's setting; MAGIC and `raw` (the degraded input, i.e. "before
repair") see only the degraded cells. `degrade`: every method sees only the degraded cells (what
`screpair.impute` does on a user's data). Scores on the clean data's 2,000 highly variable
genes (Seurat dispersion, `pp.highly_variable_genes`) in the DiffRepairer paper's space,
log1p(CP10k) with the clean library size for the truth and the degraded input's library size for
every output: MSE / Pearson r / cosine vs the clean profiles, MSE at the entries the damage
zeroed, PR-AUC / F1 of calling expressed entries (F1: the output rescaled to the clean
library size is >= 0.5 counts, so that the perfect repair scores 1), silhouette of the cell
types, Jaccard / F1 of each type's top-100 DEGs vs the clean data's, Spearman r of the clean
data's top markers. All neural methods at their defaults (early stopping on a 10% validation
split; observed zeros whose repair stays below 0.5 log1p(CP10k) are kept at zero,
`PairConfig.zero_threshold`; automatic `n_views`: 8 views per cell for the references and for
baron, 2 for the 2,700 pbmc3k cells); seconds include training and repair.

Regenerate with:

```
bash benchmarks/run_degrade.sh degrade_reference,degrade 0,1,2,3,4
```
TXT
python benchmarks/combine_results.py "$OUT/degrade_all" "$OUT"/D_* --section degrade \
    --intro "$INTRO" --md benchmarks/RESULTS.md
rm -f "$INTRO"
echo "updated the degrade section of benchmarks/RESULTS.md"
