"""``CNNImputer``: cnnImpute (Zhang et al., Sci Rep 14:3946, 2024) as a screpair estimator."""

from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ... import _norm
from ..._logging import get_logger, log_task
from ..._utils import RNGLike, as_rng, check_sample_size, torch_seed
from .._base import BaseImputer, DataContext, Posterior, moved_params_error, take_rows
from .._torch import (
    LossOutput,
    TrainConfig,
    dense_rows,
    fit_seed,
    heap_reuse,
    import_torch,
    json_config,
    load_model,
    load_state,
    model_error,
    params_json,
    resolve_config,
    resolve_device,
    row_batches,
    rows_entry,
    save_model,
    saved_estimator,
    saved_rows,
    saved_seed,
    split_cells,
    tensor_entry,
    train_loop,
)
from ._select import Group, build_groups

logger = get_logger(__name__)

_MIN_INPUTS = 10  # shortest input that survives two conv(k=3) + maxpool(2) blocks with room
#: default ``n_dropout_cells``: cells the dropout model is clustered and fitted on
DROPOUT_CELLS = 10_000
#: default ``n_train_cells``: cells the networks are trained on
TRAIN_CELLS = 50_000


def _at_zeros(prob: sp.csr_matrix, x) -> sp.csr_matrix:
    """``prob`` without the entries where the counts ``x`` are observed (never missing)."""
    observed = (x != 0) if sp.issparse(x) else sp.csr_matrix(np.asarray(x) != 0)
    prob = sp.csr_matrix(prob - prob.multiply(observed))
    prob.eliminate_zeros()
    return prob


class _Used(NamedTuple):
    """Normalized counts and missing mask restricted to the genes the networks use, and the
    networks' input / target indices into those columns."""

    x: Any
    missing: Any
    inputs: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    """The network of each target subset (:class:`._module.GroupedCNN`).

    The defaults are those of ``preset="default"``; see :data:`PRESETS` for the paper's.

    Attributes
    ----------
    n_filters, kernel_size, n_hidden, dropout
        Convolution filters and kernel width, width of the hidden dense layer and its dropout
        rate (paper: 16, 3, 1024, 0.3).
    pooling
        End of the second convolution block: ``"average"`` (global average pooling, as in the
        original cnnImpute code) or ``"max"`` (the paper's text: max-pool(2) and flatten).
    """

    n_filters: int = 16
    kernel_size: int = 3
    n_hidden: int = 1024
    dropout: float = 0.3
    pooling: str = "average"


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Which genes are imputed (targets), how they are split into subset networks and which
    genes each subset reads (:mod:`._select`).

    The defaults are those of ``preset="default"``; see :data:`PRESETS` for the paper's.

    Attributes
    ----------
    subset_size
        Targets per subset network N (paper: 512).
    min_subsets
        Split the targets into at least this many subsets, so that small gene sets still have
        input genes outside each subset (with a single subset holding every target, no gene
        would be left to read from).
    n_top
        Input genes per target (paper: 5).
    max_missing_frac
        Largest missing fraction of an input gene P (paper: 0.5).
    n_ensemble
        Number of independent target partitions, trained together and averaged (1 = paper).
    min_frac_cells
        Only genes with non-zero counts in at least this fraction of the cells are targets
        (default 0.01; the paper: 0, every gene with a likely dropout). Other genes come back
        unchanged.
    """

    subset_size: int = 512
    min_subsets: int = 4
    n_top: int = 5
    max_missing_frac: float = 0.5
    n_ensemble: int = 1
    min_frac_cells: float = 0.01


#: the configs of each preset: what ``module`` / ``train`` / ``targets`` left at ``None`` mean,
#: and the base a dict of settings updates (see ``CNNImputer``)
PRESETS: dict[str, dict[str, Any]] = {
    # Zhang et al. (2024) as described in the paper, and screpair <= 0.2's only behaviour
    "paper": {
        "module": CNNConfig(n_filters=16, kernel_size=3, n_hidden=1024, dropout=0.3, pooling="max"),
        "train": TrainConfig(
            n_epochs=150,
            batch_size=32,
            lr=1e-4,
            patience=5,
            warmup_epochs=0,
            min_delta=0.0,
            val_frac=0.1,
        ),
        "targets": TargetConfig(
            subset_size=512,
            min_subsets=4,
            n_top=5,
            max_missing_frac=0.5,
            n_ensemble=1,
            min_frac_cells=0.0,
        ),
    },
    # measured departures (issue 18; see the CNNImputer docstring)
    "default": {
        "module": CNNConfig(),
        "train": TrainConfig(
            n_epochs=150,
            batch_size=256,
            lr=1e-3,
            patience=10,
            warmup_epochs=2,
            min_delta=1e-3,
            val_frac=0.1,
        ),
        "targets": TargetConfig(),
    },
}


class CNNImputer(BaseImputer):
    """cnnImpute: convolutional networks predict the likely dropouts from correlated genes.

    1. Dropout probabilities of the zero entries come from :mod:`screpair.dropout` (density-peak
       clustering on a t-SNE embedding, then per cluster a zero-inflated negative binomial with
       size factors and a logistic dropout curve, ``dropout_model="zinb"``, or the paper's
       scImpute gamma-normal mixture, ``dropout_model="scimpute"``); an entry is *missing* when
       its probability exceeds ``threshold``.
    2. Counts are normalized to counts per million and ``log1p``-transformed (``log=False``:
       cnnImpute_nl, no log).
    3. Genes with a missing entry are *targets*, split into subsets of at most
       ``targets.subset_size``; each subset's inputs are, per target, the ``targets.n_top`` most
       correlated genes outside the subset whose missing fraction is at most
       ``targets.max_missing_frac`` (see :mod:`._select`).
    4. One CNN per subset (:class:`._module.GroupedCNN`: all subsets train at once as one batched
       network), trained on 90% of the cells with a masked MSE (only observed target entries count;
       padding and missing entries are masked out), Adam, early stopping on the other 10%.
    5. Predictions replace **only** the missing entries; every other value is returned exactly.

    Large data: the dropout model is fitted on at most ``n_dropout_cells`` cells and the
    networks are trained on at most ``n_train_cells`` (random samples above; every cell below,
    with the results of all cells), the training batches are dense only for the batch's cells
    and the genes the networks read or predict, and the posterior of a block of cells needs
    only those rows and the fitted state (``posterior_by_rows``): :func:`screpair.impute_file`
    computes and writes it block by block. Above both sample sizes (with the dropout model
    fitted here, no ``groupby``) the fit reads only the rows of the union of the two samples
    (at most ``n_dropout_cells + n_train_cells``, 60,000 at the defaults):
    :func:`screpair.impute_file` reads only those rows from the store, :func:`screpair.impute`
    takes them from its matrix, and both samples are drawn from ``rng`` as the fit on all
    cells draws them, so the output is that fit's bit for bit (tests). No statistic of the fit
    needs the other cells: the clustering, PCA, dropout parameters and the mean library size
    of the size factors come from the dropout model's sample; the targets (detected in at
    least ``targets.min_frac_cells`` of the cells), the input genes' correlations, the output
    biases and the training from the training sample; each cell's CPM from its own row. The
    other cells join a cluster (the vote of their nearest sampled cells in the sample's PCA
    space) when their probabilities are computed, block by block. The fit reads every cell
    below either sample size, with ``dropout_layer`` (the probabilities of every cell come
    from that layer) and with ``groupby`` (the dropout model's sample is stratified by every
    cell's label). With ``rng=None`` the fit draws a fresh seed and takes both samples from
    the rows read.

    Parameters
    ----------
    module
        Network (:class:`CNNConfig`: ``n_filters``, ``kernel_size``, ``n_hidden``, ``dropout``,
        ``pooling``).
    train
        Training (:class:`~screpair.methods.TrainConfig`): at most ``n_epochs`` epochs of Adam,
        learning rate warmed up linearly over ``warmup_epochs``, early stopping after
        ``patience`` epochs without a relative validation improvement of ``min_delta`` (the best
        weights are kept), ``val_frac`` of the cells for validation, ``device="auto"`` (a GPU
        when one is available), ``progress`` (a bar over epochs). Defaults: 150 epochs, batch
        256, lr 1e-3, patience 10, 2 warm-up epochs, min_delta 1e-3, val_frac 0.1; the paper:
        150, 32, 1e-4, 5, 0, 0 (any improvement), 0.1.
    targets
        Targets and input genes (:class:`TargetConfig`: ``subset_size``, ``min_subsets``,
        ``n_top``, ``max_missing_frac``, ``n_ensemble``, ``min_frac_cells``).

        Each of ``module``, ``train`` and ``targets`` takes ``None`` (the preset's config), a
        dict (the preset's config with those fields replaced: ``train={"n_epochs": 20}`` keeps
        the preset's other training settings; this is what a CLI ``--config`` file gives, e.g.
        ``{"train": {"lr": 3e-4}}``) or a config instance, used as it is (the config classes'
        own defaults are ``preset="default"``'s).
    threshold
        Dropout-probability threshold T above which a zero is missing (paper: 0.5).
    log
        Work on ``log1p(CPM)`` (cnnImpute) or on CPM (cnnImpute_nl).
    correlation
        ``"global"``: one set of subset networks, input genes chosen by correlation over all cells,
        trained on all cells. ``"cluster"``: as the original code, separate networks per cell
        cluster, each with input genes chosen by the correlation **within** the cluster and
        trained/applied on that cluster's cells only. The clusters are those of the dropout model
        (or ``obs[groupby]``).
    groupby
        ``obs`` column with cell cluster labels, used for the dropout model (instead of its own
        clustering) and for ``correlation="cluster"``.
    dropout_layer
        Read the dropout probabilities from ``layers[dropout_layer]`` of an AnnData input instead of
        fitting the dropout model (e.g. after :func:`screpair.dropout_probability`).
    dropout_model
        ``"zinb"`` (default): :func:`screpair.dropout.fit_zinb_dropout`, the probability that a zero
        hides a positive true count, calibrated and ranked by each cell's depth, so only likely
        dropouts are imputed (close to no denoising on MCV; it loses the masked-value protocol,
        which scores only hidden non-zeros). ``"scimpute"``: the paper's model,
        :func:`screpair.dropout.fit_dropout`, which gives nearly every zero of an expressed gene a
        probability near 1 (81-85% of the zeros of 10x data are imputed) and wins the masked
        protocol. ``dropout_kwargs={"inflation": "gene"}`` adds a per-gene zero inflation to
        ``"zinb"`` (measured, not better; see ``benchmarks/RESULTS.md``).
    preset
        ``"default"`` or ``"paper"``: the configs that ``module``, ``train`` and ``targets``
        stand for when ``None``, and that a dict of settings updates (:data:`PRESETS` holds
        both). ``preset="paper"`` is Zhang et al. (2024) as described and reproduces screpair
        <= 0.2; the defaults depart from it where a measurement showed the same or better
        accuracy in much less time (Notes): ``module.pooling``, ``targets.min_frac_cells`` and
        ``train``'s ``batch_size``, ``lr``, ``patience``, ``warmup_epochs`` and ``min_delta``.
    cluster_kwargs, dropout_kwargs
        Extra keyword arguments for :func:`screpair.dropout.cluster_cells` and the dropout model
        (:func:`screpair.dropout.fit_zinb_dropout` or :func:`screpair.dropout.fit_dropout`).
    n_dropout_cells
        Most cells the dropout model is clustered and fitted on (:class:`screpair.dropout.
        DropoutModel`'s ``n_fit_cells``; ``None``: all). Up to it every cell is used and the
        probabilities are those of the whole data; above it a random sample is clustered
        (3-D t-SNE and k-means take time growing with the cells) and the other cells join the
        cluster of their nearest sampled neighbours in the sample's PCA space. Default 10,000.
        Measured (pbmc3k, 1,000 of 2,700 cells, rng 0): clusters ARI 0.742 against the
        all-cells clustering, 91.8 % of the all-cells' missing entries also missing, masked
        RMSE 1.8476 vs 1.8531 with all cells (15 epochs; ``benchmarks/README.md``).
    n_train_cells
        Most cells the networks are trained on (targets, inputs and output biases come from the
        same cells; ``None``: all). Above it a random sample of this size is used: an epoch's
        time grows with the cells, while the networks' size does not. Default 50,000.
    rng
        Seed or ``numpy.random.Generator`` (clustering, samples, split, initialisation,
        batches, dropout). ``fit`` turns it into one integer seed, ``posterior_seed_``: a fitted
        model, saved or not, returns the same output for the same input on every call.

    Attributes
    ----------
    var_names_
        Genes the model was fitted on.
    groups_
        The subset networks (:class:`._select.Group`: targets, inputs, cluster).
    module_
        The trained :class:`._module.GroupedCNN`.
    history_
        ``DataFrame`` with columns epoch, train_loss, val_loss, seconds.
    dropout_prob_
        Dropout probabilities of the fitted cells (CSR); ``None`` when the dropout model was
        fitted on a sample (more than ``n_dropout_cells`` cells): they are then computed by
        blocks, for the fit's missing entries and again by ``posterior``.
    labels_
        Cell cluster labels of the fitted cells; ``None`` when the fit read only its samples'
        rows (the other cells' clusters are found with their probabilities).
    dropout_model_
        The fitted :class:`screpair.dropout.DropoutModel` (``None`` with ``dropout_layer``): it
        gives the probabilities of any block of cells, so ``posterior`` works by blocks of rows
        (:func:`screpair.impute_file`); saved with the model. Cells of the fitted data keep
        their fitted clusters, new cells join the nearest sampled cells' cluster.
    train_cells_
        Rows of the cells the networks were trained on (``None``: all).
    posterior_seed_
        Integer seed of the fit (``rng`` itself when it is an int); saved with the model.

    Notes
    -----
    Where this differs from the paper's description or the original code, and why:

    - targets are split into at least ``targets.min_subsets`` subsets (balanced sizes) so that a
      data set with fewer than ~1,000 targets still has input genes outside each subset (the
      paper's single 512-gene subset would leave no inputs at all on the 61-381-gene masked
      benchmarks);
    - the output layer is linear (clipped at 0 when predicting) and its bias starts at each
      target's mean observed value on the training cells (a zero start needs hundreds of epochs at
      lr 1e-4 to reach log1p(CPM) values of 5-10);
    - duplicates among the input genes are removed (the original code keeps them), which is what
      the issue specifies and shortens the input from up to 2,560 to ~800 genes on pbmc3k;
    - defaults (issue 18; masked protocol of ``benchmarks/RESULTS.md``, Baron mouse pancreas,
      seed 0, scImpute dropout model as in that table; MSE / r, seconds on the shared 2-core
      CPU):

      * ``module.pooling="average"``: the original code's global average pooling instead of
        the paper's max-pool + flatten. The first dense layer shrinks from ``16 * L/4 x 1024``
        to ``16 x 1024`` per subset (~100x fewer weights on 10x data: 14 M instead of 179 M on
        pbmc3k with all genes), and it is *more* accurate: 0.483 / 0.771 vs 0.539 / 0.740 with
        the paper's training (30 s vs 87 s); the flattened layer overfits the few hundred
        training cells;
      * ``train``: ``batch_size=256, lr=1e-3, warmup_epochs=2, min_delta=1e-3``: on Baron
        0.473 / 0.776 in 23 s (41 epochs, patience 5), against 0.483 / 0.771 with batch 32 and
        lr 1e-4; batch 128 with lr 4e-4 gave 0.478 / 0.774, batch 128 with lr 1e-3 stopped too
        early (0.521 / 0.754). With max pooling the larger batches are worse (batch 128: 0.545,
        batch 256: 0.559);
      * ``train.patience=10``: on pbmc3k (seed 0, dropout probabilities fitted once and passed
        in) patience 5 stopped at epoch 17 (0.366 / 0.823, against 0.344 / 0.835 for the
        paper's settings on the same probabilities); patience 10 gives 0.340 / 0.837 in 59
        epochs. ``min_delta=1e-4`` (or 0) with patience 10 gives 0.331 / 0.842 but trains 120
        epochs, twice as long; lr 3e-4 without warm-up: 0.354 / 0.830;
      * ``targets.min_frac_cells=0.01``: a gene detected in a handful of cells has noise for
        correlations and its prediction is close to its mean non-zero value, written into
        every zero flagged missing. No gene of the masked protocol (detected in >= 50% of the
        cells) is affected; on pbmc3k with all genes it keeps 8,948 of the 13,443 targets of
        the scImpute model and all 442 of the ZINB model (every one detected in >= 122 cells);
    - with ``module.pooling="max"``, the issue's (paper's) architecture with two max-pool +
      batch-norm blocks is used;
    - ``correlation="global"`` (default) trains one set of networks on all cells; the original
      code's per-cluster networks are ``correlation="cluster"``.

    Examples
    --------
    >>> import screpair
    >>> adata = screpair.simulate.splat(n_obs=200, n_vars=100, rng=0)  # doctest: +SKIP
    >>> screpair.impute(adata, "cnn", train={"n_epochs": 5}, layer="counts")  # doctest: +SKIP
    >>> adata.layers["cnn"]  # doctest: +SKIP
    """

    name: ClassVar[str] = "cnn"
    _configs: ClassVar[dict[str, type]] = {
        "module": CNNConfig,
        "train": TrainConfig,
        "targets": TargetConfig,
    }
    #: the flat parameters of earlier releases, now fields of the nested configs
    _moved_params: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("n_filters", "kernel_size", "n_hidden", "dropout", "pooling"), "module"),
        **dict.fromkeys(
            ("n_epochs", "batch_size", "lr", "patience", "warmup_epochs", "min_delta",
             "val_frac", "device", "progress"),
            "train",
        ),
        **dict.fromkeys(
            ("subset_size", "min_subsets", "n_top", "max_missing_frac", "n_ensemble",
             "min_frac_cells"),
            "targets",
        ),
    }
    #: models saved before presets existed were trained with the paper's settings
    _saved_defaults: ClassVar[dict] = {"preset": "paper"}
    transductive: ClassVar[bool] = False
    has_dropout_prob: ClassVar[bool] = True

    @property
    def posterior_by_rows(self) -> bool:  # type: ignore[override]
        """A cell's output depends on its row and the fitted state (networks and dropout
        model): the posterior works on any block of rows. Not for a model saved before models
        carried their dropout model (it refits one on all the cells it is given)."""
        return self.dropout_layer is not None or getattr(self, "dropout_model_", 0) is not None

    def __init__(
        self,
        *,
        module: CNNConfig | None = None,
        train: TrainConfig | None = None,
        targets: TargetConfig | None = None,
        threshold: float = 0.5,
        log: bool = True,
        correlation: str = "global",
        groupby: str | None = None,
        dropout_layer: str | None = None,
        dropout_model: str = "zinb",
        preset: str = "default",
        cluster_kwargs: dict | None = None,
        dropout_kwargs: dict | None = None,
        n_dropout_cells: int | None = DROPOUT_CELLS,
        n_train_cells: int | None = TRAIN_CELLS,
        rng: RNGLike = None,
        **moved,
    ):
        if moved:  # a flat name of earlier releases (e.g. n_epochs): say where it went
            err = moved_params_error(type(self), moved)
            if err is None:
                name = next(iter(moved))
                msg = f"{type(self).__name__}.__init__() got an unexpected keyword argument {name!r}"
                err = TypeError(msg)
            raise err
        self.module = module
        self.train = train
        self.targets = targets
        self.threshold = threshold
        self.log = log
        self.correlation = correlation
        self.groupby = groupby
        self.dropout_layer = dropout_layer
        self.dropout_model = dropout_model
        self.preset = preset
        self.cluster_kwargs = cluster_kwargs
        self.dropout_kwargs = dropout_kwargs
        self.n_dropout_cells = n_dropout_cells
        self.n_train_cells = n_train_cells
        self.rng = rng

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_fit_counts", None)  # a weak reference (a cache key) is not picklable
        return state

    # ------------------------------------------------------------------ checks and inputs
    def _config(self, name: str):
        """The ``name`` config (``module``, ``train`` or ``targets``), resolved against the
        preset (:func:`screpair.methods._torch.resolve_config`)."""
        if self.preset not in PRESETS:
            msg = f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}."
            raise ValueError(msg)
        default = PRESETS[self.preset][name]
        return resolve_config(self._configs[name], getattr(self, name), name=name, default=default)

    def _check_params(self) -> None:
        module, train, targets = (self._config(name) for name in self._configs)
        if module.pooling not in ("max", "average"):
            msg = f"module.pooling must be 'max' or 'average', got {module.pooling!r}."
            raise ValueError(msg)
        if not 0.0 <= float(targets.min_frac_cells) <= 1.0:
            msg = f"targets.min_frac_cells must be in [0, 1], got {targets.min_frac_cells!r}."
            raise ValueError(msg)
        if int(train.warmup_epochs) < 0:
            msg = (
                "train.warmup_epochs must be a non-negative integer, got "
                f"{train.warmup_epochs!r}."
            )
            raise ValueError(msg)
        if not 0.0 <= float(train.min_delta) < 1.0:
            msg = f"train.min_delta must be in [0, 1), got {train.min_delta!r}."
            raise ValueError(msg)
        if self.correlation not in ("global", "cluster"):
            msg = f"correlation must be 'global' or 'cluster', got {self.correlation!r}."
            raise ValueError(msg)
        if self.dropout_model not in ("zinb", "scimpute"):
            msg = f"dropout_model must be 'zinb' or 'scimpute', got {self.dropout_model!r}."
            raise ValueError(msg)
        if not 0.0 <= self.threshold < 1.0:
            msg = f"threshold must be in [0, 1), got {self.threshold!r}."
            raise ValueError(msg)
        positive = [(f"targets.{k}", getattr(targets, k))
                    for k in ("subset_size", "min_subsets", "n_top", "n_ensemble")]
        positive += [(f"train.{k}", getattr(train, k)) for k in ("batch_size", "n_epochs")]
        for name, value in positive:
            if int(value) < 1:
                msg = f"{name} must be a positive integer, got {value!r}."
                raise ValueError(msg)
        for name in ("n_dropout_cells", "n_train_cells"):
            check_sample_size(name, getattr(self, name))

    def _normalized(self, x, lib: np.ndarray):
        """``log1p(CPM)`` (``log=False``: CPM) of the counts ``x`` in float32, the network's
        scale (the scaling in float64, :mod:`screpair._norm`); CSR stays CSR."""
        if self.log:
            return _norm.log_normalize(x, _norm.CPM, lib, dtype=np.float32)
        return _norm.normalize(x, _norm.CPM, lib).astype(np.float32)

    def _to_counts(self, values: np.ndarray, lib: np.ndarray) -> np.ndarray:
        """Predictions (1-D, on the network's scale) back on the count scale of the library
        sizes ``lib`` (one per value), clipped at 0 (:func:`screpair._norm.to_counts`)."""
        v = values[:, None]
        if self.log:
            return _norm.to_counts(v, lib, _norm.CPM)[:, 0]
        return _norm.unnormalize(np.maximum(v, 0.0), lib, _norm.CPM)[:, 0]

    def _obs_labels(self, ctx: DataContext) -> np.ndarray | None:
        if self.groupby is None:
            return None
        if self.groupby not in ctx.obs:
            msg = f"groupby={self.groupby!r} must name a column of adata.obs."
            raise KeyError(msg)
        return np.asarray(ctx.obs[self.groupby].astype(str))

    def _layer_prob(self, x, ctx: DataContext) -> sp.csr_matrix:
        """The dropout probabilities of ``layers[dropout_layer]`` for the rows ``ctx.rows``."""
        if self.dropout_layer not in ctx.layers:
            msg = f"dropout_layer={self.dropout_layer!r} must name a layer of the AnnData input."
            raise KeyError(msg)
        layer = ctx.layers[self.dropout_layer]
        if layer.shape[0] == ctx.n_obs and x.shape[0] != ctx.n_obs:
            layer = layer[ctx.rows]
        prob = sp.csr_matrix(layer, dtype=np.float64)
        if prob.shape != x.shape:
            msg = f"layer {self.dropout_layer!r} has shape {prob.shape}, counts have {x.shape}."
            raise ValueError(msg)
        return prob

    def _dropout_model(self, rng: np.random.Generator):
        from ...dropout import DropoutModel

        return DropoutModel(model=self.dropout_model, n_fit_cells=self.n_dropout_cells,
                            cluster_kwargs=self.cluster_kwargs, fit_kwargs=self.dropout_kwargs,
                            rng=rng)

    def _dropout(
        self, x, ctx: DataContext, rng: np.random.Generator | None = None
    ) -> tuple[sp.csr_matrix, np.ndarray | None]:
        """Dropout probabilities (CSR, zero at observed non-zeros) and cluster labels of the
        rows ``x`` (``ctx.rows`` of the data).

        ``rng`` given (``fit``): fit the dropout model on ``x`` (``dropout_model_``); when it
        was fitted on a sample, the probabilities are ``None`` (``_fit`` takes them by blocks).
        Else from the fitted dropout model, or, for a model saved without one, from a dropout
        model refitted on ``x`` from ``posterior_seed_``.
        """
        labels = self._obs_labels(ctx)
        if labels is not None and labels.shape[0] != x.shape[0]:
            labels = labels[ctx.rows]
        if self.dropout_layer is not None:
            prob = self._layer_prob(x, ctx)
            if rng is not None:
                self.dropout_model_ = None
        elif rng is not None or getattr(self, "dropout_model_", None) is None:
            dm = self._dropout_model(as_rng(self.posterior_seed_) if rng is None else rng)
            dm.fit(x, labels=labels)
            if rng is not None:
                self.dropout_model_ = dm
            if dm.prob_ is not None:  # all cells fitted: the fit's probabilities
                prob, labels = dm.prob_, dm.labels_
            elif rng is not None:  # fitted on a sample: _fit takes the probabilities by blocks
                return None, np.asarray(dm.labels_).astype(str)
            else:
                prob, labels = dm.probabilities(x, rows=ctx.rows, labels=labels)
        else:
            with log_task(f"dropout probabilities ({self.dropout_model}) of {x.shape[0]} cells",
                          logger):
                prob, labels = self.dropout_model_.probabilities(x, rows=ctx.rows, labels=labels)
        return _at_zeros(prob, x), (None if labels is None else np.asarray(labels).astype(str))

    def _missing_by_blocks(self, x, ctx: DataContext, block: int = 1024) -> sp.csr_matrix:
        """The missing mask of ``x`` from the fitted dropout model, by blocks of cells (their
        probabilities are not all held at once)."""
        parts = []
        for a in range(0, x.shape[0], block):
            rows = slice(a, min(a + block, x.shape[0]))
            prob, _ = self._dropout(x[rows], replace(ctx, rows=rows))
            parts.append(self._missing(prob))
        return sp.csr_matrix(sp.vstack(parts, format="csr"), dtype=bool)

    def _missing_of_rows(self, x, rows: np.ndarray,
                         block: int = 1024) -> tuple[sp.csr_matrix, np.ndarray]:
        """The missing mask and cluster labels of the cells ``x`` at positions ``rows`` of the
        data (fitted cells keep their fitted cluster) from the fitted dropout model, by blocks
        of cells, as :meth:`_missing_by_blocks` takes them for consecutive rows."""
        parts, labels = [], []
        for a in range(0, x.shape[0], block):
            b = min(a + block, x.shape[0])
            xb = x[a:b]
            prob, lab = self.dropout_model_.probabilities(xb, rows=rows[a:b])
            parts.append(self._missing(_at_zeros(prob, xb)))
            labels.append(np.asarray(lab).astype(str))
        return (sp.csr_matrix(sp.vstack(parts, format="csr"), dtype=bool),
                np.concatenate(labels))

    def _missing(self, prob: sp.csr_matrix) -> sp.csr_matrix:
        m = sp.csr_matrix(prob > self.threshold)
        m.eliminate_zeros()
        return m

    # ------------------------------------------------------------------ fit
    def _plan(self, rng: np.random.Generator,
              n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The sorted rows of the dropout model's sample and of the networks' training sample
        of ``n`` cells, drawn from ``rng`` (the fit's generator) as :meth:`_fit` draws them,
        ``rng`` advanced as the fit advances it up to the training sample (the clustering's
        draws included); ``None`` when the fit reads every cell: ``n`` is not above both
        ``n_dropout_cells`` and ``n_train_cells``, or the probabilities come from
        ``dropout_layer`` or the dropout model is stratified by ``groupby`` labels."""
        if self.dropout_layer is not None or self.groupby is not None:
            return None
        if self.n_train_cells is None or n <= int(self.n_train_cells):
            return None
        drop = self._dropout_model(rng).draw(rng, n)
        if drop is None:
            return None
        return drop, np.sort(rng.choice(n, size=int(self.n_train_cells), replace=False))

    def _fit_rows(self, n: int) -> np.ndarray | None:
        """The union of the dropout model's and the training sample of ``n`` cells
        (:meth:`_plan`, from a copy of ``rng``), or ``None``: every cell. Only these rows are
        fitted on (:func:`screpair.impute_file` reads only them); the networks' training, the
        targets, input genes and output biases come from the training sample, the clustering
        and the dropout parameters from the dropout model's, as they did from all cells."""
        gen = copy.deepcopy(self.rng) if isinstance(self.rng, np.random.Generator) else self.rng
        plan = self._plan(as_rng(fit_seed(gen)), n)
        return None if plan is None else np.union1d(*plan)

    def _why_every_row(self, n: int) -> str:
        if self.groupby is not None:
            return ("its dropout model's sample is stratified by the groupby labels of every "
                    "cell")
        return (f"{n} cells are not more than both n_dropout_cells={self.n_dropout_cells} and "
                f"n_train_cells={self.n_train_cells}")

    def _fit_sample(self, x, ctx: DataContext, rng: np.random.Generator):
        """The dropout model and the training cells' normalized counts, missing mask and
        cluster labels when ``x`` holds only the rows ``ctx.sample`` (:meth:`_fit_rows`):
        the dropout model fitted on its sample's rows (the other cells are assigned when their
        probabilities are computed, the same vote), the training sample's missing entries and
        labels from it; ``rng`` advanced as the fit on all cells advances it."""
        n, sample = ctx.n_obs, np.asarray(ctx.sample)
        plan = self._plan(copy.deepcopy(rng), n)
        if plan is None:
            msg = f"cnn: the fit got a sample of {sample.size} rows but takes none of {n} cells."
            raise ValueError(msg)
        drop, cells = plan
        if not (np.isin(drop, sample).all() and np.isin(cells, sample).all()):
            # rng=None: _fit_rows drew from other entropy; both samples from the rows given
            gen = np.random.default_rng(self.posterior_seed_)
            drop = np.sort(gen.choice(sample, size=drop.size, replace=False))
            cells = np.sort(gen.choice(sample, size=cells.size, replace=False))
        dm = self._dropout_model(rng)
        dm.fit(take_rows(x, np.searchsorted(sample, drop)), rows=drop, n_obs=n)
        self.dropout_model_ = dm
        rng.choice(n, size=cells.size, replace=False)  # the training sample's draw: rng moves on
        logger.info("cnn: training on %d of %d cells (n_train_cells), the dropout model "
                    "fitted on %d (n_dropout_cells): %d rows read", cells.size, n, drop.size,
                    sample.size)
        xt = take_rows(x, np.searchsorted(sample, cells))
        missing, labels = self._missing_of_rows(xt, cells)
        self.dropout_prob_, self.labels_, self._fit_counts = None, None, None
        self.train_cells_ = cells
        return self._normalized(xt, _norm.library_size(xt)), missing, labels

    def _fit(self, x, ctx: DataContext) -> None:
        """Fit the dropout model, choose targets and inputs, and train the subset networks on
        the validated counts ``x`` (``fit(data, layer=...)``: AnnData with raw counts in ``X``
        or ``layers[layer]``, or a cells x genes count matrix); ``x`` holds only the rows
        ``ctx.sample`` when :meth:`_fit_rows` asked for them (:meth:`_fit_sample`)."""
        torch = import_torch()
        train = self._config("train")
        # one integer seed stands for `rng`; the dropout model (re)fitted at transform time
        # starts a fresh generator from it, so it is the same on every call and after load
        self.posterior_seed_ = fit_seed(self.rng)
        rng = as_rng(self.posterior_seed_)
        n_genes = x.shape[1]
        if ctx.sample is not None:
            xlog, missing, labels = self._fit_sample(x, ctx, rng)
        else:
            xlog, missing, labels = self._fit_all(x, ctx, rng)
        n_cells = xlog.shape[0]

        with log_task("selecting targets and input genes", logger):
            self.groups_, self.clusters_ = self._select(xlog, missing, labels, rng)
        if not self.groups_:
            logger.info(
                "cnn: no entry has dropout probability > %g; nothing to impute", self.threshold
            )
        self._build_index(n_genes)
        self.device_ = resolve_device(train.device)
        self.module_ = self._make_module(torch_seed(rng))
        if not self.groups_:
            self.history_ = pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "seconds"])
            return
        train_idx, val_idx = split_cells(n_cells, train.val_frac, rng)
        gen = torch.Generator(self.device_).manual_seed(torch_seed(rng))
        self.module_.generator = gen
        cell_cluster = self._cell_cluster(labels, n_cells)
        self._init_output_bias(xlog, missing, cell_cluster, train_idx)
        used = self._used_columns(xlog, missing)  # batches read only these genes
        del xlog, missing

        def loss_fn(rows: np.ndarray, training: bool) -> LossOutput:
            xin, y, mask = self._batch(used, cell_cluster, rows)
            pred = self.module_(xin)
            se = (pred - y) ** 2 * mask
            return LossOutput(loss=se.sum() / mask.sum().clamp_min(1.0))

        with log_task(f"training {len(self.groups_)} subset CNN(s)", logger):
            self.history_ = train_loop(
                self.module_, loss_fn, train_idx, val_idx, train, rng, desc="cnn"
            )
        self.module_.generator = None

    def _fit_all(self, x, ctx: DataContext, rng: np.random.Generator):
        """The dropout model fitted on ``x`` (every cell; a sample of them above
        ``n_dropout_cells``), then the training cells' normalized counts, missing mask and
        labels (a sample above ``n_train_cells``)."""
        n_cells = x.shape[0]
        lib = _norm.library_size(x)
        xlog = self._normalized(x, lib)
        prob, labels = self._dropout(x, ctx, rng)
        missing = self._missing(prob) if prob is not None else self._missing_by_blocks(x, ctx)
        self.dropout_prob_, self.labels_ = prob, labels
        # a cache key, not a fingerprint: `posterior` reuses these probabilities only for this
        # very matrix object (impute and fit_transform pass the one they validated); other
        # input gets them from the fitted dropout model (the fitted rows keep their clusters:
        # the same values)
        self._fit_counts = weakref.ref(x)
        self.train_cells_ = None
        if self.n_train_cells is not None and n_cells > int(self.n_train_cells):
            # networks, targets and inputs learned from a random sample of the cells
            cells = np.sort(rng.choice(n_cells, size=int(self.n_train_cells), replace=False))
            logger.info("cnn: training on %d of %d cells (n_train_cells)", cells.size, n_cells)
            self.train_cells_ = cells
            xlog, missing = xlog[cells], missing[cells]
            labels = None if labels is None else labels[cells]
        return xlog, missing, labels

    def _select(self, xlog, missing: sp.csr_matrix, labels, rng) -> tuple[list[Group], list[str]]:
        cfg = self._config("targets")
        groups: list[Group] = []
        n = xlog.shape[0]
        if self.correlation == "cluster":
            if labels is None:
                msg = "correlation='cluster' needs cluster labels (from the dropout model or groupby)."
                raise ValueError(msg)
            clusters = sorted(set(labels))
            parts = [(i, np.flatnonzero(labels == c)) for i, c in enumerate(clusters)]
        else:
            clusters, parts = [], [(-1, None)]
        kw = dict(
            subset_size=cfg.subset_size,
            min_subsets=cfg.min_subsets,
            n_top=cfg.n_top,
            max_missing_frac=cfg.max_missing_frac,
        )
        for cid, cells in parts:
            sub_missing = missing if cells is None else missing[cells]
            n_sub = n if cells is None else len(cells)
            counts = np.bincount(sp.csr_matrix(sub_missing).indices, minlength=xlog.shape[1])
            keep = counts > 0
            if cfg.min_frac_cells > 0:  # rarely detected genes: their correlations are noise
                sub = xlog if cells is None else xlog[cells]
                detected = np.asarray((sub != 0).sum(0)).ravel()
                keep &= detected >= cfg.min_frac_cells * n_sub
            targets = np.flatnonzero(keep)
            if not len(targets):
                continue
            frac = counts / max(n_sub, 1)
            for rep in range(int(cfg.n_ensemble)):
                groups += build_groups(
                    xlog,
                    frac,
                    targets,
                    cells=cells,
                    cluster=cid,
                    rng=None if rep == 0 else rng,
                    **kw,
                )
        return groups, clusters

    def _init_output_bias(self, xlog, missing, cell_cluster, train_idx) -> None:
        """Start each output at its target's mean observed value over the training cells.

        With the paper's learning rate (1e-4) a zero-initialised output bias needs hundreds of
        epochs to reach log1p(CPM) values of 5-10; starting from the per-gene mean (the best
        constant predictor under the masked loss) lets the network spend its epochs on the
        cell-to-cell variation. Computed from training cells only.
        """
        torch = import_torch()
        n_genes = xlog.shape[1]
        means = np.zeros((len(self.groups_), self.target_index_.shape[1]))
        for cid in np.unique(self.group_cluster_):
            cells = train_idx if cid < 0 else train_idx[cell_cluster[train_idx] == cid]
            if not len(cells):
                continue
            tot = np.asarray(xlog[cells].sum(0), dtype=np.float64).ravel()
            n_obs = len(cells) - np.asarray(missing[cells].sum(0)).ravel()
            mu = np.append(np.divide(tot, n_obs, out=np.zeros(n_genes), where=n_obs > 0), 0.0)
            rows = self.group_cluster_ == cid
            means[rows] = mu[self.target_index_[rows]]
        with torch.no_grad():
            self.module_.b2.copy_(torch.as_tensor(means[:, None, :], dtype=self.module_.b2.dtype))

    def _build_index(self, n_genes: int) -> None:
        """Padded index arrays: inputs (G x I) and targets (G x O); padding points at column
        ``n_genes`` (a zero column for inputs; masked out of the loss for targets)."""
        g = len(self.groups_)
        n_in = max([_MIN_INPUTS, *(len(gr.inputs) for gr in self.groups_)])
        n_out = max([1, *(len(gr.targets) for gr in self.groups_)])
        inputs = np.full((g, n_in), n_genes, dtype=np.int64)
        targets = np.full((g, n_out), n_genes, dtype=np.int64)
        for i, gr in enumerate(self.groups_):
            inputs[i, : len(gr.inputs)] = gr.inputs
            targets[i, : len(gr.targets)] = gr.targets
        self.input_index_, self.target_index_ = inputs, targets
        self.group_cluster_ = np.array([gr.cluster for gr in self.groups_], dtype=np.int64)

    def _make_module(self, seed: int):
        torch = import_torch()
        from ._module import GroupedCNN

        g, n_in = self.input_index_.shape
        # layer constructors draw default inits from torch's global RNG: keep it untouched (all
        # weights are then re-drawn from our own generator)
        with torch.random.fork_rng(devices=[]):
            module = self._new_module(GroupedCNN, g, n_in)
        module.reset_parameters(torch.Generator().manual_seed(seed))
        return module.to(self.device_ if hasattr(self, "device_") else "cpu")

    def _new_module(self, cls, g: int, n_in: int):
        cfg = self._config("module")
        return cls(
            max(g, 1),
            n_in,
            self.target_index_.shape[1],
            n_filters=cfg.n_filters,
            kernel_size=cfg.kernel_size,
            n_hidden=cfg.n_hidden,
            dropout=cfg.dropout,
            pooling=cfg.pooling,
        )

    def _cell_cluster(self, labels, n_cells: int) -> np.ndarray:
        if self.correlation != "cluster":
            return np.full(n_cells, -1, dtype=np.int64)
        lookup = {c: i for i, c in enumerate(self.clusters_)}
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            msg = (
                f"cluster label(s) {unknown[:3]} were not seen in fit; with correlation='cluster' "
                "transform needs the fitted cells or `groupby` labels from the fitted clusters."
            )
            raise ValueError(msg)
        return np.array([lookup[c] for c in labels], dtype=np.int64)

    def _used_columns(self, xlog, missing) -> _Used:
        """``xlog`` and ``missing`` restricted to the genes the networks read or predict, and
        the input / target index arrays into those columns (padding: one past the last)."""
        n_genes = xlog.shape[1]
        both = np.concatenate([self.input_index_.ravel(), self.target_index_.ravel()])
        cols = np.unique(both[both < n_genes])
        pos = np.append(cols, n_genes)  # sorted: padding (n_genes) maps to len(cols)
        return _Used(xlog[:, cols], missing[:, cols], np.searchsorted(pos, self.input_index_),
                     np.searchsorted(pos, self.target_index_))

    def _batch(self, used: _Used, cell_cluster, rows):
        """Inputs (B, G, I), targets (B, G, O) and loss mask (B, G, O) for cells ``rows``: one
        dense batch of the used genes only (:meth:`_used_columns`)."""
        torch = import_torch()
        dev = self.device_
        xb = dense_rows(used.x, rows, dev)
        xb = torch.cat([xb, xb.new_zeros(len(rows), 1)], dim=1)
        mb = dense_rows(used.missing, rows, dev, dtype=torch.bool)
        mb = torch.cat([mb, mb.new_ones(len(rows), 1)], dim=1)  # padding column counts as missing
        in_idx = torch.as_tensor(used.inputs, device=dev)
        tg_idx = torch.as_tensor(used.targets, device=dev)
        xin = xb[:, in_idx]
        y = xb[:, tg_idx]
        mask = ~mb[:, tg_idx]
        if self.correlation == "cluster":
            own = (
                torch.as_tensor(cell_cluster[rows], device=dev)[:, None]
                == torch.as_tensor(self.group_cluster_, device=dev)[None, :]
            )
            mask = mask & own[:, :, None]
        return xin, y, mask.to(xin.dtype)

    # ------------------------------------------------------------------ predict
    def _predict_missing(self, xlog, missing, cell_cluster) -> np.ndarray:
        """Mean prediction (normalized scale) of every gene of every cell; ``nan`` where no
        subset network predicts that entry."""
        torch = import_torch()
        n_cells, n_genes = xlog.shape
        out = np.full((n_cells, n_genes), np.nan, dtype=np.float64)
        if not self.groups_:
            return out
        self.module_.eval()
        dev = self.device_
        tg_idx = torch.as_tensor(self.target_index_, device=dev)
        used = self._used_columns(xlog, missing)
        with torch.inference_mode(), heap_reuse():
            batch = max(self._config("train").batch_size, 256)
            for rows in row_batches(np.arange(n_cells), batch):
                xin, _, _ = self._batch(used, cell_cluster, rows)
                pred = self.module_(xin)  # (B, G, O)
                valid = (tg_idx < n_genes)[None].expand_as(pred)
                if self.correlation == "cluster":
                    own = (
                        torch.as_tensor(cell_cluster[rows], device=dev)[:, None]
                        == torch.as_tensor(self.group_cluster_, device=dev)[None, :]
                    )
                    valid = valid & own[:, :, None]
                w = valid.to(torch.float64)
                idx = tg_idx[None].expand_as(pred).reshape(len(rows), -1)
                tot = torch.zeros(len(rows), n_genes + 1, dtype=torch.float64, device=dev)
                cnt = torch.zeros_like(tot)
                tot.scatter_add_(1, idx, (pred.to(torch.float64) * w).reshape(len(rows), -1))
                cnt.scatter_add_(1, idx, w.reshape(len(rows), -1))
                mean = (tot / cnt)[:, :n_genes]
                out[rows] = mean.cpu().numpy()
        return out


    def _posterior(self, x, ctx: DataContext) -> Posterior:
        """Imputed counts: predictions at the missing entries, the input everywhere else.

        ``posterior(data, layer=...)`` takes cells x genes counts with the genes of the fitted
        model (same order).

        Returns
        -------
        :class:`~screpair.methods.Posterior` with ``mean`` (dense float64, count scale) and
        ``dropout_prob`` (CSR).
        """
        lib = _norm.library_size(x)
        xlog = self._normalized(x, lib)
        fitted = getattr(self, "_fit_counts", None)
        if (self.dropout_layer is None and self.dropout_prob_ is not None and fitted is not None
                and fitted() is x):
            prob, labels = self.dropout_prob_, self.labels_  # the fit's, for the same matrix
        else:
            prob, labels = self._dropout(x, ctx)
        missing = self._missing(prob)
        cell_cluster = (
            self._cell_cluster(labels, x.shape[0])
            if self.correlation == "cluster"
            else (np.full(x.shape[0], -1, dtype=np.int64))
        )
        with log_task("predicting missing entries", logger):
            pred = self._predict_missing(xlog, missing, cell_cluster)
        mean = x.toarray() if sp.issparse(x) else np.array(x, dtype=np.float64)
        m = missing.tocoo()
        vals = pred[m.row, m.col]
        ok = np.isfinite(vals)
        r, c = m.row[ok], m.col[ok]
        mean[r, c] = self._to_counts(vals[ok], lib[r])
        return Posterior(mean=mean, dropout_prob=prob)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (parameters, genes, seed, history) and ``weights.pt`` (network,
        subsets, ``train_cells_``) into directory ``path``, atomically
        (:func:`screpair.methods._torch.save_model`).

        The configs are saved resolved, every field explicit (a later change of the defaults
        or the presets does not change what a saved model computes), ``None`` as null, nested
        configs as nested objects (:func:`screpair.methods._torch.params_json`). A ``Generator``
        ``rng`` is saved as null: ``posterior_seed_`` carries the fitted model's randomness, so
        the loaded model's output is bit-identical (on the same device).
        """
        self._check_fitted("module_")
        torch = import_torch()

        state = {k: v.detach().cpu() for k, v in self.module_.state_dict().items()}
        state["_index.inputs"] = torch.as_tensor(self.input_index_)
        state["_index.targets"] = torch.as_tensor(self.target_index_)
        state["_index.cluster"] = torch.as_tensor(self.group_cluster_)
        state.update(rows_entry("_index.train_cells", self.train_cells_))
        dropout = None
        if getattr(self, "dropout_model_", None) is not None:
            dropout, arrays = self.dropout_model_.state()
            state.update({f"_dropout.{k}": torch.as_tensor(v) for k, v in arrays.items()})
        save_model(
            path,
            config=params_json(self),
            state_dict=state,
            var_names=self.var_names_,
            extra={
                "class": type(self).__name__,
                "posterior_seed": int(self.posterior_seed_),
                "clusters": [str(c) for c in self.clusters_],
                "history": json_config(self.history_.to_dict(orient="list"), where="history"),
                "dropout": None if dropout is None else json_config(dropout, where="dropout"),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> CNNImputer:
        """Load a model written by :meth:`save` (``device`` overrides the saved
        ``train.device``).

        The saved parameters go through the same checks as in ``fit`` (names, types, ranges;
        nested configs resolved as a dict of settings is), the weights are checked against
        them, and a model saved by a newer screpair is refused: each problem is a one-line
        ``ValueError`` naming the file. Models saved by earlier releases, with flat parameters
        (``n_epochs``, ``pooling``, ...) and without a preset (then the paper's), load into the
        nested configs and compute what they did.
        """
        meta, state = load_model(path)
        cfg_file, wts_file = Path(path) / "config.json", Path(path) / "weights.pt"
        extra = meta.get("extra", {})
        if extra.get("class", cls.__name__) != cls.__name__:
            what = f"it holds a {extra['class']!r} model, not a {cls.__name__}"
            raise model_error(cfg_file, what)
        est = saved_estimator(
            cls, meta, cfg_file, train=None if device is None else {"device": device}
        )
        est.var_names_ = pd.Index(meta["var_names"])
        n_genes = len(est.var_names_)
        inputs = tensor_entry(state, "_index.inputs", wts_file, shape=(None, None))
        targets = tensor_entry(state, "_index.targets", wts_file, shape=(len(inputs), None))
        cluster = tensor_entry(state, "_index.cluster", wts_file, shape=(len(inputs),))
        train_cells = saved_rows(state, "_index.train_cells", wts_file)
        clusters = extra.get("clusters", [])
        if not isinstance(clusters, list) or not all(isinstance(c, str) for c in clusters):
            raise model_error(cfg_file, "'extra.clusters' must be a list of cluster labels")
        for key, idx, hi in (
            ("_index.inputs", inputs, n_genes),
            ("_index.targets", targets, n_genes),
            ("_index.cluster", cluster, len(clusters) - 1),
        ):
            lo = -1 if key == "_index.cluster" else 0
            if idx.dtype.kind not in "iu" or (idx.size and not lo <= idx.min() <= idx.max() <= hi):
                what = f"the {n_genes} genes" if hi == n_genes else f"the {len(clusters)} clusters"
                raise model_error(wts_file, f"tensor {key!r} points outside {what} of config.json")
        dropout = {k.removeprefix("_dropout."): v.numpy() for k, v in state.items()
                   if k.startswith("_dropout.")}
        state = {k: v for k, v in state.items() if not k.startswith(("_index.", "_dropout."))}
        est.input_index_ = inputs.astype(np.int64)
        est.target_index_ = targets.astype(np.int64)
        est.group_cluster_ = cluster.astype(np.int64)
        est.groups_ = [
            Group(targets=t[t < n_genes], inputs=i[i < n_genes], cluster=int(c))
            for i, t, c in zip(est.input_index_, est.target_index_, est.group_cluster_, strict=True)
        ]
        est.clusters_ = list(clusters)
        try:
            est.history_ = pd.DataFrame(extra.get("history", {}))
        except (ValueError, TypeError) as e:
            raise model_error(cfg_file, f"'extra.history' is not a table ({e})") from None
        est.posterior_seed_ = saved_seed(extra, est.rng, cfg_file)
        est.device_ = resolve_device(est._config("train").device)
        est.module_ = est._make_module(0)
        load_state(est.module_, state, wts_file)
        est.module_.eval()
        est._fit_counts = None
        est.dropout_prob_, est.labels_ = None, None
        est.train_cells_ = train_cells
        est.dropout_model_ = None  # saved without one (earlier releases): refitted on the data
        if extra.get("dropout") is not None:
            from ...dropout import DropoutModel

            try:
                est.dropout_model_ = DropoutModel.from_state(extra["dropout"], dropout)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise model_error(wts_file, f"the dropout model does not load ({e!r})") from None
        return est
