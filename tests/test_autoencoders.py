"""DAE and VAE baselines (``method="dae"`` / ``"vae"``) on the diffusion method's pair pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anndata import AnnData
from sklearn.exceptions import NotFittedError

import screpair
from screpair.methods import TrainConfig
from screpair.methods._pairs import _log_profiles
from screpair.methods.autoencoder import AEConfig, DAEImputer, VAEImputer
from screpair.methods.autoencoder._module import DenoisingAE, VariationalAE
from screpair.methods.diffusion import PairConfig

N_TOP = 40
CLASSES = [DAEImputer, VAEImputer]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(cls, **kw):
    params = {
        "module": AEConfig(hidden=64, latent=8, dropout=0.1, kl_weight=0.1),
        "train": TrainConfig(n_epochs=8, batch_size=32, lr=3e-3, patience=0, progress=False),
        "pairs": PairConfig(n_top_genes=N_TOP, n_views=2),
        "rng": 0,
    }
    params.update(kw)
    return cls(**params)


@pytest.fixture(scope="module", params=CLASSES, ids=lambda c: c.name)
def fitted(request, ref_and_degraded):
    ref, _ = ref_and_degraded
    return _tiny(request.param).fit(ref, layer="true_counts")


def _log_mse(counts, clean, genes):
    return float(np.mean((_log_profiles(counts, genes) - _log_profiles(clean, genes)) ** 2))


def test_modules_shapes():
    torch.manual_seed(0)  # test-local init only
    c = torch.randn(5, 30)
    dae = DenoisingAE(30, hidden=16, latent=4)
    assert dae(c).shape == (5, 30)
    vae = VariationalAE(30, hidden=16, latent=4).eval()
    x_hat, mu, logvar = vae(c, torch.Generator().manual_seed(0))
    assert x_hat.shape == (5, 30) and mu.shape == (5, 4) and logvar.shape == (5, 4)
    # without a generator the decoder sees z = mu (deterministic)
    np.testing.assert_array_equal(vae(c)[0].detach().numpy(), vae.decoder(mu).detach().numpy())


def test_beats_degraded_input(fitted, ref_and_degraded):
    ref, deg = ref_and_degraded
    post = fitted.posterior(deg, layer="counts")
    hvg = np.flatnonzero(fitted.hvg_)
    clean = ref.layers["true_counts"]
    before = _log_mse(deg.layers["counts"], clean, hvg)
    after = _log_mse(post.mean, clean, hvg)
    assert after < 0.2 * before, (before, after)  # measured: 6.6 -> 0.48 (both)
    assert np.all(np.isfinite(post.mean)) and post.mean.min() >= 0
    assert post.var is None
    other = np.flatnonzero(~fitted.hvg_)
    np.testing.assert_array_equal(post.mean[:, other], deg.layers["counts"][:, other].toarray())


def test_save_load_identical(fitted, ref_and_degraded, tmp_path):
    _, deg = ref_and_degraded
    fitted.save(tmp_path / "m")
    loaded = type(fitted).load(tmp_path / "m")
    np.testing.assert_allclose(
        loaded.transform(deg, layer="counts"), fitted.transform(deg, layer="counts"), rtol=1e-6
    )
    other = VAEImputer if isinstance(fitted, DAEImputer) else DAEImputer
    with pytest.raises(ValueError, match=type(fitted).__name__):
        other.load(tmp_path / "m")


def test_var_names_checked(fitted, ref_and_degraded):
    _, deg = ref_and_degraded
    bad = deg[:, ::-1].copy()
    with pytest.raises(ValueError, match="order"):
        fitted.transform(bad, layer="counts")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_not_fitted(cls, ref_and_degraded):
    with pytest.raises(NotFittedError):
        _tiny(cls).transform(ref_and_degraded[1], layer="counts")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_seeded(cls, ref_and_degraded):
    ref, deg = ref_and_degraded
    state = torch.get_rng_state()
    tr = TrainConfig(n_epochs=2, patience=0, progress=False)
    a = _tiny(cls, train=tr).fit(ref, layer="true_counts").transform(deg, layer="counts")
    assert torch.equal(state, torch.get_rng_state())
    b = _tiny(cls, train=tr).fit(ref, layer="true_counts").transform(deg, layer="counts")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dae", "vae"])
def test_impute_registered(name, ref_and_degraded):
    _, deg = ref_and_degraded
    ad = AnnData(X=deg.layers["counts"].copy())
    ad.var_names = deg.var_names
    screpair.impute(
        ad,
        name,
        rng=0,
        train=TrainConfig(n_epochs=2, patience=0, progress=False),
        pairs=PairConfig(n_top_genes=N_TOP, n_views=1),
    )
    assert ad.layers[name].shape == ad.shape
    assert f"{name}_var" not in ad.layers
    assert np.all(ad.layers[name] >= 0)


def test_dict_configs_as_from_a_cli_config_file(ref_and_degraded):
    ref, deg = ref_and_degraded
    est = DAEImputer(
        module={"hidden": 16, "latent": 4},
        train={"n_epochs": 1, "progress": False},
        pairs={"n_top_genes": 20, "n_views": 1},
        rng=0,
    ).fit(ref, layer="true_counts")
    assert est.module_.encoder[0].out_features == 16
    assert int(est.hvg_.sum()) == 20
    with pytest.raises(TypeError, match="AEConfig"):
        DAEImputer(module={"width": 3}).fit(ref, layer="true_counts")
    with pytest.raises(TypeError, match="module must be"):
        DAEImputer(module=3).fit(ref, layer="true_counts")


def _glibc_mallinfo():
    """glibc's ``mallinfo2`` (``hblkhd``: bytes served with ``mmap``; ``fordblks``: free bytes in
    the heap), or None."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def test_heap_reuse_serves_large_buffers_from_the_heap(monkeypatch):
    from screpair.methods._torch import heap_reuse

    mallinfo = _glibc_mallinfo()
    if mallinfo is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")

    def grows():  # how much the mmapped total grows while a large buffer is alive (and its size)
        # above glibc's largest mmap threshold (32 MB) and larger than all free heap memory, so
        # no free chunk left by earlier tests can serve it
        size = (96 << 20) + mallinfo().fordblks
        base = mallinfo().hblkhd
        buf = torch.empty(size, dtype=torch.uint8)
        grown = mallinfo().hblkhd - base
        del buf
        return grown, size

    grown, size = grows()
    assert grown >= size  # by default a large buffer is a fresh mmap (zero-filled pages)
    with heap_reuse():
        grown, size = grows()
        assert grown < size // 2  # inside: from the heap, kept there after the free
    grown, size = grows()
    assert grown >= size  # glibc's behaviour is back after the context
    monkeypatch.setenv("SCREPAIR_HEAP_REUSE", "0")
    with heap_reuse():
        grown, size = grows()
        assert grown >= size  # opted out


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("n_epochs", 0, "an integer >= 1"),
        ("n_epochs", 2.5, "an integer >= 1"),
        ("batch_size", -4, "an integer >= 1"),
        ("patience", True, "an integer >= 0"),
        ("lr", 0.0, "a number > 0"),
        ("lr", float("nan"), "a number > 0"),
        ("weight_decay", -1e-4, "a number >= 0"),
        ("val_frac", 1.0, "a number in [0, 1)"),
        ("min_delta", -0.1, "a number in [0, 1)"),
        ("max_seconds", 0, "None or a number > 0"),
        ("warmup_epochs", "2", "an integer >= 0"),
        ("epoch_size", 0, "None or an integer >= 1"),
        ("epoch_size", 2.5, "None or an integer >= 1"),
    ],
)
def test_train_config_ranges_checked(field, value, words, tmp_path, capsys):
    """Out-of-range training settings fail at once with one line naming the setting: the class
    field from Python, ``train.<field>`` from a dict or a CLI config file (exit 2)."""
    import json
    import re

    from screpair.cli import main

    with pytest.raises(ValueError, match=re.escape(f"TrainConfig.{field} must be {words}, got")):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=re.escape(f"train.{field} must be {words}")):
        DAEImputer(train={field: value}).fit(np.ones((20, 5)))
    if isinstance(value, float) and value != value:
        return  # NaN is not JSON
    src, cfg = tmp_path / "in.h5ad", tmp_path / "cfg.json"
    AnnData(np.ones((20, 5), dtype=np.float32)).write_h5ad(src)
    cfg.write_text(json.dumps({"train": {field: value}}))
    rc = main(["impute", str(src), str(tmp_path / "o.h5ad"), "--method", "dae", "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"train.{field} must be {words}" in err, err
    assert not (tmp_path / "o.h5ad").exists()


def test_train_config_integral_floats_become_ints():
    cfg = TrainConfig(n_epochs=5.0, batch_size=np.int64(32), patience=2.0)
    assert (cfg.n_epochs, cfg.batch_size, cfg.patience) == (5, 32, 2)
    assert all(type(v) is int for v in (cfg.n_epochs, cfg.batch_size, cfg.patience))


def _epochs_seen(n_rows: int, epoch_size, n_epochs: int, batch_size: int = 4):
    """The training rows :func:`train_loop` hands ``loss_fn``, one list per epoch."""
    import torch

    from screpair.methods._torch import LossOutput, train_loop

    module = torch.nn.Linear(1, 1)
    seen: list[list[int]] = []

    def loss_fn(rows, training):
        if training:
            if not seen or len(seen[-1]) == min(epoch_size or n_rows, n_rows):
                seen.append([])
            seen[-1].extend(int(r) for r in rows)
        return LossOutput(loss=(module.weight**2).sum())

    cfg = TrainConfig(n_epochs=n_epochs, batch_size=batch_size, patience=0, progress=False,
                      epoch_size=epoch_size)
    hist = train_loop(module, loss_fn, np.arange(n_rows), np.array([], dtype=int), cfg,
                      np.random.default_rng(3))
    assert len(hist) == n_epochs
    return seen


def test_epoch_size_cycles_through_every_row():
    """``TrainConfig.epoch_size``: each epoch takes the next ``epoch_size`` rows of a shuffled
    pass over all training rows, so 30 rows in epochs of 10 are each seen once in epochs 1-3
    and again once in 4-6 (a new shuffle); with 25 the pass runs out inside epoch 2 and a new
    one continues it. ``None`` or a size of at least the rows: the batches of no cap, bit for
    bit (the same draws from ``rng``)."""
    seen = _epochs_seen(30, 10, 6)
    assert [len(e) for e in seen] == [10] * 6
    first, second = sum(seen[:3], []), sum(seen[3:], [])
    assert sorted(first) == list(range(30)) == sorted(second)
    assert first != second  # reshuffled
    assert first != list(range(30))  # shuffled at all
    seen = _epochs_seen(30, 25, 2)
    assert [len(e) for e in seen] == [25, 25]
    assert sorted(seen[0] + seen[1][:5]) == list(range(30))  # the first pass, then a new one
    assert len(set(seen[1][5:])) == 20
    assert _epochs_seen(30, 30, 3) == _epochs_seen(30, None, 3) == _epochs_seen(30, 99, 3)
