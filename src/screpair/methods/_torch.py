"""Shared torch plumbing for the neural methods: lazy import, device choice, a plain training loop
with early stopping, minibatches of sparse rows, and save/load with gene-name checks.

torch is imported only inside these functions, so ``import screpair`` never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)


def import_torch():
    """Import torch with an actionable message when it is missing."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a core dependency
        e.add_note(
            "screpair's neural methods need torch: `pip install torch` (CPU build is enough)."
        )
        raise
    return torch


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda, then mps, then cpu; anything else is passed to ``torch.device``."""
    torch = import_torch()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'."
        raise ValueError(msg)
    return dev


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training settings shared by the neural methods.

    Attributes
    ----------
    n_epochs
        Maximum number of passes over the training cells.
    batch_size
        Cells per minibatch.
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay.
    patience
        Early stopping: epochs without validation improvement before stopping (the best
        weights are restored). ``0`` disables early stopping.
    val_frac
        Fraction of cells held out for validation.
    device
        ``"auto"`` (GPU when present), ``"cpu"``, ``"cuda"``, ...
    progress
        Show a tqdm bar over epochs.
    max_seconds
        Optional wall-clock budget: training stops after the epoch that exceeds it (the best
        weights are restored as for early stopping). ``None`` means no limit.
    """

    n_epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    val_frac: float = 0.1
    device: str = "auto"
    progress: bool = True
    max_seconds: float | None = None


def split_cells(n: int, val_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``n`` cells (validation empty when too few cells)."""
    perm = rng.permutation(n)
    n_val = int(round(n * val_frac)) if n >= 10 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def row_batches(
    idx: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Index batches over ``idx``; shuffled when ``rng`` is given."""
    order = idx if rng is None else rng.permutation(idx)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def dense_rows(x, rows: np.ndarray, device, dtype=None) -> torch.Tensor:
    """Rows of a CSR/ndarray matrix as a dense float tensor (densifies one batch only)."""
    torch = import_torch()
    block = x[rows]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return torch.as_tensor(block, dtype=dtype or torch.float32, device=device)


@contextlib.contextmanager
def heap_reuse() -> Iterator[None]:
    """Let glibc reuse freed large buffers instead of returning them to the OS (Linux only).

    Training allocates and frees the same large tensors (weight gradients of hundreds of MB,
    activations) at every step. glibc serves every allocation above 32 MB with a fresh ``mmap``
    whose pages the kernel zero-fills on first touch, and ``munmap``s it on free: on a 2-core
    CPU this page-fault traffic took 25-45% of a cnnImpute step. Inside this context freed
    memory stays in the heap and is reused (``M_MMAP_MAX=0``, a 1 GiB trim threshold); on exit
    the thresholds go back to glibc's usual values (32 MB mmap threshold) and the cached memory is
    released with ``malloc_trim``. A no-op outside glibc or with the environment variable
    ``SCREPAIR_HEAP_REUSE=0``. The setting is process-wide while it lasts, so other threads of the
    process also keep their freed memory until training ends.
    """
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    if libc is None or os.environ.get("SCREPAIR_HEAP_REUSE", "1") == "0":
        yield
        return
    m_trim, m_mmap_threshold, m_mmap_max = -1, -3, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim, 64 << 20)
        libc.mallopt(m_mmap_max, 65536)
        libc.malloc_trim(0)


@dataclass
class LossOutput:
    """A training step's loss and its named components (for logging)."""

    loss: Any
    components: dict[str, float] | None = None


def train_loop(
    module: torch.nn.Module,
    loss_fn: Callable[[np.ndarray, bool], LossOutput],
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
    *,
    desc: str = "training",
) -> pd.DataFrame:
    """Minibatch Adam with early stopping on the validation loss; restores the best weights.

    ``loss_fn(batch_rows, training)`` computes the loss for those cells (the caller closes over the
    data and device). Returns the history as a DataFrame with columns epoch, train_loss,
    val_loss, seconds.
    """
    torch = import_torch()
    from tqdm.auto import tqdm

    params = list(module.parameters())
    # fused Adam: one kernel for all parameters (2-3x faster steps for large models on CPU)
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )
    opt = torch.optim.Adam(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
    )
    best, best_state, wait = np.inf, None, 0
    rows = []
    bar = tqdm(range(config.n_epochs), desc=desc, disable=not config.progress, leave=False)
    start = time.perf_counter()
    with heap_reuse():
        for epoch in bar:
            module.train()
            tot, n = 0.0, 0
            for b in row_batches(train_idx, config.batch_size, rng):
                out = loss_fn(b, True)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                tot += float(out.loss.detach()) * len(b)
                n += len(b)
            train_loss = tot / max(n, 1)
            val_loss = np.nan
            if len(val_idx):
                module.eval()
                with torch.no_grad():
                    vt, vn = 0.0, 0
                    for b in row_batches(val_idx, config.batch_size):
                        vt += float(loss_fn(b, False).loss) * len(b)
                        vn += len(b)
                val_loss = vt / vn
            rows.append((epoch, train_loss, val_loss, time.perf_counter() - start))
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            monitor = val_loss if len(val_idx) else train_loss
            if monitor < best - 1e-7:
                best, wait = monitor, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                wait += 1
                if config.patience and wait >= config.patience:
                    logger.info("%s: early stop at epoch %d (best %.4g)", desc, epoch + 1, best)
                    break
            if config.max_seconds is not None and rows[-1][3] >= config.max_seconds:
                logger.info("%s: time budget reached after epoch %d", desc, epoch + 1)
                break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return pd.DataFrame(rows, columns=["epoch", "train_loss", "val_loss", "seconds"])


def save_model(
    path: str | os.PathLike, *, config: dict, state_dict: dict, var_names, extra=None
) -> None:
    """Write ``config.json`` (config, version, var_names) and ``weights.pt`` into directory ``path``.

    Each file is written to a temporary name first and renamed, so a failure never leaves a
    half-written model.
    """
    torch = import_torch()
    from .. import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"config": config, "version": __version__, "var_names": [str(v) for v in var_names]}
    if extra:
        meta["extra"] = extra
    with tempfile.NamedTemporaryFile("w", dir=path, suffix=".tmp", delete=False) as f:
        json.dump(meta, f)
    os.replace(f.name, path / "config.json")
    with tempfile.NamedTemporaryFile(dir=path, suffix=".tmp", delete=False) as f:
        torch.save(state_dict, f)
    os.replace(f.name, path / "weights.pt")


def load_model(path: str | os.PathLike, device="cpu") -> tuple[dict, dict]:
    """Read what :func:`save_model` wrote: ``(meta, state_dict)``."""
    torch = import_torch()
    path = Path(path)
    cfg, wts = path / "config.json", path / "weights.pt"
    if not cfg.is_file() or not wts.is_file():
        msg = f"{path} is not a saved screpair model (expected config.json and weights.pt)."
        raise FileNotFoundError(msg)
    with open(cfg) as f:
        meta = json.load(f)
    state = torch.load(wts, map_location=device, weights_only=True)
    return meta, state


def config_dict(cfg) -> dict:
    """A config dataclass as a plain dict (for ``config.json``)."""
    return asdict(cfg)
