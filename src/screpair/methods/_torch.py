"""Shared torch plumbing for the neural methods: lazy import, device choice, a plain training loop
with early stopping, minibatches of sparse rows, and save/load with gene-name checks.

torch is imported only inside these functions, so ``import screpair`` never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import inspect
import json
import numbers
import os
import platform
import re
import secrets
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._logging import get_logger
from .._utils import interrupt_guard

if TYPE_CHECKING:
    import torch

    from .._utils import RNGLike

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
        Maximum number of epochs: passes over the training rows, or of ``epoch_size`` rows.
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
    warmup_epochs
        Linear learning-rate warm-up over this many epochs (per step, from ``lr / steps`` to
        ``lr``); ``0``: constant ``lr``.
    min_delta
        Early stopping on a *relative* improvement: an epoch counts as better only when the
        monitored loss falls below ``best * (1 - min_delta)``; ``0``: any decrease counts.
    epoch_size
        Most training rows per epoch (``None``: every one). With more rows than this, each
        epoch takes the next ``epoch_size`` rows of a shuffled pass over all of them (a new
        shuffle when a pass runs out), so successive epochs cover every row equally often and
        an epoch's cost no longer grows with the data; the validation rows are all scored at
        every epoch. With fewer rows it changes nothing (the same batches, bit for bit).
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
    warmup_epochs: int = 0
    min_delta: float = 0.0
    epoch_size: int | None = None

    def __post_init__(self) -> None:
        """Range checks, one line each (a config from a file or the CLI is checked here too)."""
        checks = {
            "n_epochs": (self.n_epochs, True, 1, None, "an integer >= 1"),
            "batch_size": (self.batch_size, True, 1, None, "an integer >= 1"),
            "patience": (self.patience, True, 0, None, "an integer >= 0"),
            "warmup_epochs": (self.warmup_epochs, True, 0, None, "an integer >= 0"),
            "lr": (self.lr, False, 0, None, "a number > 0"),
            "weight_decay": (self.weight_decay, False, 0, None, "a number >= 0"),
            "val_frac": (self.val_frac, False, 0, 1, "a number in [0, 1)"),
            "min_delta": (self.min_delta, False, 0, 1, "a number in [0, 1)"),
        }
        if self.max_seconds is not None:
            checks["max_seconds"] = (self.max_seconds, False, 0, None, "None or a number > 0")
        if self.epoch_size is not None:
            checks["epoch_size"] = (self.epoch_size, True, 1, None, "None or an integer >= 1")
        for name, (value, integer, low, high, what) in checks.items():
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            if ok:
                ok = value == value and (not integer or float(value).is_integer())
                strict = name in ("lr", "max_seconds")
                ok = ok and (value > low if strict else value >= low)
                ok = ok and (high is None or value < high) and value != float("inf")
            if not ok:
                msg = f"TrainConfig.{name} must be {what}, got {value!r}."
                raise ValueError(msg)
            if integer:  # 5.0 from a config file is 5
                object.__setattr__(self, name, int(value))


def resolve_config(typ: type, value, *, name: str, default=None):
    """One nested config of an estimator, from its parameter ``value`` (the one rule every
    estimator with config parameters follows):

    - ``None``: ``default`` (the estimator's, e.g. a preset's; ``typ()`` when not given);
    - a mapping (e.g. a table of a CLI config file): ``default`` with those fields replaced, so
      ``train={"lr": 3e-4}`` keeps every other default;
    - an instance of ``typ``: used as it is.

    Anything else, or a mapping with a field ``typ`` does not have, raises a one-line
    ``TypeError`` naming the parameter and the config class.
    """
    base = typ() if default is None else default
    if value is None:
        return base
    if isinstance(value, Mapping):
        accepted = [f.name for f in fields(typ) if f.init]
        unknown = [k for k in value if k not in accepted]
        if unknown:
            msg = (
                f"invalid {name!r} settings for {typ.__name__}: unknown field(s) "
                f"{', '.join(repr(k) for k in unknown)} (accepted: {', '.join(accepted)})."
            )
            raise TypeError(msg)
        try:
            return dataclasses.replace(base, **value)
        except ValueError as e:  # a range check of the config: name the parameter as passed
            raise ValueError(str(e).replace(f"{typ.__name__}.", f"{name}.", 1)) from None
    if isinstance(value, typ):
        return value
    msg = f"{name} must be a {typ.__name__} or a dict, got {type(value).__name__}."
    raise TypeError(msg)


def resolved_configs(est) -> dict[str, Any]:
    """``{name: config}`` for each config parameter of ``est`` (its ``_configs``), resolved by
    the estimator's ``_config`` (:func:`resolve_config` with the estimator's defaults)."""
    return {name: est._config(name) for name in getattr(est, "_configs", {})}


def split_cells(n: int, val_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``n`` cells (validation empty when too few cells)."""
    perm = rng.permutation(n)
    n_val = int(round(n * val_frac)) if n >= 10 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _epoch_rows(
    train_idx: np.ndarray, batch_size: int, epoch_size: int | None, rng: np.random.Generator
) -> Callable[[], Iterator[np.ndarray]]:
    """The batches of each epoch of :func:`train_loop`, one call per epoch: all of
    ``train_idx`` shuffled (:func:`row_batches`), or above ``epoch_size`` rows the next
    ``epoch_size`` rows of a shuffled pass over them (``TrainConfig.epoch_size``)."""
    if epoch_size is None or epoch_size >= len(train_idx):
        return lambda: row_batches(train_idx, batch_size, rng)
    state = {"order": rng.permutation(train_idx), "pos": 0}

    def take() -> Iterator[np.ndarray]:
        parts, need = [], int(epoch_size)
        while need:
            if state["pos"] == len(state["order"]):  # the pass ran out: a new shuffle
                state["order"], state["pos"] = rng.permutation(train_idx), 0
            part = state["order"][state["pos"] : state["pos"] + need]
            state["pos"] += len(part)
            need -= len(part)
            parts.append(part)
        return row_batches(np.concatenate(parts), batch_size)

    return take


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
    on_epoch: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Minibatch Adam with early stopping on the validation loss; restores the best weights.

    ``loss_fn(batch_rows, training)`` computes the loss for those cells (the caller closes over the
    data and device). ``on_epoch(epoch)``, when given, runs before every epoch but the first
    (e.g. to redraw augmented inputs). Returns the history as a DataFrame with columns epoch, train_loss,
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
    next_rows = _epoch_rows(train_idx, config.batch_size, config.epoch_size, rng)
    n_steps = -(-min(len(train_idx), config.epoch_size or len(train_idx)) // config.batch_size)
    warmup, step = config.warmup_epochs * n_steps, 0
    with heap_reuse():
        for epoch in bar:
            if on_epoch is not None and epoch > 0:
                on_epoch(epoch)
            module.train()
            tot, n = 0.0, 0
            for b in next_rows():
                if step < warmup:
                    for group in opt.param_groups:
                        group["lr"] = config.lr * (step + 1) / warmup
                step += 1
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
            if monitor < best * (1.0 - config.min_delta) - 1e-7:
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


# ------------------------------------------------------------------------------- persistence
#: version of the saved-model layout (config.json + weights.pt); bump when a change would make
#: older screpair versions misread a model, which they then refuse
MODEL_FORMAT = 1
_MODEL_FILES = ("config.json", "weights.pt")


def model_error(file, what: str) -> ValueError:
    """The one-line error for a saved model that cannot be used."""
    what = " ".join(str(what).split())
    return ValueError(f"could not load model {str(file)!r}: {what}")


def fit_seed(rng: RNGLike) -> int:
    """An integer seed standing for ``rng`` in a fitted model: an int passes through; a
    ``Generator`` gives one draw (``None``: fresh entropy).

    Fitted models keep this seed and derive every inference-time generator from it, per call,
    so repeated ``transform`` calls, and a saved and reloaded model, give the same output.
    """
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return int(rng)
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(2**63))
    return int(np.random.default_rng(rng).integers(2**63))


def json_config(params: dict, *, where: str = "parameter") -> dict:
    """Parameters as JSON values for ``config.json``: dataclasses as dicts, tuples as lists,
    ``None`` as null; raises for anything that would not load back as the same value."""

    def conv(v, name):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name), f"{name}.{f.name}") for f in fields(v)}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (np.bool_, np.integer, np.floating)):
            return v.item()
        if isinstance(v, (list, tuple)):
            return [conv(e, name) for e in v]
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {k: conv(e, f"{name}.{k}") for k, e in v.items()}
        msg = f"cannot save {where} {name}={v!r}: config.json holds only JSON values."
        raise ValueError(msg)

    return {k: conv(v, k) for k, v in params.items()}


def params_json(est) -> dict:
    """A fitted estimator's parameters for ``config.json``, the one format of every saved model:
    ``get_params()`` with each config parameter resolved (:func:`resolved_configs`; saved as a
    nested object holding every field, so that a later change of a default or a preset does not
    change what a saved model computes), ``None`` as JSON null, and a ``Generator`` ``rng`` as
    null (``posterior_seed_`` carries the fitted model's randomness)."""
    params = est.get_params(deep=False)
    params.update(resolved_configs(est))
    rng = params.get("rng")
    if "rng" in params and (isinstance(rng, bool) or not isinstance(rng, (int, np.integer))):
        params["rng"] = None
    return json_config(params)


def save_model(
    path: str | os.PathLike, *, config: dict, state_dict: dict, var_names, extra=None
) -> None:
    """Write ``config.json`` (config, format, version, var_names, extra) and ``weights.pt`` into
    directory ``path``.

    Atomic: both files are written into a new hidden directory beside ``path``, which then
    replaces ``path``, so an interrupted or failed save leaves the old model (or none) and never
    a mix. ``path`` may be missing, empty or an earlier saved model; a directory holding other
    files is refused (they would be lost). A symlink to a model directory updates its target.
    After a SIGKILL mid-save a hidden ``.NAME.*.tmp`` directory may remain beside ``path``.
    """
    torch = import_torch()
    from .. import __version__

    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    if target.exists():
        if not target.is_dir():
            msg = f"cannot save model to {str(path)!r}: it exists and is not a directory."
            raise ValueError(msg)
        other = sorted(p.name for p in target.iterdir() if p.name not in _MODEL_FILES)
        if other:
            msg = (
                f"cannot save model to {str(path)!r}: the directory holds other files "
                f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); choose a new or "
                "empty directory."
            )
            raise ValueError(msg)
    meta = {
        "format": MODEL_FORMAT,
        "version": __version__,
        "config": config,
        "var_names": [str(v) for v in var_names],
    }
    if extra:
        meta["extra"] = extra
    text = json.dumps(meta)  # before touching the disk: unserialisable values fail here
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp, old = parent / f".{target.name}.{tag}.tmp", parent / f".{target.name}.{tag}.old.tmp"
    with interrupt_guard() as got:  # SIGINT / SIGTERM: recorded, the save abandoned below
        tmp.mkdir()  # created with the user's umask (mkdtemp would make it private)
        try:
            with open(tmp / "config.json", "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp / "weights.pt", "wb") as f:
                torch.save(state_dict, f)
                f.flush()
                os.fsync(f.fileno())
            if got:
                msg = "interrupted during the save"
                raise InterruptedError(msg)
            if target.exists() and any(target.iterdir()):
                os.replace(target, old)  # a non-empty directory cannot be renamed over
            os.replace(tmp, target)
        except BaseException:
            if old.exists() and not target.exists():
                os.replace(old, target)  # interrupted between the two renames: the old model back
            shutil.rmtree(tmp, ignore_errors=True)
            if not got:
                raise  # else the guard raises for the signal
        shutil.rmtree(old, ignore_errors=True)


def _release(version: str) -> tuple[int, ...] | None:
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _newer(saved: tuple[int, ...], running: tuple[int, ...]) -> bool:
    n = max(len(saved), len(running))
    return saved + (0,) * (n - len(saved)) > running + (0,) * (n - len(running))


def load_model(path: str | os.PathLike, device="cpu") -> tuple[dict, dict]:
    """Read what :func:`save_model` wrote: ``(meta, state_dict)``.

    Checks the layout (both files present, ``config.json`` valid JSON with the expected keys)
    and that neither the format nor the version is newer than this screpair; the weights are
    read with ``torch.load(..., weights_only=True)`` (tensors and plain containers only). Any
    problem raises a one-line ``ValueError`` naming the file.
    """
    torch = import_torch()
    from .. import __version__

    path = Path(path)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        layout = " and ".join(_MODEL_FILES)
        raise model_error(path, f"{what} (a saved model is a directory with {layout})")
    cfg, wts = path / "config.json", path / "weights.pt"
    for f in (cfg, wts):
        if not f.is_file():
            raise model_error(f, "file missing (a saved model has config.json and weights.pt)")
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise model_error(cfg, f"not valid JSON ({e.msg} at {where})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise model_error(cfg, f"cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise model_error(cfg, f"expected a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format", 1)  # models saved before the format was recorded: 1
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise model_error(cfg, f"'format' must be a positive integer, got {fmt!r}")
    version = meta.get("version")
    if not isinstance(version, str) or _release(version) is None:
        raise model_error(cfg, f"'version' must be a screpair version string, got {version!r}")
    running = _release(__version__)
    if fmt > MODEL_FORMAT or (running is not None and _newer(_release(version), running)):
        raise model_error(
            cfg,
            f"saved by screpair {version} (model format {fmt}), newer than this screpair "
            f"{__version__} (format {MODEL_FORMAT}); upgrade screpair to load it",
        )
    for key, typ in (("config", dict), ("var_names", list), ("extra", dict)):
        if key not in meta:
            if key == "extra":
                continue
            raise model_error(cfg, f"missing key {key!r}")
        if not isinstance(meta[key], typ):
            raise model_error(cfg, f"{key!r} must be a JSON {'object' if typ is dict else 'list'}")
    names = meta["var_names"]
    if not names or not all(isinstance(v, str) for v in names):
        raise model_error(cfg, "'var_names' must be a non-empty list of gene names")
    if len(set(names)) != len(names):
        raise model_error(cfg, "'var_names' has duplicate gene names")
    try:
        state = torch.load(wts, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; none of its advice applies
        # never pass on torch's text: for a file with pickled objects it suggests
        # weights_only=False, which would run arbitrary code from the file
        raise model_error(
            wts,
            f"damaged, or not a weights file written by screpair ({type(e).__name__}); only "
            "tensors are read from it",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise model_error(wts, "expected a dict of named tensors")
    return meta, state


def load_state(module, state: dict, file) -> None:
    """``module.load_state_dict(state)`` after checking names and shapes, so a mismatch names
    the layer in one line (``file`` is the weights file, for the message)."""
    torch = import_torch()
    if not isinstance(state, dict):
        raise model_error(file, "expected a dict of named tensors for the network")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing layer(s) {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected layer(s) {', '.join(unexpected[:3])}")
        raise model_error(file, f"weights do not match the config ({'; '.join(parts)})")
    for k, ref in own.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise model_error(file, f"layer {k} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(ref.shape):
            raise model_error(
                file,
                f"weights do not match the config (layer {k}: shape {tuple(v.shape)} in the "
                f"file vs {tuple(ref.shape)} from the config)",
            )
    module.load_state_dict(state)


def tensor_entry(state: dict, key: str, file, *, shape: tuple | None = None) -> np.ndarray:
    """``state[key]`` as an ndarray, with a one-line error when it is missing or misshapen
    (``None`` in ``shape`` matches any length)."""
    torch = import_torch()
    v = state.get(key)
    if not isinstance(v, torch.Tensor):
        raise model_error(file, f"missing tensor {key!r}")
    arr = v.detach().cpu().numpy()
    if shape is not None and (
        arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape, strict=True))
    ):
        want = tuple("any" if s is None else s for s in shape)
        raise model_error(file, f"tensor {key!r} has shape {arr.shape}, expected {want}")
    return arr


def saved_rows(state: dict, key: str, file) -> np.ndarray | None:
    """The optional ``state[key]``: sorted distinct row indices (a fit's sample of cells, e.g.
    ``train_cells_``) as int64, ``None`` when the model was saved without them (all cells, or
    a release that did not save them); anything else is a one-line error naming the file."""
    if key not in state:
        return None
    rows = tensor_entry(state, key, file, shape=(None,))
    if rows.dtype.kind not in "iu" or (rows.size and (rows[0] < 0 or np.any(np.diff(rows) <= 0))):
        raise model_error(file, f"tensor {key!r} must hold increasing cell indices >= 0")
    return rows.astype(np.int64)


def rows_entry(key: str, rows: np.ndarray | None) -> dict:
    """``{key: int64 tensor of rows}`` for :func:`save_model`'s state, read back by
    :func:`saved_rows` (nothing for ``None``)."""
    if rows is None:
        return {}
    return {key: import_torch().from_numpy(np.asarray(rows, dtype=np.int64))}


# ------------------------------------------------------------------ saved parameters


def _hints(obj) -> dict[str, Any]:
    """Resolved annotations of ``obj`` (a function or a dataclass); a name that does not resolve
    is left out (its value is then not type-checked here, only by the estimator's own checks)."""
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - fall back to one annotation at a time
        pass
    glob = getattr(inspect.getmodule(obj), "__dict__", {})
    raw = getattr(obj, "__annotations__", {})
    out = {}
    for k, a in raw.items():
        try:
            out[k] = eval(a, glob) if isinstance(a, str) else a  # noqa: S307 - own annotations
        except Exception:  # noqa: BLE001, S112
            continue
    return out


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _coerce(value, hint, name: str):
    """``value`` (from JSON) checked against ``hint`` and turned into it (dict -> dataclass,
    list -> tuple); raises ``ValueError`` naming the parameter."""
    if hint is Any or hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value == "None" and type(None) in args:  # models saved by screpair <= 0.1.0
            return None
        if isinstance(value, dict):  # a config: its own errors name the setting
            for a in args:
                if dataclasses.is_dataclass(a):
                    return _coerce(value, a, name)
        for a in args:
            try:
                return _coerce(value, a, name)
            except ValueError:
                continue
        msg = f"{name} must be {_type_name(hint)}, got {value!r}"
        raise ValueError(msg)
    if hint is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):  # checked here, made a config by the estimator's resolution
            return coerce_params(hint, value, prefix=f"{name}.")
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                inner = args[0] if args else Any
                return tuple(_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(
                    _coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
                )
    elif origin is list or hint is list:
        if isinstance(value, list):
            return value
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:  # an annotation this checker does not know (Literal, Callable, ...): the estimator checks
        return value
    msg = f"{name} must be {_type_name(hint)}, got {value!r}"
    raise ValueError(msg)


def coerce_params(target, params: dict, *, prefix: str = "") -> dict:
    """Saved parameters checked against ``target``'s signature: an estimator class or a config
    dataclass. Returns the checked values as a dict (the keyword arguments of ``target``; a
    nested config stays a dict of its checked fields, which the estimator resolves as any dict
    setting, :func:`resolve_config`: fields not saved take the estimator's defaults).

    Unknown names and values of the wrong type raise ``ValueError`` naming them; names not
    saved take their defaults (parameters added since the model was saved).
    """
    if dataclasses.is_dataclass(target):
        accepted = [f.name for f in fields(target) if f.init]
        hints = _hints(target)
    else:
        sig = inspect.signature(target.__init__)
        accepted = [
            k
            for k, p in sig.parameters.items()
            if k != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        hints = _hints(target.__init__)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        kind = f"{target.__name__} setting" if dataclasses.is_dataclass(target) else "parameter"
        msg = (
            f"unknown {kind}(s) {', '.join(prefix + k for k in unknown)} (accepted: "
            f"{', '.join(accepted)})"
        )
        raise ValueError(msg)
    return {k: _coerce(v, hints.get(k, Any), prefix + k) for k, v in params.items()}


def _nest_moved(cls, config: dict) -> dict:
    """An older flat config with the names ``cls._moved_params`` lists (``name -> config``)
    moved into their nested configs (a null or ``"None"`` value, "the preset's", is dropped:
    the config's default applies)."""
    moved = getattr(cls, "_moved_params", {})
    out = {k: v for k, v in config.items() if k not in moved}
    for k, v in config.items():
        if k not in moved or v is None or v == "None":
            continue
        section = out.get(moved[k])
        if section is None:
            section = out[moved[k]] = {}
        if isinstance(section, dict):  # a config saved nested wins over a stray flat name
            section.setdefault(k, v)
    return out


def saved_params(cls, meta: dict, file) -> dict:
    """The keyword arguments of ``cls`` saved in ``meta["config"]`` (see :func:`coerce_params`),
    with one-line errors naming ``file``.

    A parameter missing from the config (the model was saved before it existed) takes its value
    from ``cls._saved_defaults`` when listed there, so that a new default that changes results
    does not change an old model's output; otherwise the ``__init__`` default. Flat names of an
    older layout that now live in a nested config (``cls._moved_params``) are moved there.
    """
    config = _nest_moved(cls, {**getattr(cls, "_saved_defaults", {}), **meta["config"]})
    try:
        return coerce_params(cls, config)
    except (ValueError, TypeError) as e:
        raise model_error(file, str(e)) from None


def saved_estimator(cls, meta: dict, file, **configs: dict):
    """The estimator ``cls`` with the parameters saved in ``meta`` (:func:`saved_params`), its
    own parameter checks run (as one-line load errors) and its nested configs resolved as in
    ``fit`` (a saved table missing fields added since takes the estimator's defaults for them).
    ``configs`` updates fields of nested configs, e.g. ``train={"device": "cpu"}``."""
    params = saved_params(cls, meta, file)
    for name, fields_ in configs.items():
        if fields_:
            saved = params.get(name)
            params[name] = {**(saved if isinstance(saved, dict) else {}), **fields_}
    est = cls(**params)
    check_loaded(est, est._check_params, file)
    try:
        est.set_params(**resolved_configs(est))
    except (ValueError, TypeError) as e:
        raise model_error(file, str(e)) from None
    return est


def saved_seed(extra: dict, rng, file) -> int:
    """The fitted model's ``posterior_seed`` from ``extra``; models saved before it was stored
    use ``rng`` when it is an int, else 0 (still the same output on every call)."""
    seed = extra.get("posterior_seed")
    if seed is None:
        return int(rng) if isinstance(rng, int) and not isinstance(rng, bool) else 0
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise model_error(file, f"'posterior_seed' must be a non-negative integer, got {seed!r}")
    return seed


def check_loaded(est, check: Callable[[], Any], file) -> None:
    """Run an estimator's own parameter check on a loaded model, as one-line load errors."""
    try:
        check()
    except (ValueError, TypeError) as e:
        raise model_error(file, str(e)) from None
