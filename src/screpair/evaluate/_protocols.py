"""Evaluation protocols: how a dataset is turned into a method's input and how the output is scored.

A protocol has two steps, so that the (random) preparation is shared by every method of a seed:

- ``prepare(adata, *, rng) -> Task``: the AnnData the method sees (raw counts in ``X``, no empty
  cells or genes) and whatever the score needs (held-out truth, labels, reference DEGs);
- ``score(task, imputed, posterior=None) -> dict``: metrics of the count-scale output.

``embedding(task, imputed)`` gives 2-D coordinates for plots (clustering protocol), and
``calibration(task, posterior)`` a reliability-diagram table (dropout protocol).

The ``masked``, ``mcv`` and ``dropout`` protocols also report ``zeros_imputed``, the fraction of the
input's zeros that the output makes positive, next to the accuracy (not ranked).

Protocols: ``masked`` (cnnImpute / DeepImpute masked values, issue 5), ``mcv`` (Open Problems
denoising), ``clustering``, ``deg``, ``dropout`` (simulations with truth), ``degrade`` (the hook for
profile reconstruction on :func:`screpair.simulate.degrade` output), ``smfish`` (Gini agreement
with smFISH), ``downsample`` (SAVER's: deep cells binomially thinned, scored against the
original).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _norm
from .._utils import RNGLike, as_rng, get_counts, library_size, to_dense
from . import _metrics as M

#: obs columns tried, in order, when no label key is given.
LABEL_KEYS = ("cell_type", "label_code", "group", "timepoint", "condition", "label", "labels")


def find_label_key(adata: AnnData, label_key: str | None = None) -> str | None:
    """``label_key`` if given (checked), else the first of :data:`LABEL_KEYS` present in ``obs``."""
    if label_key is not None:
        if label_key not in adata.obs:
            msg = f"label key {label_key!r} not in adata.obs (columns: {list(adata.obs.columns)})."
            raise KeyError(msg)
        return label_key
    for k in LABEL_KEYS:
        if k in adata.obs and adata.obs[k].nunique() > 1:
            return k
    return None


@dataclass
class Task:
    """One prepared (dataset, protocol, seed): the method's input and what scoring needs."""

    adata: AnnData
    truth: dict[str, Any] = field(default_factory=dict)
    #: clean counts of other cells (same genes) for methods trained on clean profiles, or None
    reference: AnnData | None = None


def _clean(x: sp.csr_matrix, obs: pd.DataFrame, var: pd.DataFrame) -> AnnData:
    """AnnData of raw counts with string names (no layers)."""
    ad = AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=obs.copy(), var=var.copy())
    ad.obs_names = ad.obs_names.astype(str)
    ad.var_names = ad.var_names.astype(str)
    return ad


def _nonempty_index(x) -> tuple[np.ndarray, np.ndarray]:
    x = sp.csr_matrix(x)
    cells = np.flatnonzero(np.diff(x.indptr) > 0)
    genes = np.flatnonzero(np.bincount(x.indices, minlength=x.shape[1]) > 0)
    return cells, genes


class Protocol:
    """Base class; subclasses set ``name`` and implement ``prepare`` and ``score``."""

    name: ClassVar[str] = "base"

    def __init__(self, *, layer: str | None = None, label_key: str | None = None):
        self.layer, self.label_key = layer, label_key

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:  # pragma: no cover
        raise NotImplementedError

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def calibration(self, task: Task, posterior=None) -> pd.DataFrame | None:
        """Reliability-diagram table of the method's dropout probabilities (``None``: none)."""
        return None

    def embedding(self, task: Task, imputed) -> np.ndarray | None:
        return None

    def _counts(self, adata: AnnData) -> sp.csr_matrix:
        return sp.csr_matrix(get_counts(adata, self.layer, warn_empty=False))


# --------------------------------------------------------------------------- masked
class Masked(Protocol):
    """Masked-value accuracy (cnnImpute / DeepImpute; issue 5's exact protocol).

    Keep genes with non-zero counts in ``>= min_frac_cells`` of the cells, drop cells with no counts
    left, zero out a random ``frac`` of the non-zero entries (:func:`screpair.simulate.mask`,
    numpy ``default_rng(seed)``); the method sees only the masked matrix. Truth and prediction are
    scored as ``log1p(x / L * 1e6)`` with ``L`` the masked matrix's row sums; MSE and Pearson r over
    the masked entries (:func:`~screpair.evaluate.masked_accuracy`).
    """

    name = "masked"

    def __init__(self, *, frac: float = 0.1, min_frac_cells: float = 0.5,
                 layer: str | None = None, label_key: str | None = None):
        super().__init__(layer=layer, label_key=label_key)
        self.frac, self.min_frac_cells = frac, min_frac_cells

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        from .. import simulate

        x = self._counts(adata)
        keep_g = np.flatnonzero(np.bincount(x.indices, minlength=x.shape[1])
                                >= self.min_frac_cells * x.shape[0])
        if keep_g.size == 0:
            msg = f"no gene has non-zero counts in >= {self.min_frac_cells:.0%} of the cells."
            raise ValueError(msg)
        x = x[:, keep_g]
        keep_c = np.flatnonzero(np.diff(x.indptr) > 0)
        base = _clean(x[keep_c], adata.obs.iloc[keep_c], adata.var.iloc[keep_g])
        # every kept gene is in >= min_frac_cells of the kept cells already; min_frac_cells=0 keeps
        # the gene set fixed inside simulate.mask
        masked, mask = simulate.mask(base, frac=self.frac, min_frac_cells=0.0, rng=as_rng(rng))
        counts = sp.csr_matrix(masked.layers["counts"])
        truth = sp.csr_matrix(masked.layers["true_counts"])
        mask = sp.csr_matrix(mask).astype(bool)
        sub = _clean(counts, masked.obs, masked.var)
        cells, genes = _nonempty_index(counts)
        if cells.size < counts.shape[0] or genes.size < counts.shape[1]:
            sub = sub[cells][:, genes].copy()
            truth, mask = truth[cells][:, genes], mask[cells][:, genes]
        return Task(sub, {"true_counts": truth, "mask": mask, "lib": library_size(sub.X)})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        t = task.truth
        out = M.masked_accuracy(t["true_counts"], imputed, t["mask"], t["lib"])
        return {**out, "zeros_imputed": M.zeros_imputed(task.adata.X, imputed)}


# --------------------------------------------------------------------------- MCV
class MCV(Protocol):
    """Molecular cross-validation as in Open Problems' denoising task (Batson et al. 2019).

    Each count is split binomially into train (``train_frac``) and test
    (:func:`screpair.simulate.mcv_split`); cells and genes with no train counts are dropped (from
    both splits); the method denoises the train split and is scored against the test split with
    :func:`~screpair.evaluate.mcv_mse` (normalise both to ``target_sum``, log1p, MSE) and
    :func:`~screpair.evaluate.mcv_poisson` in Open Problems' argument order (``mcv_poisson``) and
    in the MCV paper's order (``mcv_poisson_mcv``).
    """

    name = "mcv"

    def __init__(self, *, train_frac: float = 0.9, target_sum: float = 1e4,
                 layer: str | None = None, label_key: str | None = None):
        super().__init__(layer=layer, label_key=label_key)
        self.train_frac, self.target_sum = train_frac, target_sum

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        from .. import simulate

        x = self._counts(adata)
        base = _clean(x, adata.obs, adata.var)
        split = simulate.mcv_split(base, train_frac=self.train_frac, rng=as_rng(rng))
        train, test = (sp.csr_matrix(half.X) for half in split)
        cells, genes = _nonempty_index(train)
        train, test = train[cells][:, genes], test[cells][:, genes]
        sub = _clean(train, adata.obs.iloc[cells], adata.var.iloc[genes])
        return Task(sub, {"test": test, "train_sum": float(train.sum())})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        t = task.truth
        return {
            "mcv_mse": M.mcv_mse(t["test"], imputed, target_sum=self.target_sum),
            "mcv_poisson": M.mcv_poisson(t["test"], imputed, train_sum=t["train_sum"]),
            "mcv_poisson_mcv": M.mcv_poisson(t["test"], imputed, train_sum=t["train_sum"],
                                             order="mcv"),
            "zeros_imputed": M.zeros_imputed(task.adata.X, imputed),
        }


# --------------------------------------------------------------------------- labelled data
def _variable_genes(x: sp.csr_matrix, n_top_genes: int | None) -> np.ndarray:
    """Sorted indices of the genes with counts in >= 3 cells of ``x`` and, among them, the
    ``n_top_genes`` largest variances of ``log1p(x / L * 1e6)`` (``L`` the row sums of ``x``; all
    of them when ``None``)."""
    x = sp.csr_matrix(x)
    genes = np.flatnonzero(np.bincount(x.indices, minlength=x.shape[1]) >= 3)
    if n_top_genes is not None and genes.size > n_top_genes:
        lg = _norm.log_normalize(x[:, genes], _norm.CPM, library_size(x))
        mean = np.asarray(lg.mean(0)).ravel()
        var = np.asarray(lg.multiply(lg).mean(0)).ravel() - mean**2
        genes = np.sort(genes[np.argsort(-var, kind="stable")[:n_top_genes]])
    return genes


def _deg_agreement(
    ref: pd.DataFrame, res: pd.DataFrame, ref_log, pred_log, *, k: int, alpha: float | None = None
) -> dict[str, float]:
    """Agreement of a method's DEG table with the reference one, averaged over the groups.

    ``ref`` and ``res`` are :func:`~screpair.evaluate.rank_genes` tables over the same genes and
    groups; ``ref_log`` / ``pred_log`` the matching log-normalised matrices. Per group of ``ref``:
    ``deg_jaccard`` / ``deg_f1`` of the method's and the reference's top-``k`` genes by score;
    ``marker_spearman``: mean Spearman r across cells of reference vs method values of the union
    of every group's top-10 reference genes (not scored without per-cell reference values:
    ``ref_log=None``). With ``alpha``, also ``deg_auc``: ROC AUC of the method's scores for the
    reference DEGs (``pval_adj < alpha`` and ``logfc > 0``).
    """
    aucs, jac, f1s, markers = [], [], [], set()
    for g, r in ref.groupby("group", sort=False):
        m = res[res["group"] == g]
        if alpha is not None:
            is_ref = ((r["pval_adj"] < alpha) & (r["logfc"] > 0)).to_numpy()
            aucs.append(M.deg_auc(m["score"].to_numpy(), is_ref))
        top_ref = M.top_k(r["score"].to_numpy(), k)
        top_m = M.top_k(m["score"].to_numpy(), k)
        jac.append(M.jaccard(top_m, top_ref))
        f1s.append(M.f1(top_m, top_ref))
        markers |= M.top_k(r["score"].to_numpy(), 10)
    out: dict[str, float] = {}
    if alpha is not None:
        out["deg_auc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    out["deg_jaccard"] = float(np.mean(jac))
    out["deg_f1"] = float(np.mean(f1s))
    if ref_log is not None:
        out["marker_spearman"] = M.marker_spearman(ref_log, pred_log, sorted(markers))
    return out


def _lfc_pearson(ref: pd.DataFrame, res: pd.DataFrame) -> float:
    """Mean over the groups of ``ref`` of the Pearson r, across genes, between the method's and
    the reference's log2 fold changes (``logfc`` of :func:`~screpair.evaluate.rank_genes`
    tables over the same genes; genes with a non-finite value in either left out; a group
    whose fold changes are constant in either table: nan)."""
    rs = []
    for g, r in ref.groupby("group", sort=False):
        both = r[["gene", "logfc"]].merge(res.loc[res["group"] == g, ["gene", "logfc"]],
                                          on="gene", suffixes=("_ref", "_res"))
        a, b = both["logfc_ref"].to_numpy(float), both["logfc_res"].to_numpy(float)
        ok = np.isfinite(a) & np.isfinite(b)
        rs.append(M.pearson_r(a[ok], b[ok]))
    return float(np.nanmean(rs)) if np.isfinite(rs).any() else float("nan")


class _Labelled(Protocol):
    """Shared preparation for protocols that use cell labels: drop unlabelled cells, keep the
    ``n_top_genes`` most variable genes of ``log1p(CPM)`` (all genes when ``None``)."""

    def __init__(self, *, n_top_genes: int | None = 2000, n_pcs: int = 30,
                 layer: str | None = None, label_key: str | None = None):
        super().__init__(layer=layer, label_key=label_key)
        self.n_top_genes, self.n_pcs = n_top_genes, n_pcs

    def _prepare_labelled(self, adata: AnnData) -> tuple[AnnData, np.ndarray, np.ndarray, np.ndarray]:
        key = find_label_key(adata, self.label_key)
        if key is None:
            msg = (f"protocol {self.name!r} needs cell labels; none of {LABEL_KEYS} is in obs. "
                   "Pass label_key=.")
            raise ValueError(msg)
        labels = adata.obs[key]
        ok = np.flatnonzero(labels.notna().to_numpy())
        x = self._counts(adata)[ok]
        genes = _variable_genes(x, self.n_top_genes)
        x = x[:, genes]
        cells = np.flatnonzero(np.diff(x.indptr) > 0)
        x = x[cells]
        rows = ok[cells]
        sub = _clean(x, adata.obs.iloc[rows], adata.var.iloc[genes])
        y = labels.iloc[rows].astype(str).to_numpy()
        return sub, y, rows, genes

    def _log(self, m) -> np.ndarray:
        return M.log1p_norm(m, scale=1e4)

    def _pca(self, m, rng) -> np.ndarray:
        return self._pca_log(self._log(m), rng)

    def _pca_log(self, lg: np.ndarray, rng) -> np.ndarray:
        """PCA (``n_pcs``, centred, seeded from ``rng``) of an already log-normalised matrix."""
        from sklearn.decomposition import PCA

        n = max(2, min(self.n_pcs, lg.shape[0] - 1, lg.shape[1] - 1))
        seed = int(as_rng(rng).integers(2**31))
        return PCA(n_components=n, random_state=seed).fit_transform(lg - lg.mean(0))


class Clustering(_Labelled):
    """Clustering quality against known labels.

    Output (count scale) -> ``log1p(x / L * 1e4)`` (``L`` its own row sums) -> PCA (``n_pcs``) ->
    k-means with k = number of labels (10 restarts, seeded) -> ARI, purity, entropy
    (:mod:`~screpair.evaluate` definitions); silhouette of the known labels in the PCA space.
    """

    name = "clustering"

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        sub, y, _, _ = self._prepare_labelled(adata)
        return Task(sub, {"labels": y, "seed": int(as_rng(rng).integers(2**31))})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        from sklearn.cluster import KMeans

        y, seed = task.truth["labels"], task.truth["seed"]
        pcs = self._pca(imputed, seed)
        k = len(np.unique(y))
        pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pcs)
        return {
            "ari": M.ari(y, pred),
            "purity": M.purity(y, pred),
            "entropy": M.entropy(y, pred),
            "silhouette": M.silhouette(pcs, y, rng=seed),
        }

    def embedding(self, task: Task, imputed) -> np.ndarray:
        return self._pca(imputed, task.truth["seed"])[:, :2]


class DEG(_Labelled):
    """Differential expression of each label group vs the rest, against a reference DEG set.

    Reference, in order of preference: a matched bulk table (``bulk_path``: genes x samples CSV,
    first column the gene names; a group's samples are the columns named ``<group>`` or starting
    with ``<group>_``, e.g. ``D3T0_sorted``): reference score = log2 fold change of the mean bulk
    CPM of the group vs the other groups' samples, reference DEGs = ``log2FC > bulk_lfc`` with
    ``CPM >= bulk_min_cpm`` in the group (genes are restricted to those in the bulk table);
    else ``layers['true_counts']`` of a simulation (the DEGs of the truth); else the observed raw
    counts (then the scores measure how much a method preserves the raw DE signal, not
    accuracy). Reference DEGs of a group: ``pval_adj < alpha`` and ``logfc > 0``. Per group, ``deg_auc`` is the ROC AUC of the method's scores for the reference
    set, ``deg_jaccard`` / ``deg_f1`` compare the top-``k`` genes of the method and of the
    reference; ``lfc_pearson`` is the Pearson r across genes of the method's and the
    reference's log2 fold changes (the cnnImpute paper's fold-change agreement with bulk);
    ``marker_spearman`` is the mean Spearman r across cells between reference and method
    ``log1p(CP10k)`` of the top-10 reference markers of every group, scored only against a
    simulation's true counts: with a bulk or the raw reference those values would be the
    input's own, which rewards changing nothing. Averaged over groups.
    """

    name = "deg"

    def __init__(self, *, test: str = "wilcoxon", k: int = 100, alpha: float = 0.05,
                 bulk_path: str | None = None, bulk_lfc: float = 1.0, bulk_min_cpm: float = 10.0,
                 n_top_genes: int | None = 2000, n_pcs: int = 30, layer: str | None = None,
                 label_key: str | None = None):
        super().__init__(n_top_genes=n_top_genes, n_pcs=n_pcs, layer=layer, label_key=label_key)
        self.test, self.k, self.alpha = test, k, alpha
        self.bulk_path, self.bulk_lfc, self.bulk_min_cpm = bulk_path, bulk_lfc, bulk_min_cpm

    def _bulk_reference(self, names: pd.Index, y: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
        bulk = pd.read_csv(self.bulk_path, index_col=0)
        bulk = bulk[~bulk.index.duplicated()]
        cpm = bulk / bulk.sum(0) * 1e6
        keep = np.flatnonzero(names.isin(cpm.index))
        if keep.size == 0:
            msg = "no gene of the data is in the bulk table."
            raise ValueError(msg)
        cpm = cpm.loc[names[keep]]
        cats = pd.unique(y)
        cols = {g: [c for c in cpm.columns if c == g or str(c).startswith(f"{g}_")] for g in cats}
        missing = [g for g, c in cols.items() if not c]
        if missing:
            msg = f"no bulk sample for group(s) {missing}; bulk columns: {list(cpm.columns)}."
            raise ValueError(msg)
        rows = []
        for g in cats:
            rest = [c for h in cats if h != g for c in cols[h]]
            m_in, m_out = cpm[cols[g]].mean(1).to_numpy(), cpm[rest].mean(1).to_numpy()
            lfc = np.log2((m_in + 1.0) / (m_out + 1.0))
            is_de = (lfc > self.bulk_lfc) & (m_in >= self.bulk_min_cpm)
            rows.append(pd.DataFrame({"group": g, "gene": np.arange(keep.size), "score": lfc,
                                      "pval": np.where(is_de, 0.0, 1.0),
                                      "pval_adj": np.where(is_de, 0.0, 1.0), "logfc": lfc}))
        return keep, pd.concat(rows, ignore_index=True)

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        sub, y, rows, genes = self._prepare_labelled(adata)
        if self.bulk_path is not None:
            keep, ref = self._bulk_reference(sub.var_names, y)
            sub = sub[:, keep].copy()
            cells, _ = _nonempty_index(sub.X)
            if cells.size < sub.n_obs:
                sub, y = sub[cells].copy(), y[cells]
            # no per-cell values in a bulk table: no marker_spearman (see the class docstring)
            return Task(sub, {"labels": y, "ref": ref, "ref_log": None, "source": "bulk"})
        if "true_counts" in adata.layers:
            ref_x = sp.csr_matrix(adata.layers["true_counts"])[rows][:, genes]
            source = "true_counts"
        else:
            ref_x, source = sub.X, "raw"
        ref_log = self._log(ref_x)
        ref = M.rank_genes(ref_log, y, method=self.test)
        return Task(sub, {"labels": y, "ref": ref, "source": source,
                          "ref_log": ref_log if source == "true_counts" else None})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        y, ref = task.truth["labels"], task.truth["ref"]
        pred_log = self._log(imputed)
        res = M.rank_genes(pred_log, y, method=self.test)
        out = _deg_agreement(ref, res, task.truth["ref_log"], pred_log, k=self.k, alpha=self.alpha)
        out["lfc_pearson"] = _lfc_pearson(ref, res)
        return out


# --------------------------------------------------------------------------- simulations
class Dropout(Protocol):
    """Dropout detection on a simulation with ``layers['true_counts']``: PR-AUC and F1 of the
    method's ``dropout_prob`` (methods without one get no score) for telling dropout zeros from
    true zeros and its calibration (``dropout_ece``, and the reliability diagram from
    :meth:`calibration`, :func:`~screpair.evaluate.dropout_calibration`), plus
    ``mse_log``/``pearson_log`` of the output against the truth on ``log1p(CPM)`` over the dropped
    entries and ``zeros_imputed``."""

    name = "dropout"

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        if "true_counts" not in adata.layers:
            msg = "protocol 'dropout' needs a simulation with layers['true_counts']."
            raise ValueError(msg)
        x = self._counts(adata)
        truth = sp.csr_matrix(adata.layers["true_counts"])
        cells, genes = _nonempty_index(x)
        x, truth = x[cells][:, genes], truth[cells][:, genes]
        sub = _clean(x, adata.obs.iloc[cells], adata.var.iloc[genes])
        dropped = (to_dense(truth) > 0) & (to_dense(x) == 0)
        return Task(sub, {"true_counts": truth, "dropped": dropped, "lib": library_size(x)})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        t = task.truth
        out: dict[str, float] = {}
        if t["dropped"].any():
            acc = M.masked_accuracy(t["true_counts"], imputed, t["dropped"], t["lib"])
            out.update({"mse_log": acc["mse"], "pearson_log": acc["pearson"]})
        out["zeros_imputed"] = M.zeros_imputed(task.adata.X, imputed)
        calib = self.calibration(task, posterior)
        if calib is not None:
            prob = posterior.dropout_prob
            out.update(M.dropout_detection(prob, task.adata.X, t["true_counts"]))
            out["dropout_ece"] = M.dropout_ece(calib)
        return out

    def calibration(self, task: Task, posterior=None) -> pd.DataFrame | None:
        prob = getattr(posterior, "dropout_prob", None)
        if prob is None:
            return None
        return M.dropout_calibration(prob, task.adata.X, task.truth["true_counts"])


#: The "moderate" damage of the degrade protocol (see :class:`Degrade`).
MODERATE_DAMAGE = {"bias_3p": 0.5, "dropout_rate": 0.3, "noise_sd": 0.2}


class Degrade(_Labelled):
    """Profile reconstruction after :func:`screpair.simulate.degrade` (the DiffRepairer setting).

    ``degrade_params`` go to :func:`screpair.simulate.degrade`; the defaults are the *moderate*
    setting of the DiffRepairer benchmark: ``bias_3p=0.5`` (a median-length transcript keeps
    ``exp(-0.5)`` = 61% of its log signal), ``dropout_rate=0.3`` and ``noise_sd=0.2`` on the
    ``log1p(CP10k)`` scale, gene lengths from ``var['gene_length']`` or
    :func:`screpair.simulate.default_gene_length`.

    Two settings: with ``reference_frac=0`` (default) every method sees only the degraded
    counts of all cells (what ``screpair.impute`` does on a user's data). With
    ``reference_frac=f`` a random fraction ``f`` of the cells is kept clean as a *reference*
    (``Task.reference``) and only the other cells are degraded, repaired and scored: methods
    trained on clean profiles (``uses_reference``: diffusion, dae, vae) fit on the reference and
    repair the degraded cells, the DiffRepairer paper's use; the others (MAGIC, raw, ...) see the
    degraded cells only. The method sees the degraded counts (cells and genes with no
    degraded counts are dropped); the clean input is the truth. Scoring the degraded input itself
    gives the "before repair" numbers.

    Every score is computed on the clean data's ``n_top_genes`` highly variable genes (among the
    genes with counts in >= 3 cells, :func:`screpair.pp.highly_variable_genes`: dispersion-based,
    Seurat flavour, the HVGs a scanpy user would analyse and the definition the repair methods
    use; all of those genes when ``None``), the same genes for every method, in the DiffRepairer paper's space
    ``log1p(x / L * 1e4)``: ``L`` is the clean library size (all genes) for the truth and the
    degraded input's library size (all genes) for the input and every output. Outputs are on the
    count scale at the observed library size (the project's convention), so a neural method is
    scored on exactly its log-scale prediction, and a perfect repair is the clean profile at the
    observed library size, ``clean * L_observed / L_clean``.

    Profile scores: ``mse_log`` and ``pearson_log`` over all scored entries, ``mse_log_dropped``
    over the scored entries the damage zeroed (clean count > 0, degraded count 0), and
    ``cosine_cell`` (mean over cells of the cosine similarity of the rows).

    Expression scores:

    - ``expr_pr_auc``: average precision (:func:`sklearn.metrics.average_precision_score`) of the
      output's ``log1p(CP10k)`` for the entries expressed in the clean data (clean count > 0);
    - ``expr_f1``: F1 of calling an entry expressed when the output, rescaled to the clean
      cell's library size (``x L_clean / L_in``), is ``>= 0.5`` (it would round to at least one
      count at the truth's depth), against the same truth
      (:func:`screpair.evaluate.expression_recovery`). Without the rescaling a perfect repair
      (the clean profile at the degraded library size, about a third of the clean one under the
      moderate damage) would score F1 ~0.5, below the degraded input.

    Label scores (cells with a label in ``obs[label_key]``, found by :func:`find_label_key`; left
    out when there are no labels or fewer than two groups):

    - ``silhouette``: silhouette width of the labels in the PCA (``n_pcs``) of the output's
      ``log1p(CP10k)``, as :class:`Clustering` does;
    - ``deg_jaccard`` / ``deg_f1``: each group vs the rest (``test``, :func:`rank_genes`) on the
      output and on the clean data (the reference); Jaccard / F1 of the two top-``k`` gene sets;
    - ``marker_spearman``: mean Spearman r across cells of clean vs output ``log1p(CP10k)`` of the
      top-10 clean-data markers of every group, as :class:`DEG` does.

    The deg scores and ``marker_spearman`` are averaged over groups.
    """

    name = "degrade"

    def __init__(
        self,
        *,
        n_top_genes: int | None = 2000,
        n_pcs: int = 30,
        k: int = 100,
        test: str = "wilcoxon",
        layer: str | None = None,
        label_key: str | None = None,
        reference_frac: float = 0.0,
        **degrade_params,
    ):
        super().__init__(n_top_genes=n_top_genes, n_pcs=n_pcs, layer=layer, label_key=label_key)
        if not 0.0 <= reference_frac < 1.0:
            msg = f"reference_frac must be in [0, 1), got {reference_frac!r}."
            raise ValueError(msg)
        self.k, self.test, self.reference_frac = k, test, reference_frac
        self.degrade_params = {**MODERATE_DAMAGE, **degrade_params}

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        from .. import simulate

        x = self._counts(adata)
        gen = as_rng(rng)
        ref_rows = None  # reference: clean cells kept out of the damage
        if self.reference_frac > 0:
            n_ref = int(round(x.shape[0] * self.reference_frac))
            if not 0 < n_ref < x.shape[0]:
                msg = (f"reference_frac={self.reference_frac} leaves no reference or no test cell "
                       f"of {x.shape[0]}.")
                raise ValueError(msg)
            perm = gen.permutation(x.shape[0])
            ref_rows, test_rows = np.sort(perm[:n_ref]), np.sort(perm[n_ref:])
            base = _clean(x[test_rows], adata.obs.iloc[test_rows], adata.var)
        else:
            base = _clean(x, adata.obs, adata.var)
        deg = simulate.degrade(base, rng=gen, **self.degrade_params)
        damaged = sp.csr_matrix(deg.layers["counts"])
        truth = sp.csr_matrix(deg.layers["true_counts"])
        cells, genes = _nonempty_index(damaged)
        damaged, truth = damaged[cells][:, genes], truth[cells][:, genes]
        sub = _clean(damaged, deg.obs.iloc[cells], deg.var.iloc[genes])
        reference = None
        if ref_rows is not None:  # clean profiles of the other cells, same genes
            r = x[ref_rows][:, genes]
            keep = np.flatnonzero(np.diff(r.indptr) > 0)
            reference = _clean(r[keep], adata.obs.iloc[ref_rows[keep]], deg.var.iloc[genes])
        # scored: the clean data's variable genes; reference values computed once
        scored = _variable_genes(truth, None)
        if self.n_top_genes is not None and scored.size > self.n_top_genes:
            from ..pp import hvg_dispersion

            hv = hvg_dispersion(truth[:, scored], self.n_top_genes)["highly_variable"]
            scored = scored[hv.to_numpy()]
        lib_clean = library_size(truth)
        clean_log = M.log1p_norm(truth[:, scored], lib_clean, scale=1e4)
        dropped = (to_dense(truth[:, scored]) > 0) & (to_dense(damaged[:, scored]) == 0)
        out = {
            "true_counts": truth,
            "dropped": dropped,
            "lib_in": library_size(damaged),
            "lib_clean": lib_clean,
            "genes": scored,
            "expressed": np.asarray(to_dense(truth[:, scored]) > 0),
            "clean_log": clean_log,
            "seed": int(gen.integers(2**31)),
        }
        key = find_label_key(adata, self.label_key)
        if key is not None:
            labels = deg.obs[key].iloc[cells]
            rows = np.flatnonzero(labels.notna().to_numpy())
            y = labels.iloc[rows].astype(str).to_numpy()
            if np.unique(y).size >= 2:
                ref = M.rank_genes(clean_log[rows], y, method=self.test)
                out.update({"labelled": rows, "labels": y, "ref": ref})
        return Task(sub, out, reference=reference)

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        t = task.truth
        genes, lib = t["genes"], t["lib_in"]
        pred = (
            sp.csr_matrix(imputed)[:, genes]
            if sp.issparse(imputed)
            else np.asarray(imputed)[:, genes]
        )
        pred = np.asarray(to_dense(pred), dtype=np.float64)
        tl = t["clean_log"]
        pl = M.log1p_norm(pred, lib, scale=1e4)
        everything = np.ones(tl.shape, dtype=bool)
        out = {
            "mse_log": M.mse_masked(tl, pl, everything),
            "pearson_log": M.pearson_masked(tl, pl, everything),
            "cosine_cell": M.cosine_cell(tl, pl),
        }
        if t["dropped"].any():
            out["mse_log_dropped"] = M.mse_masked(tl, pl, t["dropped"])
        depth = t["lib_clean"] / np.where(lib > 0, lib, 1.0)
        out.update(M.expression_recovery(t["expressed"], pred, lib=lib, depth=depth))
        if "labels" in t:
            rows, y = t["labelled"], t["labels"]
            pcs = self._pca_log(pl[rows], t["seed"])
            out["silhouette"] = M.silhouette(pcs, y, rng=t["seed"])
            res = M.rank_genes(pl[rows], y, method=self.test)
            out.update(_deg_agreement(t["ref"], res, tl[rows], pl[rows], k=self.k))
        return out


class DegradeReference(Degrade):
    """:class:`Degrade` with a clean reference (the DiffRepairer paper's setting).

    A random half of the cells (``reference_frac``) stays clean; the other half is degraded,
    repaired and scored. Methods trained on clean profiles (diffusion, dae, vae) fit on the
    reference; the others see only the degraded cells. Same parameters and scores as
    :class:`Degrade`.
    """

    name = "degrade_reference"

    def __init__(self, *, reference_frac: float = 0.5, **params):
        if not reference_frac > 0:
            msg = f"protocol 'degrade_reference' needs reference_frac > 0, got {reference_frac!r}."
            raise ValueError(msg)
        super().__init__(reference_frac=reference_frac, **params)


class Smfish(Protocol):
    """Agreement of per-gene Gini coefficients with smFISH (Grün et al. 2014 mESC; SAVER's check).

    The method imputes the whole dataset (non-empty genes). For every condition (``obs[label_key]``,
    default ``condition``) and every gene measured by smFISH, the Gini coefficient of the imputed
    values, library-normalised (``x / L * median(L)``, ``L`` the output's row sums), is compared
    with the Gini coefficient of the smFISH counts of that condition (per-cell mRNA counts,
    normalised by cell area ``count / area * median(area)`` when ``fish_normalize="area"``):
    ``gini_rmse`` and ``gini_pearson`` over the (condition, gene) pairs; likewise the per-gene
    mean, CV and Fano factor (:func:`~screpair.evaluate.moment_agreement`: ``mean_pearson``,
    ``cv_pearson``, ``cv_rmse``, ``fano_pearson``).

    Parameters
    ----------
    fish_path
        Long CSV with columns ``condition, gene, mrna_count`` (and ``cell_area``), e.g.
        ``grun2014_mesc/grun2014_smFISH_counts_long.csv.gz``.
    fish_normalize
        ``"area"`` or ``"none"``.
    """

    name = "smfish"

    def __init__(self, *, fish_path: str | None = None, fish_normalize: str = "area",
                 layer: str | None = None, label_key: str | None = None):
        super().__init__(layer=layer, label_key=label_key)
        self.fish_path, self.fish_normalize = fish_path, fish_normalize

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        if self.fish_path is None:
            msg = "protocol 'smfish' needs fish_path= (the smFISH long CSV)."
            raise ValueError(msg)
        if self.fish_normalize not in ("area", "none"):
            msg = f"fish_normalize must be 'area' or 'none', got {self.fish_normalize!r}."
            raise ValueError(msg)
        fish = pd.read_csv(self.fish_path)
        key = self.label_key or "condition"
        if key not in adata.obs:
            msg = f"protocol 'smfish' needs obs[{key!r}] with the condition of each cell."
            raise KeyError(msg)
        x = self._counts(adata)
        cells, genes = _nonempty_index(x)
        sub = _clean(x[cells][:, genes], adata.obs.iloc[cells], adata.var.iloc[genes])
        cond = adata.obs[key].astype(str).to_numpy()[cells]
        values = fish["mrna_count"].to_numpy(dtype=np.float64)
        if self.fish_normalize == "area":
            area = fish["cell_area"].to_numpy(dtype=np.float64)
            values = values / area * np.median(area)
        fish = fish.assign(value=values)
        pairs = []
        for (c, g), block in fish.groupby(["condition", "gene"], sort=True):
            if c in set(cond) and g in sub.var_names:
                v = block["value"].to_numpy()
                pairs.append((str(c), str(g), M.gini(v), M.gene_moments(v)))
        if not pairs:
            msg = "no smFISH (condition, gene) pair matches the data's conditions and genes."
            raise ValueError(msg)
        return Task(sub, {"conditions": cond, "pairs": pairs})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        x = np.asarray(to_dense(imputed), dtype=np.float64)
        lib = x.sum(1)
        norm = x / np.where(lib == 0, 1, lib)[:, None] * np.median(lib)
        names = task.adata.var_names
        cond = task.truth["conditions"]
        sc_g, fish_g, sc_m, fish_m = [], [], [], []
        for c, g, fish_gini, fish_moments in task.truth["pairs"]:
            v = norm[cond == c, names.get_loc(g)]
            sc_g.append(M.gini(v))
            fish_g.append(fish_gini)
            sc_m.append(M.gene_moments(v))
            fish_m.append(fish_moments)
        return {**M.gini_agreement(np.array(sc_g), np.array(fish_g)),
                **M.moment_agreement(np.array(sc_m), np.array(fish_m))}


# --------------------------------------------------------------------------- downsample
class Downsample(Protocol):
    """SAVER's downsampling experiment (Huang et al. 2018): deep cells thinned, then repaired.

    The cells whose library size is at least the ``deep_quantile`` quantile are the reference;
    genes with counts in at least ``min_frac_cells`` of them are kept. Every count is thinned
    binomially to a fraction ``frac`` (``Binomial(x, frac)``, numpy ``default_rng(seed)``), cells
    and genes left without counts are dropped, and the method sees only the thinned counts.
    Scores (:func:`~screpair.evaluate.downsample_recovery`) compare ``log1p(x / L * 1e4)`` of the
    output (``L`` the thinned library size) with the same of the original deep counts:
    gene-wise and cell-wise Pearson r, and the error of the gene-gene correlation matrix of the
    ``n_corr_genes`` most expressed genes. ``raw`` (the thinned counts themselves) is the
    before-repair reference.
    """

    name = "downsample"

    def __init__(self, *, frac: float = 0.1, deep_quantile: float = 0.5,
                 min_frac_cells: float = 0.1, n_corr_genes: int = 200,
                 layer: str | None = None, label_key: str | None = None):
        super().__init__(layer=layer, label_key=label_key)
        for name, v in (("frac", frac), ("deep_quantile", deep_quantile),
                        ("min_frac_cells", min_frac_cells)):
            if not 0.0 < v < 1.0 and not (name != "frac" and v == 0.0):
                msg = f"{name} must be in (0, 1), got {v!r}."
                raise ValueError(msg)
        self.frac, self.deep_quantile = frac, deep_quantile
        self.min_frac_cells, self.n_corr_genes = min_frac_cells, n_corr_genes

    def prepare(self, adata: AnnData, *, rng: RNGLike = 0) -> Task:
        x = self._counts(adata)
        lib = library_size(x)
        cells = np.flatnonzero(lib >= np.quantile(lib, self.deep_quantile))
        deep = x[cells]
        detected = np.bincount(deep.indices, minlength=x.shape[1]) / len(cells)
        genes = np.flatnonzero(detected >= self.min_frac_cells)
        deep = sp.csr_matrix(deep[:, genes])
        thin = deep.copy()
        thin.data = as_rng(rng).binomial(deep.data.astype(np.int64), self.frac).astype(np.float64)
        thin.eliminate_zeros()
        keep_c, keep_g = _nonempty_index(thin)
        thin, deep = thin[keep_c][:, keep_g], deep[keep_c][:, keep_g]
        sub = _clean(thin, adata.obs.iloc[cells[keep_c]], adata.var.iloc[genes[keep_g]])
        return Task(sub, {"deep": deep})

    def score(self, task: Task, imputed, posterior=None) -> dict[str, float]:
        deep = task.truth["deep"]
        truth_log = M.log1p_norm(deep, scale=1e4)
        pred_log = M.log1p_norm(imputed, library_size(task.adata.X), scale=1e4)
        return M.downsample_recovery(truth_log, pred_log, n_corr_genes=self.n_corr_genes)


PROTOCOLS: dict[str, type[Protocol]] = {
    p.name: p
    for p in (Masked, MCV, Clustering, DEG, Dropout, Degrade, DegradeReference, Smfish, Downsample)
}


def get_protocol(name: str | Protocol, **params) -> Protocol:
    """A protocol instance from its name (``masked``, ``mcv``, ``clustering``, ``deg``, …)."""
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        msg = f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}."
        raise ValueError(msg)
    return PROTOCOLS[name](**params)
