"""``genes=``: the genes whose imputed values an imputation returns.

A specification is checked against the genes before any work (:func:`check_genes`) and turned
into a boolean mask over the data set's genes, in their order (:func:`select_genes`):

- ``"hvg:N"``: the ``N`` most highly variable genes by dispersion
  (:func:`screpair.pp.hvg_dispersion`, on all cells' counts; from a streaming pass for files);
- the name of a boolean ``var`` column (e.g. ``"highly_variable"``);
- a gene name, or a list of gene names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import pp
from .._chunks import GeneStats

HVG_PREFIX = "hvg:"


@dataclass(frozen=True)
class GeneSpec:
    """A parsed ``genes=`` value: ``n_top`` (``hvg:N``), or ``names`` / ``column``, resolved by
    :func:`check_genes`. ``text`` is what the user gave, for the record in ``uns``."""

    text: str
    n_top: int | None = None
    names: tuple[str, ...] = ()
    column: str | None = None


def parse_genes(genes) -> GeneSpec | None:
    """Check the form of ``genes`` (no data needed); ``None`` stays ``None`` (all genes)."""
    if genes is None:
        return None
    if isinstance(genes, str):
        text = genes.strip()
        if text.lower().startswith(HVG_PREFIX):
            n = text[len(HVG_PREFIX):].strip()
            if not n.isdigit() or int(n) < 1:
                msg = f"genes={genes!r}: 'hvg:N' takes a positive number of genes, e.g. 'hvg:2000'."
                raise ValueError(msg)
            return GeneSpec(text=text, n_top=int(n))
        if not text:
            msg = "genes must be 'hvg:N', a boolean var column, a gene name or a list of names."
            raise ValueError(msg)
        return GeneSpec(text=text, names=(text,))  # a column or a gene: decided by check_genes
    if isinstance(genes, (Sequence, np.ndarray, pd.Index)) and not isinstance(genes, bytes):
        names = tuple(str(g) for g in genes)
        if not names:
            msg = "genes= is an empty list; give at least one gene name (or None for all genes)."
            raise ValueError(msg)
        if not all(isinstance(g, str) for g in genes):
            msg = "genes= as a list takes gene names (strings)."
            raise TypeError(msg)
        return GeneSpec(text=",".join(names), names=names)
    msg = (f"genes must be 'hvg:N', a boolean var column, a gene name or a list of names, got "
           f"{type(genes).__name__}.")
    raise TypeError(msg)


def check_genes(spec: GeneSpec | None, var: pd.DataFrame, var_names: pd.Index) -> GeneSpec | None:
    """Resolve ``spec`` against the genes (``var`` indexed by any names, ``var_names`` the
    gene names): one error naming what is unknown, before any work."""
    if spec is None or spec.n_top is not None:
        return spec
    if len(spec.names) == 1 and spec.names[0] in var.columns:
        col = spec.names[0]
        values = var[col]
        if values.dtype != bool:
            msg = (f"genes={col!r}: var[{col!r}] must be a boolean column (True for the genes to "
                   f"return), it holds {values.dtype}.")
            raise ValueError(msg)
        if not values.any():
            msg = f"genes={col!r}: var[{col!r}] selects no gene."
            raise ValueError(msg)
        return GeneSpec(text=spec.text, column=col)
    missing = [g for g in spec.names if g not in set(var_names)]
    if missing:
        bools = [c for c in var.columns if var[c].dtype == bool]
        cols = f"; boolean var columns: {', '.join(map(repr, bools))}" if bools else ""
        what = (f"{len(missing)} of {len(spec.names)} gene names are not in var_names "
                f"(e.g. {missing[:3]})" if len(spec.names) > 1
                else f"{missing[0]!r} is not a gene name or a var column")
        msg = f"genes: {what}{cols}; or use 'hvg:N' for the N most variable genes."
        raise KeyError(msg)
    return spec


def select_genes(spec: GeneSpec | None, var: pd.DataFrame, var_names: pd.Index,
                 stats: Callable[[], GeneStats]) -> np.ndarray:
    """The boolean mask of the chosen genes (all genes for ``None``); ``stats`` gives the
    streaming pass for ``hvg:N`` (called only then)."""
    n = len(var_names)
    spec = check_genes(spec, var, var_names)
    if spec is None:
        return np.ones(n, dtype=bool)
    if spec.n_top is not None:
        st = stats()
        hv = pp.hvg_from_moments(st.mean, st.mean_sq, st.n_obs, spec.n_top)
        return hv["highly_variable"].to_numpy(dtype=bool)
    if spec.column is not None:
        return var[spec.column].to_numpy(dtype=bool)
    return np.asarray(var_names.isin(spec.names))
