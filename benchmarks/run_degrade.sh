#!/usr/bin/env bash
# Degrade benchmark (issues 8 and 18): diffusion vs dae, vae, MAGIC and the degraded input (raw)
# on pbmc3k, baron pancreas and the scDeepCluster sets (pbmc4k, human kidney, mouse bladder, worm
# neurons), moderate damage (bias_3p 0.5, dropout 0.3, noise sd 0.2).
#
#   degrade_reference  half of the cells stay clean; the neural methods train on them and repair
#                      the degraded other half (the DiffRepairer paper's setting)
#   degrade            every method sees only the degraded cells (screpair.impute on user data)
#
# One `screpair benchmark` call per seed, protocol and dataset, seed by seed (an interrupted
# session keeps every finished call; a finished call is not rerun); combine_results.py then
# rewrites the degrade section of RESULTS.md from every results/D_* run.
# Usage: benchmarks/run_degrade.sh [PROTOCOLS] [SEEDS] [DATASETS]
#          defaults: degrade_reference,degrade  0,1,2  baron,pbmc3k,pbmc4k,kidney,bladder,worm
#        benchmarks/run_degrade.sh ""     (only rebuild the RESULTS.md section)
set -euo pipefail
cd "$(dirname "$0")/.."
D="${SCREPAIR_DATA:-../shared/data}"
[ -d "$D" ] || D=/work/shared/data
PROTOCOLS="${1-degrade_reference,degrade}"
SEEDS="${2:-0,1,2}"
DATASETS="${3:-baron,pbmc3k,pbmc4k,kidney,bladder,worm}"
OUT=benchmarks/results
declare -A FILE=(
    [baron]=baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad
    [pbmc3k]=pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad
    [pbmc4k]=scdcc_benchmark/pbmc4k_10x_top2000genes.h5ad
    [kidney]=scdcc_benchmark/human_kidney_top2000genes.h5ad
    [bladder]=scdcc_benchmark/mouse_bladder_2100cells_allgenes.h5ad
    [worm]=scdcc_benchmark/worm_neuron_top2000genes.h5ad
)
for seed in ${SEEDS//,/ }; do
    for proto in ${PROTOCOLS//,/ }; do
        for key in ${DATASETS//,/ }; do
            ds="$D/${FILE[$key]}"
            run="$OUT/D_${proto}_$(basename "$ds" .h5ad)_s$seed"
            [ -f "$run/results.csv" ] && continue
            screpair benchmark --data "$ds" --methods raw,magic,dae,vae,diffusion \
                --protocol "$proto" --seeds "$seed" --out "$run" --no-progress
        done
    done
done
INTRO=$(mktemp)
cat > "$INTRO" <<'TXT'
# Profile repair: degrade protocols (issues 8 and 18)

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
baron, 2 from 2,000 cells on); diffusion at the issue-18 defaults (at most 10 gene patches, i.e.
500 genes each for 5,000 HVGs and 250 for 2,000 genes; 30% of each batch at the last timestep);
seconds include training and repair. Data: pbmc3k and baron as before; pbmc4k, human kidney and
worm neurons (2,000 genes each, all modelled) and mouse bladder (2,100 cells, all 20,670 genes,
5,000 HVGs modelled) from `../shared/data/scdcc_benchmark`.

Regenerate with:

```
bash benchmarks/run_degrade.sh degrade_reference,degrade 0,1,2
```
TXT
python benchmarks/combine_results.py "$OUT/degrade_all" "$OUT"/D_*_s* --section degrade \
    --intro "$INTRO" --md benchmarks/RESULTS.md
rm -f "$INTRO"
echo "updated the degrade section of benchmarks/RESULTS.md"
