"""Pure metric functions: arrays in, numbers (or small tables) out.

Nothing here reads or writes AnnData; the protocols in :mod:`screpair.evaluate._protocols` build
the inputs. Every function documents the exact formula so that numbers can be compared with the
papers and leaderboards they come from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from .. import _norm
from .._utils import library_size, to_dense

# metric name -> True when larger is better (used for ranks in the benchmark summary)
GREATER_IS_BETTER: dict[str, bool] = {
    "mse": False,
    "pearson": True,
    "mcv_mse": False,
    "mcv_poisson": False,
    "mcv_poisson_mcv": False,
    "ari": True,
    "purity": True,
    "entropy": False,
    "silhouette": True,
    "deg_auc": True,
    "deg_jaccard": True,
    "deg_f1": True,
    "marker_spearman": True,
    "lfc_pearson": True,
    "gini_rmse": False,
    "gini_pearson": True,
    "mean_pearson": True,
    "cv_rmse": False,
    "cv_pearson": True,
    "fano_pearson": True,
    "dropout_pr_auc": True,
    "dropout_f1": True,
    "dropout_ece": False,
    "expr_pr_auc": True,
    "expr_f1": True,
    "mse_log": False,
    "pearson_log": True,
    "mse_log_dropped": False,
    "cosine_cell": True,
    "gene_corr": True,
    "cell_corr": True,
    "corr_matrix_error": False,
}

#: Metrics reported next to the accuracy but not ranked (no direction is better).
UNRANKED: frozenset[str] = frozenset({"zeros_imputed"})


# --------------------------------------------------------------------------- normalisation
def _as_float(x) -> np.ndarray:
    return np.asarray(to_dense(x), dtype=np.float64)


def log1p_norm(x, lib: np.ndarray | None = None, *, scale: float = _norm.CPM) -> np.ndarray:
    """``log1p(x / L * scale)`` per cell (row), densified (:func:`screpair._norm.log_normalize`).

    Parameters
    ----------
    x
        Cells x genes, counts or count-scale predictions.
    lib
        Library size per cell ``L``; ``None`` uses the row sums of ``x``. Cells with ``L == 0``
        stay 0 (they are divided by 1, as :func:`scanpy.pp.normalize_total` does).
    scale
        Target sum: ``1e6`` for log1p(CPM), ``1e4`` for the Open Problems normalisation.
    """
    xd = _as_float(x)
    lib = library_size(xd) if lib is None else np.asarray(lib, dtype=np.float64).ravel()
    if lib.shape[0] != xd.shape[0]:
        msg = f"lib has {lib.shape[0]} entries but x has {xd.shape[0]} cells."
        raise ValueError(msg)
    return to_dense(_norm.log_normalize(xd, scale, np.where(lib == 0, 1.0, lib)))


# --------------------------------------------------------------------------- masked accuracy
def _masked_values(truth, pred, mask) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_float(truth), _as_float(pred)
    m = np.asarray(to_dense(mask), dtype=bool)
    if not (t.shape == p.shape == m.shape):
        msg = f"shapes differ: truth {t.shape}, pred {p.shape}, mask {m.shape}."
        raise ValueError(msg)
    if not m.any():
        msg = "mask selects no entries."
        raise ValueError(msg)
    return t[m], p[m]


def mse_masked(truth, pred, mask) -> float:
    """Mean squared error over the entries where ``mask`` is true: ``mean((t - p)^2)``."""
    t, p = _masked_values(truth, pred, mask)
    return float(np.mean((t - p) ** 2))


def pearson_masked(truth, pred, mask) -> float:
    """Pearson correlation of ``truth`` and ``pred`` over the masked entries (NaN if constant)."""
    return pearson_r(*_masked_values(truth, pred, mask))


def pearson_r(a, b) -> float:
    """Pearson correlation of two 1-D arrays; NaN with fewer than two values or either
    constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def masked_accuracy(true_counts, pred_counts, mask, lib: np.ndarray) -> dict[str, float]:
    """The cnnImpute / DeepImpute masked-value scores (issue 5's protocol).

    Both the held-out truth and the prediction (count scale) are transformed as
    ``log1p(x / L * 1e6)`` with ``L`` the library size of the *masked* matrix the method saw, then
    MSE and Pearson r are taken over the masked entries.

    Returns
    -------
    ``{"mse": ..., "pearson": ...}``
    """
    t = log1p_norm(true_counts, lib, scale=1e6)
    p = log1p_norm(pred_counts, lib, scale=1e6)
    return {"mse": mse_masked(t, p, mask), "pearson": pearson_masked(t, p, mask)}


# --------------------------------------------------------------------------- MCV (Open Problems)
def poisson_nll(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """``mean(y_pred - y_true * log(y_pred + 1e-6))``.

    This is ``molecular_cross_validation.mcv_sweep.poisson_nll_loss`` (Batson et al. 2019), the
    function Open Problems imports: a Poisson negative log-likelihood without the ``log(k!)`` term,
    in numpy (not torch), with the prediction first.
    """
    y_pred, y_true = _as_float(y_pred), _as_float(y_true)
    return float(np.mean(y_pred - y_true * np.log(y_pred + 1e-6)))


def mcv_mse(test, denoised, *, target_sum: float = 1e4) -> float:
    """Open Problems "denoising" MSE.

    Both the MCV test counts and the denoised matrix are normalised per cell to ``target_sum``
    (scanpy ``normalize_total``: cells with no counts are left at 0) and ``log1p``-transformed; the
    score is the mean squared difference over *all* entries (sklearn ``mean_squared_error``).
    ``target_sum=1e4`` is the value of openproblems-bio/task_denoising ``metrics/mse``.
    """
    t = log1p_norm(test, scale=target_sum)
    d = log1p_norm(denoised, scale=target_sum)
    if t.shape != d.shape:
        msg = f"shapes differ: test {t.shape}, denoised {d.shape}."
        raise ValueError(msg)
    return float(np.mean((t - d) ** 2))


def mcv_poisson(test, denoised, *, train_sum: float, order: str = "openproblems") -> float:
    """Open Problems "denoising" Poisson loss.

    The denoised matrix (fitted on the MCV *train* split) is rescaled by one global factor,
    ``denoised * test.sum() / train_sum``, then scored with :func:`poisson_nll` over all entries.

    Parameters
    ----------
    test
        MCV test counts.
    denoised
        Denoised train counts (count scale).
    train_sum
        Total count of the train split (``train.sum()``).
    order
        ``"openproblems"`` (default): ``poisson_nll(test, denoised_scaled)``, i.e.
        ``mean(test - denoised_scaled * log(test + 1e-6))``, the argument order of
        openproblems v1 ``tasks/denoising/metrics/poisson.py``, which is what its leaderboard shows.
        ``"mcv"``: ``poisson_nll(denoised_scaled, test)``, i.e.
        ``mean(denoised_scaled - test * log(denoised_scaled + 1e-6))``, the order the MCV paper
        intends (and openproblems-bio/task_denoising uses since v2): a proper Poisson NLL of the test
        counts under the denoised means.
    """
    t, d = _as_float(test), _as_float(denoised)
    if t.shape != d.shape:
        msg = f"shapes differ: test {t.shape}, denoised {d.shape}."
        raise ValueError(msg)
    if train_sum <= 0:
        msg = f"train_sum must be positive, got {train_sum}."
        raise ValueError(msg)
    d = d * t.sum() / float(train_sum)
    if order == "openproblems":
        return poisson_nll(t, d)
    if order == "mcv":
        return poisson_nll(d, t)
    msg = f"order must be 'openproblems' or 'mcv', got {order!r}."
    raise ValueError(msg)


# --------------------------------------------------------------------------- clustering
def _contingency(labels_true, labels_pred) -> np.ndarray:
    from sklearn.metrics.cluster import contingency_matrix

    return np.asarray(contingency_matrix(np.asarray(labels_true), np.asarray(labels_pred)))


def purity(labels_true, labels_pred) -> float:
    """Cluster purity: ``(1/n) sum_k max_j |cluster_k ∩ class_j|`` (1 is best)."""
    c = _contingency(labels_true, labels_pred)  # classes x clusters
    return float(c.max(axis=0).sum() / c.sum())


def entropy(labels_true, labels_pred) -> float:
    """Weighted cluster entropy: ``sum_k (n_k/n) * H(class | cluster k)``, natural log (0 is best).

    ``H(class | cluster k) = -sum_j p_jk log p_jk`` with ``p_jk = n_jk / n_k``; the definition used
    with purity in the cnnImpute clustering evaluation (Zhao & Karypis' cluster entropy).
    """
    c = _contingency(labels_true, labels_pred).astype(np.float64)
    n_k = c.sum(axis=0)
    p = c / n_k
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=0)
    return float((n_k / n_k.sum() * h).sum())


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (:func:`sklearn.metrics.adjusted_rand_score`)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def silhouette(embedding: np.ndarray, labels, *, rng=0, sample_size: int | None = 5000) -> float:
    """Mean silhouette width of the known ``labels`` in ``embedding`` (Euclidean).

    Subsamples ``sample_size`` cells (seeded) above that size, as sklearn allows.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    n = embedding.shape[0]
    size = sample_size if sample_size is not None and n > sample_size else None
    seed = None if size is None else int(np.random.default_rng(rng).integers(2**31))
    return float(silhouette_score(embedding, labels, sample_size=size, random_state=seed))


# --------------------------------------------------------------------------- differential expression
def bh_adjust(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels ``fdr_bh``), NaN-free input."""
    p = np.asarray(pvals, dtype=np.float64)
    n = p.size
    if n == 0:
        return p.copy()
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(ranked, 1.0)
    return out


def rank_genes(
    x_log,
    groups,
    *,
    method: str = "wilcoxon",
    tie_correct: bool = False,
    gene_names: Sequence[str] | None = None,
    chunk_size: int = 512,
) -> pd.DataFrame:
    """Each group vs the rest, per gene, as :func:`scanpy.tl.rank_genes_groups` does.

    Parameters
    ----------
    x_log
        Cells x genes, log-normalised expression (e.g. ``log1p(CPM)``).
    groups
        Group label per cell.
    method
        ``"wilcoxon"``: rank-sum z-score ``(R_g - n_g (n + 1) / 2) / sqrt(n_g n_r (n + 1) / 12)``
        (``R_g`` the sum of the group's mid-ranks among all cells), optionally with the tie
        correction of :func:`scipy.stats.mannwhitneyu`; two-sided normal p-value.
        ``"t-test"``: Welch's t (``ttest_ind_from_stats(equal_var=False)``, ddof=1 variances).
    tie_correct
        Wilcoxon only: apply the tie correction to the variance.
    gene_names
        Names for the ``gene`` column; default ``0..n_genes-1``.
    chunk_size
        Genes ranked at a time (memory bound for the Wilcoxon test).

    Returns
    -------
    Long DataFrame with columns ``group, gene, score, pval, pval_adj, logfc`` (``pval_adj``:
    Benjamini-Hochberg within each group; ``logfc``: log2 ratio of the ``expm1`` means, as scanpy).
    """
    x = _as_float(x_log)
    groups = np.asarray(groups)
    if groups.shape[0] != x.shape[0]:
        msg = f"groups has {groups.shape[0]} labels but x_log has {x.shape[0]} cells."
        raise ValueError(msg)
    if method not in ("wilcoxon", "t-test"):
        msg = f"method must be 'wilcoxon' or 't-test', got {method!r}."
        raise ValueError(msg)
    names = np.asarray(gene_names) if gene_names is not None else np.arange(x.shape[1])
    cats = pd.unique(groups)
    if len(cats) < 2:
        msg = "differential expression needs at least two groups."
        raise ValueError(msg)
    n, n_genes = x.shape
    masks = {g: groups == g for g in cats}
    scores = {g: np.empty(n_genes) for g in cats}
    pvals = {g: np.empty(n_genes) for g in cats}
    if method == "wilcoxon":
        for start in range(0, n_genes, chunk_size):
            block = x[:, start : start + chunk_size]
            ranks = stats.rankdata(block, axis=0)
            if tie_correct:
                tie = np.array([_tie_term(block[:, j]) for j in range(block.shape[1])])
            for g in cats:
                m = masks[g]
                n1, n2 = int(m.sum()), int(n - m.sum())
                r1 = ranks[m].sum(axis=0)
                mean_r = n1 * (n + 1) / 2.0
                var = n1 * n2 * (n + 1) / 12.0
                if tie_correct:
                    var = var - n1 * n2 * tie / (12.0 * n * (n - 1))
                with np.errstate(divide="ignore", invalid="ignore"):
                    z = (r1 - mean_r) / np.sqrt(var)
                scores[g][start : start + block.shape[1]] = z
                pvals[g][start : start + block.shape[1]] = 2 * stats.norm.sf(np.abs(z))
    else:
        for g in cats:
            m = masks[g]
            a, b = x[m], x[~m]
            with np.errstate(divide="ignore", invalid="ignore"):
                t, p = stats.ttest_ind_from_stats(
                    a.mean(0), a.std(0, ddof=1), a.shape[0], b.mean(0), b.std(0, ddof=1), b.shape[0],
                    equal_var=False,
                )
            scores[g], pvals[g] = np.asarray(t, float), np.asarray(p, float)
    rows = []
    for g in cats:
        m = masks[g]
        s = np.nan_to_num(scores[g], nan=0.0)
        p = np.nan_to_num(pvals[g], nan=1.0)
        mean_in = np.expm1(x[m]).mean(0)
        mean_out = np.expm1(x[~m]).mean(0)
        logfc = np.log2((mean_in + 1e-9) / (mean_out + 1e-9))
        rows.append(
            pd.DataFrame(
                {"group": g, "gene": names, "score": s, "pval": p, "pval_adj": bh_adjust(p),
                 "logfc": logfc}
            )
        )
    return pd.concat(rows, ignore_index=True)


def _tie_term(v: np.ndarray) -> float:
    _, counts = np.unique(v, return_counts=True)
    return float((counts**3 - counts).sum())


def deg_auc(scores: np.ndarray, is_reference: np.ndarray) -> float:
    """ROC AUC of a gene ranking (higher score = more DE) against a reference DEG set (0/1)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(is_reference, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def top_k(scores: np.ndarray, k: int, names: Sequence | None = None) -> set:
    """The ``k`` highest-scoring genes (ties broken by position), as a set of names/indices."""
    s = np.asarray(scores, dtype=np.float64)
    idx = np.argsort(-s, kind="stable")[: min(k, s.size)]
    return set(idx.tolist()) if names is None else {np.asarray(names)[i] for i in idx}


def jaccard(a: set, b: set) -> float:
    """``|a ∩ b| / |a ∪ b|`` (NaN when both are empty)."""
    union = len(a | b)
    return float(len(a & b) / union) if union else float("nan")


def f1(pred: set, ref: set) -> float:
    """F1 of a predicted set against a reference set: ``2 |p ∩ r| / (|p| + |r|)``."""
    denom = len(pred) + len(ref)
    return float(2 * len(pred & ref) / denom) if denom else float("nan")


# --------------------------------------------------------------------------- agreement with truth
def marker_spearman(reference, imputed, genes: Sequence[int] | None = None) -> float:
    """Mean over marker genes of the Spearman correlation across cells of reference vs imputed.

    Genes constant in either matrix are skipped; NaN when none is left.
    """
    r, p = _as_float(reference), _as_float(imputed)
    if r.shape != p.shape:
        msg = f"shapes differ: reference {r.shape}, imputed {p.shape}."
        raise ValueError(msg)
    cols = np.arange(r.shape[1]) if genes is None else np.asarray(genes)
    rs = []
    for j in cols:
        a, b = r[:, j], p[:, j]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        rs.append(stats.spearmanr(a, b).statistic)
    return float(np.mean(rs)) if rs else float("nan")


def gini(x) -> float:
    """Gini coefficient of non-negative values: ``sum_i (2i - n - 1) x_(i) / (n sum x)``.

    ``x_(i)`` sorted ascending, ``i = 1..n``; 0 for equal values, ``(n-1)/n`` when one value holds
    everything; NaN for an all-zero vector.
    """
    v = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n, total = v.size, v.sum()
    if n == 0 or total == 0:
        return float("nan")
    if v[0] < 0:
        msg = "gini needs non-negative values."
        raise ValueError(msg)
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * v).sum() / (n * total))


def gini_agreement(gini_sc: np.ndarray, gini_fish: np.ndarray) -> dict[str, float]:
    """Agreement of per-gene Gini coefficients from (imputed) scRNA-seq and smFISH.

    Returns ``{"gini_rmse": sqrt(mean((g_sc - g_fish)^2)), "gini_pearson": corr(g_sc, g_fish)}``
    over genes with both values finite (SAVER's smFISH comparison).
    """
    rmse, r = _rmse_pearson(gini_sc, gini_fish)
    return {"gini_rmse": rmse, "gini_pearson": r}


def _rmse_pearson(a, b) -> tuple[float, float]:
    """RMSE and Pearson r (:func:`pearson_r`) of the pairs of ``a`` and ``b`` with both values
    finite; NaN for both when there is none."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size == 0:
        return float("nan"), float("nan")
    return float(np.sqrt(np.mean((a - b) ** 2))), pearson_r(a, b)


def gene_moments(x) -> tuple[float, float, float]:
    """Mean, coefficient of variation ``sd / mean`` and Fano factor ``var / mean`` of one gene's
    values across cells (population variance, ``ddof=0``); CV and Fano NaN when the mean is 0."""
    v = np.asarray(x, dtype=np.float64).ravel()
    mean = float(v.mean()) if v.size else float("nan")
    if not mean > 0:
        return mean, float("nan"), float("nan")
    var = float(v.var())
    return mean, float(np.sqrt(var) / mean), var / mean


def moment_agreement(sc: np.ndarray, fish: np.ndarray) -> dict[str, float]:
    """Agreement of per-gene moments (rows: :func:`gene_moments` of each (condition, gene)) of
    scRNA-seq and smFISH: ``mean_pearson`` and ``fano_pearson``, Pearson r of the log10 means and
    log10 Fano factors (both depend on each assay's units, so only their correlation across genes
    is compared), ``cv_pearson`` and ``cv_rmse`` of the CVs (unitless). Pairs with a non-finite
    value (for the logs: a non-positive one) left out of each score."""
    sc, fish = np.asarray(sc, dtype=np.float64), np.asarray(fish, dtype=np.float64)
    out = {}
    for j, name in ((0, "mean"), (2, "fano")):
        a, b = sc[:, j], fish[:, j]
        ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
        out[f"{name}_pearson"] = pearson_r(np.log10(a[ok]), np.log10(b[ok]))
    out["cv_rmse"], out["cv_pearson"] = _rmse_pearson(sc[:, 1], fish[:, 1])
    return out


def dropout_detection(prob, observed, true_counts, *, threshold: float = 0.5) -> dict[str, float]:
    """How well ``prob`` separates dropout zeros from true zeros.

    Among the observed zeros, an entry is a *dropout* when its true count is positive. Returns the
    PR-AUC (:func:`sklearn.metrics.average_precision_score`) of ``prob`` and the F1 of
    ``prob > threshold`` for that binary task.
    """
    from sklearn.metrics import average_precision_score, f1_score

    pr, obs, tru = _as_float(prob), _as_float(observed), _as_float(true_counts)
    if not (pr.shape == obs.shape == tru.shape):
        msg = f"shapes differ: prob {pr.shape}, observed {obs.shape}, true_counts {tru.shape}."
        raise ValueError(msg)
    zero = obs == 0
    y = tru[zero] > 0
    s = pr[zero]
    if y.all() or not y.any():
        return {"dropout_pr_auc": float("nan"), "dropout_f1": float("nan")}
    return {
        "dropout_pr_auc": float(average_precision_score(y, s)),
        "dropout_f1": float(f1_score(y, s > threshold)),
    }


def dropout_calibration(prob, observed, true_counts, *, n_bins: int = 10) -> pd.DataFrame:
    """Reliability diagram of ``prob`` as the probability that an observed zero is a dropout.

    Among the observed zeros (a *dropout* has a positive true count), the probabilities are
    binned into ``n_bins`` equal-width bins of [0, 1]. Returns one row per non-empty bin with
    ``bin_lo``, ``bin_hi``, ``mean_prob`` (mean probability in the bin), ``frac_dropout`` (fraction
    of dropouts in the bin; equal to ``mean_prob`` for a calibrated model) and ``n`` (zeros in the
    bin). :func:`dropout_ece` summarises it.
    """
    pr, obs, tru = _as_float(prob), _as_float(observed), _as_float(true_counts)
    if not (pr.shape == obs.shape == tru.shape):
        msg = f"shapes differ: prob {pr.shape}, observed {obs.shape}, true_counts {tru.shape}."
        raise ValueError(msg)
    zero = obs == 0
    y, p = (tru[zero] > 0).astype(np.float64), np.clip(pr[zero], 0.0, 1.0)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    sp_ = np.bincount(idx, weights=p, minlength=n_bins)
    sy = np.bincount(idx, weights=y, minlength=n_bins)
    keep = n > 0
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({
        "bin_lo": edges[:-1][keep],
        "bin_hi": edges[1:][keep],
        "mean_prob": sp_[keep] / n[keep],
        "frac_dropout": sy[keep] / n[keep],
        "n": n[keep],
    })


def dropout_ece(calibration: pd.DataFrame) -> float:
    """Expected calibration error of a :func:`dropout_calibration` table: the zero-weighted mean
    of ``|mean_prob - frac_dropout|`` over the bins (0 for a calibrated model)."""
    n = calibration["n"].to_numpy(dtype=np.float64)
    if n.sum() == 0:
        return float("nan")
    gap = np.abs(calibration["mean_prob"].to_numpy() - calibration["frac_dropout"].to_numpy())
    return float(np.sum(n * gap) / n.sum())


def zeros_imputed(observed, imputed, *, tol: float = 0.0) -> float:
    """Fraction of the observed zeros that the output turns positive (``imputed > tol``).

    ``observed`` may be sparse; ``imputed`` is dense or sparse, same shape.
    """
    obs = observed if sp.issparse(observed) else sp.csr_matrix(np.asarray(observed))
    obs = sp.csr_matrix(obs)
    obs.eliminate_zeros()
    if obs.shape != imputed.shape:
        msg = f"shapes differ: observed {obs.shape}, imputed {imputed.shape}."
        raise ValueError(msg)
    n_zero = obs.shape[0] * obs.shape[1] - obs.nnz
    if n_zero == 0:
        return float("nan")
    rows, cols = obs.nonzero()
    if sp.issparse(imputed):
        imp = sp.csr_matrix(imputed)
        pos_all = int((imp.data > tol).sum())
        pos_obs = int((np.asarray(imp[rows, cols]).ravel() > tol).sum())
    else:
        imp = np.asarray(imputed)
        pos_all = int(np.count_nonzero(imp > tol))
        pos_obs = int(np.count_nonzero(imp[rows, cols] > tol))
    return float((pos_all - pos_obs) / n_zero)


def expression_recovery(
    true_counts,
    pred,
    *,
    lib: np.ndarray | None = None,
    depth: np.ndarray | float | None = None,
    threshold: float = 0.5,
    scale: float = 1e4,
) -> dict[str, float]:
    """How well a count-scale output recovers which entries are expressed.

    An entry is *expressed* when its true count is positive (a boolean matrix works too). Returns
    over all entries:

    - ``expr_pr_auc``: :func:`sklearn.metrics.average_precision_score` of the output normalised
      as ``log1p(pred / L * scale)`` (``L`` = ``lib``, by default the row sums of ``pred``);
    - ``expr_f1``: :func:`sklearn.metrics.f1_score` of calling an entry expressed when
      ``pred * depth >= threshold`` (default 0.5: the value would round to at least one count);
      0 when nothing is called. ``depth`` (a scalar or one factor per cell, default 1) puts the
      output on the truth's sequencing depth: when the output is at a smaller library size than
      the true counts (a degraded cell), pass ``L_true / L_out``, or a perfect repair, which
      is the truth scaled down to ``L_out``, would miss every true count below ``0.5 / depth``.

    Both are NaN when every entry or none is expressed.
    """
    from sklearn.metrics import average_precision_score, f1_score

    tru, pr = _as_float(true_counts), _as_float(pred)
    if tru.shape != pr.shape:
        msg = f"shapes differ: true_counts {tru.shape}, pred {pr.shape}."
        raise ValueError(msg)
    y = (tru > 0).ravel()
    if y.all() or not y.any():
        return {"expr_pr_auc": float("nan"), "expr_f1": float("nan")}
    s = log1p_norm(pr, lib, scale=scale).ravel()
    if depth is not None:
        d = np.asarray(depth, dtype=np.float64)
        pr = pr * (d[:, None] if d.ndim == 1 else d)
    return {
        "expr_pr_auc": float(average_precision_score(y, s)),
        "expr_f1": float(f1_score(y, pr.ravel() >= threshold, zero_division=0.0)),
    }


def cosine_cell(truth, pred) -> float:
    """Mean over cells of the cosine similarity of the truth and prediction rows."""
    t, p = _as_float(truth), _as_float(pred)
    num = (t * p).sum(1)
    den = np.linalg.norm(t, axis=1) * np.linalg.norm(p, axis=1)
    ok = den > 0
    return float(np.mean(num[ok] / den[ok])) if ok.any() else float("nan")


# --------------------------------------------------------------------------- downsampling
def downsample_recovery(truth_log, pred_log, *, n_corr_genes: int = 200) -> dict[str, float]:
    """SAVER's downsampling scores of a method's output against the deep original.

    Both arguments are cells x genes on the same (normalized, log) scale. ``gene_corr``: mean over
    genes of the Pearson r across cells of output and original; ``cell_corr``: mean over cells of
    the r across genes; ``corr_matrix_error``: mean absolute difference, over gene pairs, between
    the gene-gene correlation matrices of output and original on the ``n_corr_genes`` genes with
    the highest mean in the original. Constant genes or cells (r undefined) are left out.
    """
    t, p = _as_float(truth_log), _as_float(pred_log)

    def mean_r(a, b):  # Pearson r of each row pair: the cosine of the centred rows
        return cosine_cell(a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True))

    top = np.sort(np.argsort(-t.mean(0), kind="stable")[: min(n_corr_genes, t.shape[1])])
    with np.errstate(invalid="ignore", divide="ignore"):
        ct = np.corrcoef(t[:, top].T)
        cp = np.corrcoef(p[:, top].T)
    iu = np.triu_indices(len(top), k=1)
    diff = np.abs(ct[iu] - cp[iu])
    diff = diff[np.isfinite(diff)]
    return {
        "gene_corr": mean_r(t.T, p.T),
        "cell_corr": mean_r(t, p),
        "corr_matrix_error": float(diff.mean()) if diff.size else float("nan"),
    }
