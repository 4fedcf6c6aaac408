"""Crosscoder known answers: paired activations generated from planted dictionaries with features of every
class (shared aligned, rotated by a known angle, attenuated / amplified by a known factor, exclusive to
either model) -> the trained crosscoder recovers the planted atoms and classifies them."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from vlmsafe_cli.crosscoder import (
    CLASSES,
    FIXED_THRESHOLDS,
    CrosscoderConfig,
    classify,
    dead_fraction,
    fraction_of_variance_explained,
    gmm_thresholds,
    heldout_prompts,
    massive_tokens,
    rho_theta,
    train_crosscoder,
)

PLANTED = (
    ["shared_aligned"] * 24
    + ["shared_rotated"] * 10
    + ["shared_attenuated"] * 8
    + ["shared_amplified"] * 6
    + ["base_only"] * 6
    + ["compressed_only"] * 6
)


def planted_pairs(d: int = 32, n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2, d) activations and the (features, 2, d) planted decoder: rotation 70 degrees, attenuation 0.3,
    amplification 3, exclusive atoms zero on the other side; each feature fires with probability 0.06."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(len(PLANTED), d, generator=g), dim=-1)
    other = base.clone()
    for i, kind in enumerate(PLANTED):
        if kind == "shared_rotated":
            orth = torch.randn(d, generator=g)
            orth = torch.nn.functional.normalize(orth - (orth @ base[i]) * base[i], dim=0)
            other[i] = math.cos(math.radians(70)) * base[i] + math.sin(math.radians(70)) * orth
        elif kind == "shared_attenuated":
            other[i] = 0.3 * base[i]
        elif kind == "shared_amplified":
            other[i] = 3.0 * base[i]
        elif kind == "base_only":
            other[i] = 0.0
        elif kind == "compressed_only":
            base[i] = 0.0
    coefficients = (torch.rand(n, len(PLANTED), generator=g) < 0.06) * (
        0.5 + 1.5 * torch.rand(n, len(PLANTED), generator=g)
    )
    noise = 0.01 * torch.randn(n, 2, d, generator=g)
    pairs = torch.stack([coefficients @ base, coefficients @ other], dim=1) + noise
    return pairs, torch.stack([base, other], dim=1)


@pytest.fixture(scope="module")
def trained():
    pairs, planted = planted_pairs()
    config = CrosscoderConfig(d_in=32, n_latents=128, k=4, sparsity="batchtopk")
    model, history = train_crosscoder(pairs, config, steps=1200, batch_size=256, lr=3e-3)
    return pairs, planted, model, torch.tensor(history["scales"])


def test_planted_features_are_recovered_and_classified(trained):
    pairs, planted, model, scales = trained
    decoder = model.decoder().detach()
    planted_normalised = planted * scales[None, :, None]
    cosines = (
        torch.nn.functional.normalize(decoder.flatten(1), dim=-1)
        @ torch.nn.functional.normalize(planted_normalised.flatten(1), dim=-1).T
    )
    best_cos, best_latent = cosines.max(0)
    recovered = best_cos >= 0.9
    assert recovered.float().mean() >= 0.9, best_cos
    rho, theta = rho_theta(decoder)
    labels = classify(rho, theta, FIXED_THRESHOLDS)
    found = [i for i in range(len(PLANTED)) if recovered[i]]
    wrong = Counter(
        (PLANTED[i], labels[best_latent[i]]) for i in found if labels[best_latent[i]] != PLANTED[i]
    )
    assert 1 - sum(wrong.values()) / len(found) >= 0.9, wrong
    fve = fraction_of_variance_explained(model, pairs, scales)
    assert min(fve) >= 0.9 and dead_fraction(model, pairs, scales) < 0.5


def test_rho_theta_and_classes_by_hand():
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    decoder = torch.stack(
        [
            torch.stack([e1, 0 * e1]),  # base only: rho 0
            torch.stack([0 * e1, e1]),  # compressed only: rho 1
            torch.stack([e1, e1]),  # aligned: rho 0.5, theta 1
            torch.stack([e1, e2]),  # rotated 90 degrees: theta 0
            torch.stack([e1, 0.25 * e1]),  # attenuated: rho 0.2
            torch.stack([e1, 2.5 * e1]),  # amplified: rho 0.714
            torch.stack([e1, 0.6 * e1 + 0.8 * e2]),  # theta 0.6, rho 0.5: neither aligned nor rotated
        ]
    )
    rho, theta = rho_theta(decoder)
    np.testing.assert_allclose(rho, [0, 1, 0.5, 0.5, 0.2, 2.5 / 3.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(theta[2:4], [1, 0], atol=1e-6)
    assert classify(rho, theta) == list(CLASSES)  # the rows above are in CLASSES order


def test_gmm_thresholds_separate_clear_bands_and_fall_back_otherwise():
    rng = np.random.default_rng(0)
    rho = np.concatenate([rng.normal(0.03, 0.01, 50), rng.normal(0.5, 0.03, 200), rng.normal(0.97, 0.01, 50)])
    (t1, t2, t3, t4), source = gmm_thresholds(np.clip(rho, 0, 1))
    assert source == "gmm(3)" and 0.05 < t1 == t2 < 0.45 and 0.55 < t3 == t4 < 0.95  # no attenuated band
    assert gmm_thresholds(np.full(50, 0.5))[1] == "fixed"


@pytest.mark.parametrize("sparsity", ["topk", "l1"])
def test_other_sparsities_and_options_train(sparsity):
    pairs, _ = planted_pairs(n=2000)
    config = CrosscoderConfig(
        d_in=32, n_latents=64, k=4, sparsity=sparsity, cross_weight=0.4, forced_shared=0.06, dead_steps=5
    )
    model, history = train_crosscoder(pairs, config, steps=60, batch_size=128, lr=3e-3)
    assert history["loss"][-1] < history["loss"][0]
    decoder = model.decoder()
    shared = model.n_shared
    assert shared == 4 and torch.equal(decoder[:shared, 0], decoder[:shared, 1])
    if sparsity == "topk":
        assert max(history["l0"]) <= 4


def test_massive_filter_drops_exactly_the_planted_huge_norm_tokens():
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(500, 2, 16, generator=g)  # norms ~4 in both models
    huge_base, huge_compressed, huge_both = [0, 100, 250], [7, 333], [499]
    pairs[huge_base, 0] *= 1000.0  # attention-sink-like: ~1000x the median norm, in one model only
    pairs[huge_compressed, 1] *= 50.0
    pairs[huge_both] *= 200.0
    pairs[[3, 4], 0] *= 5.0  # large but under 10x the median: kept
    planted = torch.zeros(500, dtype=torch.bool)
    planted[huge_base + huge_compressed + huge_both] = True
    assert torch.equal(massive_tokens(pairs, 10.0), planted)
    assert massive_tokens(pairs, 3.0)[[3, 4]].all()  # a lower factor reaches the 5x tokens too


def test_heldout_split_is_by_prompt_seeded_and_holds_out_at_least_one():
    prompt = torch.arange(40).repeat_interleave(torch.arange(40) % 7 + 1)  # 1..7 tokens per prompt
    heldout = heldout_prompts(40, 0.125, seed=3)
    assert int(heldout.sum()) == 5 and torch.equal(heldout, heldout_prompts(40, 0.125, seed=3))
    assert not torch.equal(heldout, heldout_prompts(40, 0.125, seed=4))
    tokens = heldout[prompt]
    assert set(prompt[tokens].tolist()).isdisjoint(prompt[~tokens].tolist())
    assert set(prompt[tokens].tolist()) == set(heldout.nonzero().ravel().tolist())
    assert int(heldout_prompts(3, 0.01, seed=0).sum()) == 1  # at least one held out
    assert int(heldout_prompts(3, 0.99, seed=0).sum()) == 2  # at least one left to train on
    with pytest.raises(ValueError, match="at least 2 prompts"):
        heldout_prompts(1, 0.125, seed=0)


# -- the analysis end to end (plumbing on tiny models) ---------------------------------------------------
SMALL_JOB = (
    "analysis=crosscoder",
    "analysis.crosscoder.n_prompts=8",
    "analysis.crosscoder.batch_size=4",
    "analysis.crosscoder.steps=30",
    "analysis.crosscoder.train_batch_size=64",
    "analysis.crosscoder.k=4",
    "compress.calibration.n_samples=4",
    "compress.calibration.seq_len=32",
)


def test_crosscoder_job_writes_rows_artifacts_and_reuses_cached_activations(cli, tmp_path, monkeypatch):
    import pandas as pd
    from safetensors.torch import load_file

    import vlmsafe_cli.analysis.crosscoder as analysis

    monkeypatch.setenv("VLMSAFE_CACHE", str(tmp_path / "cache"))
    job = tmp_path / "job"
    code, _, err = cli("run", "model=tiny-llama", "compress=magnitude50", *SMALL_JOB, f"hydra.run.dir={job}")
    assert code == 0, err
    table = pd.read_parquet(job / "results.parquet")
    table = table[table.analysis == "crosscoder"]
    metrics = set(table.metric)
    assert {
        "fve_base",
        "fve_compressed",
        "l0",
        "dead_fraction",
        "feature_fraction",
        "mean_theta_shared",
        "n_tokens_train",
        "n_tokens_heldout",
        "n_tokens_massive_dropped",
    } <= metrics
    value = table.set_index("metric").value
    assert value.n_tokens == value.n_tokens_train + value.n_tokens_heldout + value.n_tokens_massive_dropped
    assert value.n_tokens_heldout > 0 and value.n_tokens_train > value.n_tokens_heldout  # 1 of 8 prompts
    heldout = table[table.metric.isin(["fve_base", "fve_compressed", "l0", "dead_fraction"])]
    assert len(heldout) == 4 and (heldout.split == "heldout").all()
    assert (heldout.n == value.n_tokens_heldout).all()
    shards = sorted((tmp_path / "cache").rglob("shard*.safetensors"))
    prompt = torch.cat([load_file(str(shard))["prompt"] for shard in shards])
    assert prompt.dtype == torch.int64 and len(prompt) == value.n_tokens
    assert prompt.tolist() == sorted(prompt.tolist()) and set(prompt.tolist()) == set(range(8))
    fractions = table[table.metric == "feature_fraction"]
    assert fractions.value.sum() == pytest.approx(1.0) and len(fractions) == 7
    assert (fractions.n == value.n_live_features).all() and 0 < value.n_live_features
    assert table[table.metric == "hook_layer"].value.iloc[0] == 1  # auto without a refusal direction: middle
    features = pd.read_parquet(job / "artifacts" / "crosscoder_features.parquet")
    assert len(features) == 4 * 64 and {"rho", "theta", "class", "live"} <= set(features.columns)
    assert features.live.sum() == value.n_live_features
    assert (job / "artifacts" / "crosscoder_theta_rho.png").is_file()
    # a second analysis on the same (model, compression, hook, layer, prompts) skips collection
    monkeypatch.setattr(
        analysis, "_activations", lambda *args: (_ for _ in ()).throw(AssertionError("collected"))
    )
    again = tmp_path / "again"
    code, _, err = cli(
        "run",
        "model=tiny-llama",
        "compress=magnitude50",
        *SMALL_JOB,
        "analysis.crosscoder.steps=10",
        "analysis.crosscoder.exclude_massive=null",  # applied after the cache: no recollection
        f"hydra.run.dir={again}",
    )
    assert code == 0, err
    table = pd.read_parquet(again / "results.parquet")
    value = table[table.analysis == "crosscoder"].set_index("metric").value
    assert value.n_tokens_massive_dropped == 0
    assert value.n_tokens == value.n_tokens_train + value.n_tokens_heldout


def test_crosscoder_links_features_to_the_refusal_direction_and_on_a_vlm_hooks_the_projector(cli, tmp_path):
    import pandas as pd

    job = tmp_path / "job"
    code, _, err = cli(
        "run",
        "model=tiny-llama",
        "compress=magnitude50",
        "analysis=[refusal_direction,crosscoder]",
        "analysis.refusal_direction.n_train=8",
        "analysis.refusal_direction.n_val=4",
        "analysis.refusal_direction.n_test=4",
        "analysis.refusal_direction.max_new_tokens=2",
        "analysis.refusal_direction.coefficients=[1.0]",
        *SMALL_JOB[1:],
        f"hydra.run.dir={job}",
    )
    assert code == 0, err
    table = pd.read_parquet(job / "results.parquet")
    assert {"refusal_max_cos", "refusal_top_theta"} <= set(table[table.analysis == "crosscoder"].metric)
    vlm = tmp_path / "vlm"
    code, _, err = cli(
        "run",
        "model=tiny-llava",
        "compress=magnitude50",
        *SMALL_JOB,
        "analysis.crosscoder.hook=projector",
        f"hydra.run.dir={vlm}",
    )
    assert code == 0, err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("analysis.crosscoder.hook=vision",), "needs a VLM"),
        (("analysis.crosscoder.sparsity=relu",), "choose batchtopk, topk or l1"),
        (("analysis.crosscoder.layer=-1",), "use auto or a layer index"),
        (("analysis.crosscoder.n_prompts=1",), "held-out split needs >= 2"),
        (("analysis.crosscoder.holdout_fraction=1.0",), "use a fraction in (0, 1)"),
        (("analysis.crosscoder.exclude_massive=0.5",), "or null to keep every token"),
    ],
)
def test_crosscoder_bad_settings_are_one_line_errors(cli, tmp_path, overrides, message):
    code, _, err = cli("run", "model=tiny-llama", "analysis=crosscoder", *overrides, f"out_root={tmp_path}")
    assert code == 2 and message in err, err


def test_class_fractions_and_rotation_count_live_latents_only():
    """Dead latents keep their random initial decoders (theta ~ 0, i.e. "rotated" by chance): two live
    aligned latents and two dead ones give an aligned fraction of 1, not 0.5."""
    import pandas as pd
    from omegaconf import OmegaConf

    from vlmsafe_cli.analysis.crosscoder import summary_rows

    table = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "norm_base": [1.0, 1.0, 1.0, 1.0],
            "norm_compressed": [1.0, 1.0, 0.2, 0.2],
            "rho": [0.5, 0.5, 0.17, 0.17],
            "theta": [0.9, 0.95, 0.05, -0.1],
            "class": ["shared_aligned", "shared_aligned", "shared_rotated", "shared_rotated"],
            "live": [True, True, False, False],
        }
    )
    rows = {
        (r["metric"], r.get("group")): r for r in summary_rows(table, OmegaConf.create({"refusal_top": 2}))
    }
    assert rows["n_live_features", None]["value"] == 2 and rows["n_live_features", None]["n"] == 4
    assert rows["feature_fraction", "shared_aligned"]["value"] == 1.0
    assert rows["feature_fraction", "shared_rotated"]["value"] == 0.0
    assert rows["mean_theta_shared", None]["value"] == pytest.approx(0.925)
    assert rows["median_norm_ratio_shared", None]["value"] == pytest.approx(1.0)
