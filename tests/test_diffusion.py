"""DiffRepairer (``method="diffusion"``): noise schedule, network shapes, estimator end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from anndata import AnnData
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import screpair
from screpair import _norm
from screpair.methods import TrainConfig
from screpair.methods._pairs import _log_profiles
from screpair.methods.diffusion import (
    DiffusionConfig,
    DiffusionImputer,
    NoiseSchedule,
    PairConfig,
    make_betas,
)
from screpair.methods.diffusion._module import DenoiserNet, timestep_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# schedule (no network)


def test_linear_betas_golden():
    b = make_betas(1000, "linear")
    abar = np.cumprod(1 - b)
    assert b[0] == pytest.approx(1e-4, abs=1e-12)
    assert b[-1] == pytest.approx(0.02, abs=1e-12)
    # by hand: beta_1 = 1e-4 + 0.0199 / 999, abar_1 = (1 - 1e-4)(1 - beta_1)
    assert abar[1] == pytest.approx(0.9999 * (1 - (1e-4 + 0.0199 / 999)), abs=1e-12)
    assert abar[1] == pytest.approx(0.99978009207207, abs=1e-12)
    # Ho et al. (2020): abar_T ~ 4.04e-5 for T = 1000
    assert abar[999] == pytest.approx(4.0358e-05, rel=1e-4)


def test_cosine_alpha_bar_golden():
    s = NoiseSchedule(1000, "cosine")
    abar = s.alphas_cumprod

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # abar[t] = f((t + 1) / T) / f(0) wherever beta is not clipped
    for t in (0, 99, 499, 899):
        assert abar[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-10)
    assert abar[499] == pytest.approx(0.49384359044, abs=1e-10)
    assert abar[0] == pytest.approx(0.99995871578, abs=1e-10)
    assert s.betas.max() == pytest.approx(0.999, abs=1e-12)  # the last beta is clipped
    assert np.all(np.diff(abar) < 0)


def test_timesteps_trailing():
    s = NoiseSchedule(1000)
    np.testing.assert_array_equal(s.timesteps(10), np.arange(999, 0, -100))
    np.testing.assert_array_equal(s.timesteps(1000), np.arange(999, -1, -1))
    np.testing.assert_array_equal(s.timesteps(1), [999])
    with pytest.raises(ValueError, match="inference steps"):
        s.timesteps(0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(10, "quadratic")
    with pytest.raises(ValueError, match="positive"):
        make_betas(0)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(10, prediction_type="sample")


@pytest.mark.parametrize("beta_schedule", ["cosine", "linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_then_exact_prediction_gives_x0(beta_schedule, prediction_type):
    s = NoiseSchedule(1000, beta_schedule, prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 11, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 11, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    x_t = s.add_noise(x0, eps, t)
    # closed form, by hand, for one row
    a = s.alphas_cumprod[250]
    np.testing.assert_allclose(
        x_t[2].numpy(), math.sqrt(a) * x0[2].numpy() + math.sqrt(1 - a) * eps[2].numpy(), atol=1e-12
    )
    target = s.target(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        out = s.step(target[i : i + 1], ti, x_t[i : i + 1])
        np.testing.assert_allclose(out.x0_hat.numpy(), x0[i : i + 1].numpy(), atol=1e-6)


@pytest.mark.parametrize("n_inference", [1, 4, 10, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_exact_noise_returns_x0(n_inference, prediction_type):
    s = NoiseSchedule(1000, "cosine", prediction_type)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 7, generator=g, dtype=torch.float64)
    runs = []
    for _ in range(2):
        x = s.add_noise(x0, eps, 999)
        for t in s.timesteps(n_inference):
            # an oracle network: the exact target for the current sample
            model_out = s.target(x0, eps, int(t))
            x = s.step(model_out, int(t), x, n_inference=n_inference).prev
        runs.append(x)
    np.testing.assert_allclose(runs[0].numpy(), x0.numpy(), atol=1e-6)
    np.testing.assert_array_equal(runs[0].numpy(), runs[1].numpy())  # deterministic (eta = 0)


def test_ddpm_step_variance_is_posterior_beta_tilde():
    s = NoiseSchedule(1000, "linear")
    x0 = torch.zeros(1, 5, dtype=torch.float64)
    eps = torch.ones(1, 5, dtype=torch.float64)
    t = 500
    x_t = s.add_noise(x0, eps, t)
    det = s.step(eps, t, x_t, eta=0.0).prev
    out = s.step(eps, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(3)).prev
    z = torch.randn(1, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a_t, a_s, beta = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
    sigma = math.sqrt((1 - a_s) / (1 - a_t) * beta)  # DDPM's beta-tilde, by hand
    mean = math.sqrt(a_s) * 0.0 + math.sqrt(1 - a_s - sigma**2) * 1.0
    np.testing.assert_allclose(out.numpy(), mean + sigma * z.numpy(), atol=1e-10)
    np.testing.assert_allclose(det.numpy(), math.sqrt(1 - a_s), atol=1e-10)


def test_step_clip_bounds_x0_hat():
    s = NoiseSchedule(1000)
    x_t = torch.full((2, 3), 5.0)
    out = s.step(torch.zeros(2, 3), 999, x_t, clip=(-1.0, 2.0))
    assert float(out.x0_hat.max()) <= 2.0 + 1e-6
    assert float(out.x0_hat.min()) >= -1.0 - 1e-6
    # per-gene (tensor) bounds broadcast over the batch
    low, high = torch.tensor([0.0, -1.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    out = s.step(torch.zeros(2, 3), 999, x_t, clip=(low, high))
    np.testing.assert_allclose(out.x0_hat.numpy(), [[1.0, 0.0, 3.0]] * 2, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# network


@pytest.mark.parametrize(("cond_concat", "cond_dim"), [(True, None), (False, 8), (True, 8)])
@pytest.mark.parametrize(("n_genes", "patch_size", "n_tokens"), [(23, 5, 5), (20, 5, 4), (7, 1, 7)])
def test_epsnet_shapes(n_genes, patch_size, n_tokens, cond_concat, cond_dim):
    net = DenoiserNet(
        n_genes,
        patch_size=patch_size,
        d_model=16,
        n_layers=2,
        n_heads=2,
        dim_feedforward=32,
        cond_concat=cond_concat,
        cond_dim=cond_dim,
        cond_hidden=16,
    )
    assert (net.cond_encoder is None) == (cond_dim is None)
    assert net.embed.weight.shape[1] == (2 if cond_concat else 1) * patch_size
    assert net.n_tokens == n_tokens
    x = torch.randn(4, n_genes)
    t = torch.tensor([0, 1, 500, 999])
    out = net(x, t, torch.randn(4, n_genes))
    assert out.shape == (4, n_genes)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="condition"):
        net(x, t)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(4, n_genes + 1), t, torch.randn(4, n_genes + 1))


@pytest.mark.parametrize(("cond_concat", "cond_dim"), [(True, None), (False, 8)])
def test_epsnet_uses_condition_and_timestep(cond_concat, cond_dim):
    torch.manual_seed(0)  # test-local init; library code never seeds globally
    net = DenoiserNet(
        12,
        patch_size=4,
        d_model=16,
        n_layers=1,
        n_heads=2,
        dim_feedforward=16,
        cond_concat=cond_concat,
        cond_dim=cond_dim,
    ).eval()
    x, c = torch.randn(2, 12), torch.randn(2, 12)
    t = torch.tensor([10, 10])
    base = net(x, t, c)
    assert (net(x, t, c + 1.0) - base).abs().max() > 1e-4
    assert (net(x, torch.tensor([900, 900]), c) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cond_concat"):
        DenoiserNet(12, patch_size=4, cond_concat=False, cond_dim=None)
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(emb[0].numpy(), [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# estimator

N_TOP = 40
TINY = DiffusionConfig(
    patch_size=8,
    d_model=32,
    n_layers=2,
    n_heads=2,
    dim_feedforward=64,
    prediction_type="v_prediction",
)


def _tiny(**kw):
    params = {
        "module": TINY,
        "train": TrainConfig(n_epochs=8, batch_size=64, lr=2e-3, patience=0, progress=False),
        "pairs": PairConfig(n_top_genes=N_TOP, n_views=2),
        "n_samples": 3,
        "n_inference_steps": 4,
        "rng": 0,
    }
    params.update(kw)
    return DiffusionImputer(**params)


@pytest.fixture(scope="module")
def fitted(ref_and_degraded):
    ref, _ = ref_and_degraded
    return _tiny().fit(ref, layer="true_counts")


def _log_mse(counts, clean, genes):
    return float(np.mean((_log_profiles(counts, genes) - _log_profiles(clean, genes)) ** 2))


def test_fit_transform_beats_degraded_input(fitted, ref_and_degraded):
    ref, deg = ref_and_degraded
    post = fitted.posterior(deg, layer="counts")
    hvg = np.flatnonzero(fitted.hvg_)
    assert len(hvg) == N_TOP
    clean = ref.layers["true_counts"]
    before = _log_mse(deg.layers["counts"], clean, hvg)
    after = _log_mse(post.mean, clean, hvg)
    assert after < 0.2 * before, (before, after)  # measured: 6.6 -> 0.59
    assert np.all(np.isfinite(post.mean)) and post.mean.min() >= 0
    # genes outside the HVG set come back exactly as observed
    other = np.flatnonzero(~fitted.hvg_)
    np.testing.assert_array_equal(post.mean[:, other], deg.layers["counts"][:, other].toarray())
    assert post.var.shape == post.mean.shape
    assert post.var.min() >= 0
    np.testing.assert_array_equal(post.var[:, other], 0.0)
    assert post.var[:, hvg].max() > 0
    assert list(fitted.history_.columns) == ["epoch", "train_loss", "val_loss", "seconds"]
    assert len(fitted.history_) == 8


class _OracleNet(torch.nn.Module):
    """Predicts the exact ``v`` for ``x0 = c`` (a network that knows the clean profile is ``c``)."""

    def __init__(self, sched):
        super().__init__()
        self.sched = sched

    def forward(self, x_t, t, c):
        a = self.sched._abar(t, x_t)
        eps = (x_t - a.sqrt() * c) / (1 - a).sqrt()
        return self.sched.target(c, eps, t)


@pytest.mark.parametrize("mean", ["denoiser", "samples"])
def test_sample_point_estimate(mean):
    est = _tiny(mean=mean, n_samples=3, n_inference_steps=3)
    est.clip_ = np.array([[-10.0] * 5, [10.0] * 5], dtype=np.float32)
    c = torch.tensor([[0.5, -1.0, 2.0, 0.0, 3.0], [1.0, 1.0, -2.0, 4.0, 0.25]])
    samples, point = est._sample(_OracleNet(est._schedule()), c, 3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 2, 5)
    # DDIM with the exact v returns x0 = c from any starting noise
    np.testing.assert_allclose(samples.numpy(), np.broadcast_to(c.numpy(), (3, 2, 5)), atol=1e-4)
    if mean == "samples":
        assert point is None
    else:  # E[x0 | c] from the first (pure-noise) step
        np.testing.assert_allclose(point.numpy(), c.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="mean must be"):
        _tiny(mean="median")._sample(_OracleNet(est._schedule()), c, 1, None)


def test_pair_pipeline_lengths_follow_gene_names():
    """Training views use each gene's own stand-in length (seeded by its name, not its column)."""
    from screpair import simulate
    from screpair.methods._pairs import PairImputer

    sim = simulate.splat(n_obs=20, n_vars=30, rng=0)
    names = sim.var_names[::-1]
    from screpair.methods._base import data_context

    flipped = sim[:, names]
    np.testing.assert_array_equal(
        PairImputer._gene_length(data_context(flipped, flipped.X)),
        simulate.default_gene_length(names),
    )
    withlen = sim.copy()
    withlen.var["gene_length"] = np.arange(1.0, sim.n_vars + 1)
    np.testing.assert_array_equal(
        PairImputer._gene_length(data_context(withlen, withlen.X)), withlen.var["gene_length"]
    )


def test_n_views_automatic():
    from screpair.methods._pairs import n_views

    auto = PairConfig()
    # ceil(10,000 / cells) clipped to [2, 8] below 2,000 cells, then 2
    assert [n_views(auto, n) for n in (50, 411, 1350, 1999, 2000, 2700, 100_000)] == [
        8, 8, 8, 6, 2, 2, 2,
    ]
    assert n_views(PairConfig(n_views=3), 50) == 3
    with pytest.raises(ValueError, match="n_views"):
        n_views(PairConfig(n_views=0), 50)


def test_count_scale_round_trip():
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(5, 9)).astype(float)
    lib = x.sum(1)
    back = _norm.to_counts(_log_profiles(x, np.arange(9), lib), lib)
    np.testing.assert_allclose(back, x, rtol=1e-5)


def test_reproducible_and_no_global_torch_state(ref_and_degraded, fitted):
    ref, deg = ref_and_degraded
    state = torch.get_rng_state()
    est = _tiny(train=TrainConfig(n_epochs=2, patience=0, progress=False), n_samples=2)
    a = est.fit(ref, layer="true_counts").transform(deg, layer="counts")
    assert torch.equal(state, torch.get_rng_state())
    b = _tiny(train=TrainConfig(n_epochs=2, patience=0, progress=False), n_samples=2)
    b = b.fit(ref, layer="true_counts").transform(deg, layer="counts")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # transform itself is repeatable for an int seed
    np.testing.assert_array_equal(
        fitted.transform(deg, layer="counts"), fitted.transform(deg, layer="counts")
    )


def test_save_load_identical(fitted, ref_and_degraded, tmp_path):
    _, deg = ref_and_degraded
    fitted.save(tmp_path / "m")
    loaded = DiffusionImputer.load(tmp_path / "m")
    assert loaded.get_params()["module"] == TINY
    np.testing.assert_allclose(
        loaded.transform(deg, layer="counts"), fitted.transform(deg, layer="counts"), rtol=1e-6
    )
    from screpair.methods.autoencoder import DAEImputer

    with pytest.raises(ValueError, match="DiffusionImputer"):
        DAEImputer.load(tmp_path / "m")


def test_var_names_checked(fitted, ref_and_degraded):
    _, deg = ref_and_degraded
    bad = deg.copy()
    bad.var_names = [f"x{i}" for i in range(bad.n_vars)]
    with pytest.raises(ValueError, match="genes differ"):
        fitted.transform(bad, layer="counts")
    with pytest.raises(ValueError, match="genes"):
        fitted.transform(deg.layers["counts"][:, :10])


def test_not_fitted_and_clone(ref_and_degraded):
    _, deg = ref_and_degraded
    est = _tiny()
    with pytest.raises(NotFittedError):
        est.transform(deg, layer="counts")
    c = clone(est)
    assert c.get_params() == est.get_params()


def test_zero_threshold_keeps_small_observed_zeros(fitted, ref_and_degraded):
    import copy
    import dataclasses

    _, deg = ref_and_degraded
    assert fitted._pairs_cfg().zero_threshold == 0.5  # the default

    def with_threshold(value):
        est = copy.deepcopy(fitted)
        return est.set_params(pairs=dataclasses.replace(est._pairs_cfg(), zero_threshold=value))

    kept = fitted.posterior(deg, layer="counts").mean
    every = with_threshold(0.0).posterior(deg, layer="counts").mean
    hvg = np.flatnonzero(fitted.hvg_)
    obs = deg.layers["counts"].toarray()
    lib = obs.sum(1)
    zero = obs[:, hvg] == 0
    low = np.log1p(every[:, hvg] / lib[:, None] * 1e4) < 0.5
    # observed non-zeros and observed zeros with a repaired value >= 0.5 are the same repair
    np.testing.assert_allclose(kept[:, hvg][~(zero & low)], every[:, hvg][~(zero & low)], rtol=1e-6)
    np.testing.assert_array_equal(kept[:, hvg][zero & low], 0.0)
    assert (zero & low).any() and (zero & ~low).any()  # both cases occur
    # without the threshold more observed zeros get a value
    assert (every[:, hvg][zero] > 0).sum() > (kept[:, hvg][zero] > 0).sum()
    with pytest.raises(ValueError, match="zero_threshold"):
        with_threshold(-1.0).posterior(deg, layer="counts")


def test_impute_writes_mean_and_variance(ref_and_degraded):
    _, deg = ref_and_degraded
    ad = AnnData(X=deg.layers["counts"].copy(), var=deg.var[[]].copy())
    ad.layers["counts"] = ad.X.copy()
    out = screpair.impute(
        ad,
        "diffusion",
        layer="counts",
        copy=True,
        rng=0,
        module=TINY,
        train=TrainConfig(n_epochs=2, patience=0, progress=False),
        pairs=PairConfig(n_top_genes=N_TOP, n_views=1),
        n_samples=2,
        n_inference_steps=2,
    )
    assert "diffusion" not in ad.layers
    assert out.layers["diffusion"].shape == ad.shape
    assert out.layers["diffusion_var"].shape == ad.shape
    assert np.all(out.layers["diffusion"] >= 0)
    assert out.uns["diffusion"]["method"] == "diffusion"


def test_training_options_checked():
    for module, match in (
        ({"last_step_frac": 1.5}, "last_step_frac"),
        ({"val_metric": "mse"}, "val_metric"),
        ({"patch_size": 0}, "patch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            _tiny(module={**TINY.__dict__, **module})._check_params()


def test_default_epoch_size_and_its_override(ref_and_degraded):
    """diffusion's default training takes at most ``EPOCH_PAIRS`` pairs per epoch (issue 16); a
    dict keeps that cap, a ``TrainConfig`` is used as given; the other pair methods have none.
    A fit capped below its pairs trains epochs of exactly that many pairs and saves the cap."""
    from screpair.methods.autoencoder import DAEImputer
    from screpair.methods.diffusion._model import EPOCH_PAIRS

    assert EPOCH_PAIRS == 16_384 and TrainConfig().epoch_size is None
    assert DiffusionImputer()._train_cfg() == TrainConfig(epoch_size=EPOCH_PAIRS)
    assert DiffusionImputer(train={"n_epochs": 3})._train_cfg().epoch_size == EPOCH_PAIRS
    assert DiffusionImputer(train=TrainConfig(n_epochs=3))._train_cfg().epoch_size is None
    assert DAEImputer()._train_cfg().epoch_size is None
    ref, _ = ref_and_degraded
    train = TrainConfig(n_epochs=2, batch_size=16, patience=0, progress=False, epoch_size=32)
    est = _tiny(train=train).fit(ref, layer="true_counts")
    assert len(est.history_) == 2 and est._train_cfg().epoch_size == 32
    assert est.get_params()["train"].epoch_size == 32


@pytest.mark.parametrize(("n_genes", "expected"), [(5000, 500), (4001, 401), (2000, 250), (30, 250)])
def test_automatic_patch_size(n_genes, expected):
    """``patch_size=None``: at most MAX_TOKENS (10) tokens, patches of at least 250 genes."""
    from screpair.methods.diffusion._model import patch_size

    assert patch_size(DiffusionConfig(), n_genes) == expected
    assert patch_size(DiffusionConfig(patch_size=250), n_genes) == 250
    net = DiffusionImputer()._build_module(n_genes)
    assert net.n_tokens == math.ceil(n_genes / expected) <= 10


def test_redraw_views_and_repair_metric(ref_and_degraded):
    """Fresh damage per epoch and early stopping on the repair MSE: reproducible, the
    validation score is the point estimate's MSE (>= 0, finite), and the output differs from
    fixed views."""
    ref, deg = ref_and_degraded
    train = TrainConfig(n_epochs=3, batch_size=64, lr=2e-3, patience=0, progress=False)
    kw = dict(
        module={**TINY.__dict__, "val_metric": "repair", "last_step_frac": 0.3},
        train=train,
        pairs={"n_top_genes": N_TOP, "n_views": 2, "redraw_views": True},
    )
    a = _tiny(**kw).fit(ref, layer="true_counts")
    b = _tiny(**kw).fit(ref, layer="true_counts")
    assert np.isfinite(a.history_["val_loss"]).all() and (a.history_["val_loss"] >= 0).all()
    np.testing.assert_array_equal(a.history_["val_loss"], b.history_["val_loss"])
    ma = a.posterior(deg, layer="counts").mean
    np.testing.assert_array_equal(ma, b.posterior(deg, layer="counts").mean)
    fixed = _tiny(**{**kw, "pairs": {"n_top_genes": N_TOP, "n_views": 2}}).fit(
        ref, layer="true_counts"
    )
    assert not np.array_equal(ma, fixed.posterior(deg, layer="counts").mean)
