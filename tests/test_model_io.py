"""Saved models (issue 14): bit-identical output across calls and loads, strict validation on
load, one-line load errors naming the file, atomic save."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

from screpair.methods import TrainConfig
from screpair.methods.autoencoder import AEConfig, DAEImputer, VAEImputer
from screpair.methods.cnn import CNNImputer
from screpair.methods.diffusion import DiffusionConfig, DiffusionImputer, PairConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CNN_TINY = dict(
    module={"n_hidden": 16},
    train={"n_epochs": 2, "batch_size": 32, "lr": 1e-3, "progress": False, "device": "cpu"},
)
TRAIN = TrainConfig(n_epochs=1, batch_size=64, patience=0, progress=False, device="cpu")
PAIRS = PairConfig(n_top_genes=40, n_views=1)
DIFF_TINY = DiffusionConfig(patch_size=8, d_model=16, n_layers=1, n_heads=2, dim_feedforward=16)
AE_TINY = AEConfig(hidden=32, latent=4)


def _cnn_adata(n_obs=120, n_vars=30, seed=0, with_prob=False) -> AnnData:
    """Counts driven by a 2-d latent factor (correlated genes) with dropped entries."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_obs, 2))
    true = rng.poisson(np.exp(1.5 + 0.5 * z @ rng.normal(size=(2, n_vars)))).astype(np.float64)
    x = np.where((rng.random(true.shape) < 0.25) & (true > 0), 0.0, true)
    ad = AnnData(sp.csr_matrix(x))
    ad.var_names = [f"g{i}" for i in range(n_vars)]
    ad.obs_names = [f"c{i}" for i in range(n_obs)]
    if with_prob:  # hand-made dropout probabilities: no clustering, fast fit
        det = (x > 0).mean(0) > 0.3
        ad.layers["p"] = sp.csr_matrix(np.where((x == 0) & det, 0.9, np.where(x == 0, 0.2, 0.0)))
    return ad


def _pair(cls, rng):
    if cls is DiffusionImputer:
        return cls(
            module=DIFF_TINY, train=TRAIN, pairs=PAIRS, n_samples=2, n_inference_steps=2, rng=rng
        )
    return cls(module=AE_TINY, train=TRAIN, pairs=PAIRS, rng=rng)


# --------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("rng", [0, "generator"])
def test_cnn_transform_repeatable_and_reloaded_bit_identical(rng, tmp_path):
    ad = _cnn_adata()
    new_cells = _cnn_adata(n_obs=60, seed=1)  # not the fitted cells: the dropout model is refitted
    seed = np.random.default_rng(0) if rng == "generator" else rng
    est = CNNImputer(threshold=0.3, rng=seed, **CNN_TINY).fit(ad)
    assert est.groups_  # something is imputed
    before_fitted = est.transform(ad)
    before_new = est.transform(new_cells)
    assert not np.array_equal(before_new, new_cells.X.toarray())
    np.testing.assert_array_equal(est.transform(new_cells), before_new)
    est.save(tmp_path / "m")
    loaded = CNNImputer.load(tmp_path / "m")
    for _ in range(5):
        np.testing.assert_array_equal(loaded.transform(new_cells), before_new)
    np.testing.assert_array_equal(loaded.transform(ad), before_fitted)
    again = CNNImputer.load(tmp_path / "m")  # a second load: the same again
    np.testing.assert_array_equal(again.transform(new_cells), before_new)
    assert again.get_params()["rng"] == (0 if rng == 0 else None)


@pytest.mark.parametrize("cls", [DiffusionImputer, DAEImputer, VAEImputer], ids=lambda c: c.name)
def test_pair_models_repeatable_and_reloaded_bit_identical(cls, ref_and_degraded, tmp_path):
    ref, deg = ref_and_degraded
    est = _pair(cls, np.random.default_rng(0)).fit(ref, layer="true_counts")
    before = est.transform(deg, layer="counts")
    np.testing.assert_array_equal(est.transform(deg, layer="counts"), before)
    est.save(tmp_path / "m")
    loaded = cls.load(tmp_path / "m")
    for _ in range(5):
        np.testing.assert_array_equal(loaded.transform(deg, layer="counts"), before)
    if cls is DiffusionImputer:  # the variance comes from the samples: reproducible too
        np.testing.assert_array_equal(
            loaded.posterior(deg, layer="counts").var, est.posterior(deg, layer="counts").var
        )


@pytest.mark.parametrize("name", ["cnn", "dae", "diffusion"])
def test_train_cells_saved_and_checked(name, ref_and_degraded, tmp_path):
    """A model fitted on a sample of cells (``n_train_cells``) keeps ``train_cells_`` through a
    save and load; one fitted on every cell loads ``None``; a damaged entry is one clear error."""
    if name == "cnn":
        ad = _cnn_adata()
        cap, key = 80, "_index.train_cells"
        est = CNNImputer(threshold=0.3, n_train_cells=cap, rng=0, **CNN_TINY).fit(ad)
    else:
        ref, _ = ref_and_degraded
        cls = DAEImputer if name == "dae" else DiffusionImputer
        cap, key = 100, "train_cells"
        est = _pair(cls, 0).set_params(n_train_cells=cap).fit(ref, layer="true_counts")
    assert est.train_cells_.size == cap
    est.save(tmp_path / "m")
    loaded = type(est).load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.train_cells_, est.train_cells_)
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    state[key] = state[key].flip(0)
    torch.save(state, tmp_path / "m" / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt.*increasing cell indices"):
        type(est).load(tmp_path / "m")
    del state[key]  # saved without a sample (all cells, or an earlier release)
    torch.save(state, tmp_path / "m" / "weights.pt")
    assert type(est).load(tmp_path / "m").train_cells_ is None


def test_int_seed_repair_unchanged_by_fit_seed(ref_and_degraded):
    """An int rng is the saved seed itself, so results of seeded runs stay what they were."""
    ref, _ = ref_and_degraded
    est = _pair(DiffusionImputer, 7).fit(ref, layer="true_counts")
    assert est.posterior_seed_ == 7
    gen = _pair(DiffusionImputer, np.random.default_rng(7)).fit(ref, layer="true_counts")
    assert isinstance(gen.posterior_seed_, int) and 0 <= gen.posterior_seed_ < 2**63


# --------------------------------------------------------------------------- saved models
@pytest.fixture(scope="module")
def saved(tmp_path_factory, ref_and_degraded):
    """One small saved model per class: name -> (class, directory)."""
    ref, _ = ref_and_degraded
    root = tmp_path_factory.mktemp("models")
    out = {}
    cnn = CNNImputer(dropout_layer="p", rng=0, **CNN_TINY).fit(_cnn_adata(with_prob=True))
    cnn.save(root / "cnn")
    out["cnn"] = (CNNImputer, root / "cnn")
    for cls in (DiffusionImputer, DAEImputer, VAEImputer):
        _pair(cls, 0).fit(ref, layer="true_counts").save(root / cls.name)
        out[cls.name] = (cls, root / cls.name)
    return out


NAMES = ["cnn", "diffusion", "dae", "vae"]
# per class: (parameter path in config.json, out-of-range value, words of the message)
OUT_OF_RANGE = {
    "cnn": (("threshold",), 7.5, "threshold must be in [0, 1)"),
    "diffusion": (("n_samples",), 0, "n_samples must be >= 1"),
    "dae": (("pairs", "zero_threshold"), -1.0, "zero_threshold must be >= 0"),
    "vae": (("pairs", "n_top_genes"), 0, "n_top_genes must be positive"),
}
WRONG_TYPE = {
    "cnn": (("train", "n_epochs"), "abc", "train.n_epochs must be int"),
    "diffusion": (("train", "n_epochs"), "abc", "train.n_epochs must be int"),
    "dae": (("module", "hidden"), 1.5, "module.hidden must be int"),
    "vae": (("pairs", "bias_3p"), "low", "pairs.bias_3p must be"),
}
# a shape parameter changed: the weights no longer fit the network the config describes
RESHAPE = {
    "cnn": (("module", "n_hidden"), 32),
    "diffusion": (("module", "d_model"), 32),
    "dae": (("module", "hidden"), 16),
    "vae": (("module", "latent"), 8),
}


def _copy(saved, name, tmp_path) -> tuple[type, Path]:
    cls, src = saved[name]
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return cls, dst


def _edit(d: Path, fn) -> None:
    meta = json.loads((d / "config.json").read_text())
    fn(meta)
    (d / "config.json").write_text(json.dumps(meta))


def _set(meta, keys, value):
    node = meta["config"]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value


def _refused(cls, d: Path, file: str, *words: str) -> str:
    with pytest.raises(ValueError) as info:
        cls.load(d)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(d / file) in msg, msg
    assert "weights_only" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("name", NAMES)
def test_saved_config_is_plain_json_with_nulls(saved, name):
    cls, d = saved[name]
    text = (d / "config.json").read_text()
    meta = json.loads(text)
    assert meta["format"] == 1
    assert '"None"' not in text  # None is JSON null, never the string
    if name == "cnn":
        assert meta["config"]["groupby"] is None
        assert meta["config"]["train"]["max_seconds"] is None  # nested, resolved, null
        assert meta["config"]["module"]["n_hidden"] == 16 and meta["config"]["preset"] == "default"
    else:
        assert meta["config"]["pairs"]["n_views"] == 1
        assert meta["config"]["train"]["n_epochs"] == 1  # nested configs saved resolved


def test_old_none_strings_still_load(saved, tmp_path):
    cls, d = _copy(saved, "cnn", tmp_path)
    _edit(d, lambda m: (_set(m, ("groupby",), "None"), m.pop("format", None)))
    assert cls.load(d).groupby is None


#: the fields of cnn's module, train and targets configs that the flat layout held (frozen: a
#: field added to a config later is not in an old file, and loads with its default)
_FLAT_FIELDS = ("n_filters", "kernel_size", "n_hidden", "dropout", "pooling", "n_epochs",
                "batch_size", "lr", "patience", "val_frac", "device", "progress",
                "warmup_epochs", "min_delta", "subset_size", "min_subsets", "n_top",
                "max_missing_frac", "n_ensemble", "min_frac_cells")


def _flat(config: dict) -> dict:
    """A nested cnn config as screpair wrote it before nested configs: the fields of
    :data:`_FLAT_FIELDS` at the top level, beside cnn's own parameters."""
    sections = ("module", "train", "targets")
    flat = {k: v for k, v in config.items() if k not in sections}
    for section in sections:
        flat.update({k: v for k, v in config[section].items() if k in _FLAT_FIELDS})
    return flat


def test_old_flat_cnn_config_loads_into_nested_configs(saved, tmp_path):
    """A cnn model of the flat layout (n_hidden, n_epochs, subset_size, ... at the top, "None"
    strings of screpair <= 0.1.0) loads into the nested configs and gives the same output."""
    cls, d = _copy(saved, "cnn", tmp_path)
    ad = _cnn_adata(with_prob=True)
    ref = cls.load(saved["cnn"][1])

    def flatten(meta):
        meta["config"] = {**_flat(meta["config"]), "groupby": "None", "cluster_kwargs": "None"}

    _edit(d, flatten)
    cfg = json.loads((d / "config.json").read_text())["config"]
    assert "n_epochs" in cfg and "train" not in cfg and cfg["pooling"] == "average"
    old = cls.load(d)
    assert old.groupby is None and old.cluster_kwargs is None
    for name in ("module", "train", "targets"):
        assert getattr(old, name) == ref._config(name), name
    np.testing.assert_array_equal(old.transform(ad), ref.transform(ad))
    # a flat value of the wrong type is named by its new place
    _edit(d, lambda m: _set(m, ("n_epochs",), "abc"))
    _refused(cls, d, "config.json", "train.n_epochs must be int")


def test_nested_cnn_round_trip_bit_identical(saved, tmp_path):
    """save -> load -> save writes the same config.json, and the reloaded model computes the
    same bits; ``device=`` overrides the saved ``train.device``."""
    cls, d = saved["cnn"]
    ad = _cnn_adata(with_prob=True)
    first = cls.load(d)
    assert isinstance(first.train, TrainConfig) and first.train.n_epochs == 2
    assert first.module.n_hidden == 16 and first.targets.min_frac_cells == 0.01
    first.save(tmp_path / "again")
    a = json.loads((d / "config.json").read_text())
    b = json.loads((tmp_path / "again" / "config.json").read_text())
    assert a["config"] == b["config"] and a["var_names"] == b["var_names"]
    second = cls.load(tmp_path / "again", device="cpu")
    assert second.train.device == "cpu"
    np.testing.assert_array_equal(second.transform(ad), first.transform(ad))


def test_parameter_missing_from_old_model_takes_saved_default(saved, tmp_path, monkeypatch):
    cls, d = _copy(saved, "cnn", tmp_path)
    _edit(d, lambda m: m["config"].pop("threshold"))
    assert cls.load(d).threshold == 0.5  # the __init__ default
    monkeypatch.setattr(cls, "_saved_defaults", {"threshold": 0.25}, raising=False)
    assert cls.load(d).threshold == 0.25  # the value older models were fitted with


@pytest.mark.parametrize("name", NAMES)
def test_unknown_key_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    _edit(d, lambda m: _set(m, ("n_epoch",), 3))
    _refused(cls, d, "config.json", "unknown parameter", "n_epoch")
    cls, d = _copy(saved, name, tmp_path / "nested")  # inside a nested config too
    _edit(d, lambda m: _set(m, ("train", "n_epoch"), 3))
    _refused(cls, d, "config.json", "train.n_epoch")


@pytest.mark.parametrize("name", NAMES)
def test_out_of_range_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    keys, value, words = OUT_OF_RANGE[name]
    _edit(d, lambda m: _set(m, keys, value))
    _refused(cls, d, "config.json", words)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_type_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    keys, value, words = WRONG_TYPE[name]
    _edit(d, lambda m: _set(m, keys, value))
    _refused(cls, d, "config.json", words)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field,value", [("version", "99.0.0"), ("format", 2)])
def test_newer_version_or_format_refused(saved, name, field, value, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    _edit(d, lambda m: m.update({field: value}))
    _refused(cls, d, "config.json", "newer than this screpair", "upgrade")


@pytest.mark.parametrize("name", NAMES)
def test_malformed_or_incomplete_config_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    (d / "config.json").write_text('{"config": {"threshold": 0.5,')
    _refused(cls, d, "config.json", "not valid JSON")
    cls, d = _copy(saved, name, tmp_path / "b")
    _edit(d, lambda m: m.pop("config"))
    _refused(cls, d, "config.json", "missing key 'config'")


@pytest.mark.parametrize("name", NAMES)
def test_missing_weights_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    (d / "weights.pt").unlink()
    _refused(cls, d, "weights.pt", "missing")


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_weights_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    keys, value = RESHAPE[name]
    _edit(d, lambda m: _set(m, keys, value))
    msg = _refused(cls, d, "weights.pt", "weights do not match the config (layer ")
    assert "shape" in msg


class _NotATensor:
    pass


@pytest.mark.parametrize("name", NAMES)
def test_damaged_or_unsafe_weights_refused(saved, name, tmp_path):
    cls, d = _copy(saved, name, tmp_path)
    (d / "weights.pt").write_bytes(b"\x00garbage" * 10)
    _refused(cls, d, "weights.pt", "damaged")
    # pickled objects: torch would suggest weights_only=False (unsafe); never passed on
    torch.save({"x": _NotATensor()}, d / "weights.pt")
    _refused(cls, d, "weights.pt", "only tensors")


def test_other_class_refused(saved):
    for name in NAMES:
        for other in NAMES:
            if other != name:
                cls = saved[other][0]
                _refused(cls, saved[name][1], "config.json", f"not a {cls.__name__}")


# --------------------------------------------------------------------------- atomic save
def test_interrupted_save_keeps_old_model(saved, tmp_path, monkeypatch):
    cls, d = _copy(saved, "dae", tmp_path)
    old_config = (d / "config.json").read_bytes()
    old_weights = (d / "weights.pt").read_bytes()
    other = DAEImputer.load(d)
    other.set_params(module=AEConfig(hidden=16, latent=4))  # a different config...
    real_save = torch.save

    def interrupted(obj, f, *a, **k):  # ...whose weights are half written when Ctrl-C comes
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        other.save(d)
    monkeypatch.undo()
    assert (d / "config.json").read_bytes() == old_config
    assert (d / "weights.pt").read_bytes() == old_weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dae"]  # no temporary left
    DAEImputer.load(d)
    # interrupted between moving the old model aside and moving the new one in
    real_replace, calls = os.replace, []

    def replace_once(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        other.save(d)
    monkeypatch.undo()
    assert (d / "config.json").read_bytes() == old_config
    assert (d / "weights.pt").read_bytes() == old_weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dae"]


def test_save_replaces_model_and_follows_symlink(saved, ref_and_degraded, tmp_path):
    cls, d = _copy(saved, "vae", tmp_path)
    link = tmp_path / "link"
    link.symlink_to(d, target_is_directory=True)
    est = cls.load(d)
    est.set_params(rng=5)
    est.save(link)
    assert link.is_symlink() and json.loads((d / "config.json").read_text())["config"]["rng"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "vae"]
    _, deg = ref_and_degraded
    np.testing.assert_array_equal(
        cls.load(link).transform(deg, layer="counts"), est.transform(deg, layer="counts")
    )


def test_save_refuses_directory_with_other_files(saved, tmp_path):
    cls, d = saved["dae"]
    est = cls.load(d)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        est.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "config.json").exists()
