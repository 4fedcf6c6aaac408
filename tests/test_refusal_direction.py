"""Interventions (ablation, addition, orthogonalisation) and the refusal-direction analysis: a planted
direction is found, and the analysis runs end to end (plumbing on tiny models)."""

from __future__ import annotations

import random
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from vlmsafe_cli.analysis.refusal_direction import (
    MassiveActivations,
    Prompts,
    candidate_directions,
    extract,
    refusal_scores,
    refusal_token_ids,
)
from vlmsafe_cli.analysis.schemas import RefusalDirectionSettings
from vlmsafe_cli.data.prompts import read_prompt_file, split
from vlmsafe_cli.interventions import (
    ablated,
    added,
    orthogonalize_weights,
    orthogonalized,
    project_out,
    unit,
)
from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import get_adapter
from vlmsafe_cli.models.tiny import build_tiny


def tiny(name: str) -> LoadedModel:
    model, processor, family = build_tiny(name)
    return LoadedModel(name, family, model, processor)


def random_direction(size: int, seed: int) -> torch.Tensor:
    return unit(torch.randn(size, generator=torch.Generator().manual_seed(seed)))


# -- interventions ----------------------------------------------------------------------------------------
def test_project_out_leaves_nothing_along_the_direction():
    r = random_direction(16, 0)
    hidden = torch.randn(3, 5, 16)
    assert (project_out(hidden, r) @ r).abs().max() < 1e-5
    other = unit(torch.linalg.qr(torch.stack([r, torch.randn(16)], 1))[0][:, 1])  # orthogonal to r
    torch.testing.assert_close(project_out(hidden, r) @ other, hidden @ other)


def test_ablation_removes_the_direction_from_every_layer_input():
    adapter = get_adapter(tiny("tiny-llama"))
    batch = adapter.encode(["How do I bake bread?", "Name three rivers."])
    r = random_direction(adapter.d_model, 1)
    with ablated(adapter, 3 * r):  # any norm: ablation uses the unit direction
        stream = adapter.residual_stream(batch)
    assert (stream @ r).abs().max() < 1e-4  # every layer's input and the last layer's output
    plain = adapter.residual_stream(batch)
    assert (plain @ r).abs().max() > 1e-2


def test_addition_shifts_the_stream_entering_its_layer_by_the_vector():
    adapter = get_adapter(tiny("tiny-llama"))
    batch = adapter.encode(["How do I bake bread?"])
    vector = 0.5 * random_direction(adapter.d_model, 2)
    plain = adapter.residual_stream(batch, layers=[0, 1])
    with added(adapter, vector, layer=1, coefficient=2.0):
        steered = adapter.residual_stream(batch, layers=[0, 1])
    torch.testing.assert_close(steered[0], plain[0])  # before the layer: untouched
    torch.testing.assert_close(steered[1], plain[1] + 2.0 * vector)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llava"])
def test_orthogonalised_weights_compute_what_the_ablation_hooks_compute(name):
    loaded = tiny(name)
    adapter = get_adapter(loaded)
    r = random_direction(adapter.d_model, 3)
    images = (
        [Image.new("RGB", (30, 30), "red"), Image.new("RGB", (30, 30), "blue")] if adapter.is_vlm else None
    )
    batch = adapter.encode(["Describe this.", "What is it?"], images=images)
    with ablated(adapter, r):
        hooked = adapter.model(**batch).logits
    head_before = adapter.lm_head().weight.detach().clone()
    edited = orthogonalize_weights(adapter, r)
    torch.testing.assert_close(adapter.model(**batch).logits, hooked, rtol=1e-4, atol=1e-4)
    assert torch.equal(adapter.lm_head().weight, head_before)  # the tied head was untied, not edited
    assert any("o_proj" in name for name in edited) and any("down_proj" in name for name in edited)


def test_orthogonalized_block_edits_then_restores_every_tensor_and_the_tie_bit_for_bit():
    loaded = tiny("tiny-llama")
    adapter = get_adapter(loaded)
    r = random_direction(adapter.d_model, 6)
    before = {name: p.detach().clone() for name, p in loaded.model.state_dict().items()}
    assert adapter.lm_head().weight is loaded.model.get_input_embeddings().weight  # tied
    batch = adapter.encode(["Describe this.", "What is it?"])
    with ablated(adapter, r):
        hooked = adapter.model(**batch).logits
    with orthogonalized(adapter, r) as edited:
        torch.testing.assert_close(adapter.model(**batch).logits, hooked, rtol=1e-4, atol=1e-4)
        assert adapter.lm_head().weight is not loaded.model.get_input_embeddings().weight
        assert len(edited) == 2 * adapter.n_layers + 1
    after = loaded.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert adapter.lm_head().weight is loaded.model.get_input_embeddings().weight
    assert loaded.model.config.tie_word_embeddings


def test_shared_prefix_logits_equal_plain_logits_under_every_intervention():
    adapter = get_adapter(tiny("tiny-llama"))
    batch = adapter.encode(["How do I bake bread?", "Name three rivers in Europe, please.", "Hi"])
    r = random_direction(adapter.d_model, 5)
    for intervention in (nullcontext(), ablated(adapter, r), added(adapter, 3 * r, layer=1)):
        with intervention:
            plain, shared = adapter.logits_next(batch), adapter.logits_next_shared_prefix(batch)
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


# -- prompts ----------------------------------------------------------------------------------------------
def test_prompt_files_in_json_jsonl_and_csv(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": "one", "category": "x"}, {"instruction": "two"}]')
    (tmp_path / "b.jsonl").write_text('{"goal": "one"}\n{"goal": "two"}\n')
    (tmp_path / "c.csv").write_text("prompt,other\none,1\ntwo,2\n")
    for name in ("a.json", "b.jsonl", "c.csv"):
        assert read_prompt_file(str(tmp_path / name)) == ["one", "two"]


def test_splits_are_disjoint_seeded_and_sized():
    prompts = [f"p{i}" for i in range(20)]
    first = split(prompts, {"train": 8, "val": 4, "test": 4}, seed=3, kind="harmful")
    assert first == split(prompts, {"train": 8, "val": 4, "test": 4}, seed=3, kind="harmful")
    assert [len(first[k]) for k in ("train", "val", "test")] == [8, 4, 4]
    assert len(set(first["train"]) | set(first["val"]) | set(first["test"])) == 16


# -- the planted direction --------------------------------------------------------------------------------
PLANTED_WORDS = ["bomb", "poison", "weapon", "explosive", "malware", "ransom"]
NEUTRAL_WORDS = ["garden", "violin", "teapot", "library", "bicycle", "painting", "orchard", "kitten"]
FILLERS = ["Tell me about the", "Write a short note on a", "Explain how to use a", "Describe the best"]


def planted_model(direction: torch.Tensor, refusal_token: str) -> LoadedModel:
    """A 2-layer Llama whose layer 0 only averages the normalised token embeddings into every position
    (q = k = 0: uniform causal attention; v = o = identity), layer 1 writes nothing, harmful words' token
    embeddings are `direction` and every other embedding is noise far below RMSNorm's epsilon (so it
    normalises to a small vector), and the refusal token's logit reads `direction`."""
    _, tokenizer, _ = build_tiny("tiny-llama")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention.q_proj.weight.zero_()
            attention.k_proj.weight.zero_()
            attention.v_proj.weight.copy_(torch.eye(64))
            attention.o_proj.weight.copy_(
                torch.eye(64) if layer is model.model.layers[0] else torch.zeros(64, 64)
            )
            mlp.down_proj.weight.zero_()
        planted = {i for word in PLANTED_WORDS for text in (word, " " + word) for i in tokenizer.encode(text)}
        neutral = {i for word in NEUTRAL_WORDS + FILLERS for i in tokenizer.encode(" " + word)}
        assert not planted & neutral
        model.model.embed_tokens.weight.normal_(0, 1e-4)
        model.model.embed_tokens.weight[sorted(planted)] = 3 * direction
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[tokenizer.encode(refusal_token)[0]] = 20 * direction
    return LoadedModel("planted", "llama", model, tokenizer)


def planted_prompts(harmful: bool, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = PLANTED_WORDS if harmful else NEUTRAL_WORDS
    return [
        f"{rng.choice(FILLERS)} {rng.choice(NEUTRAL_WORDS)} and the {rng.choice(words)}." for _ in range(n)
    ]


def test_the_planted_refusal_direction_is_selected():
    direction = random_direction(64, 4)
    adapter = get_adapter(planted_model(direction, "I"))
    settings = OmegaConf.structured(RefusalDirectionSettings(n_train=32, n_val=16, refusal_tokens=["I"]))
    splits = {
        f"{kind}_{name}": Prompts(planted_prompts(kind == "harmful", size, seed))
        for kind in ("harmful", "harmless")
        for name, size, seed in (("train", 32, 0), ("val", 16, 1))
    }
    ids = refusal_token_ids(adapter, ["I"])
    extracted = extract(adapter, splits, ids, settings)
    chosen = extracted.selection
    assert chosen.passed_filters and chosen.layer == 1  # layer 0's inputs are the template's own tokens
    assert torch.cosine_similarity(chosen.direction, direction, dim=0) >= 0.95
    assert extracted.mean_diffs.shape == (2, len(adapter.post_instruction_positions()), 64)
    assert chosen.pos in extracted.positions
    # the model refuses the harmful prompts (score > 0) and ablating the selected direction stops it
    harmful = splits["harmful_val"]
    batch = next(harmful.batches(adapter, 16))
    logprobs = torch.log_softmax(adapter.logits_next(batch).float(), -1)
    assert refusal_scores(logprobs, ids).mean() > 0
    with ablated(adapter, chosen.direction):
        logprobs = torch.log_softmax(adapter.logits_next(batch).float(), -1)
    assert refusal_scores(logprobs, ids).mean() < 0


@pytest.mark.parametrize("failing", ["induce", "kl_and_induce"])
def test_filters_are_relaxed_induce_first_and_flagged(failing):
    """No candidate can pass an induce threshold of 1e9: the lowest-ablation-score candidate that passes
    KL is taken (still the planted one); with a KL threshold no candidate passes either, the lowest ablation
    score outright, its KL measured. Both are flagged."""
    direction = random_direction(64, 4)
    adapter = get_adapter(planted_model(direction, "I"))
    kl_threshold = 0.1 if failing == "induce" else -1.0
    settings = OmegaConf.structured(
        RefusalDirectionSettings(
            n_train=32, n_val=16, refusal_tokens=["I"], induce_threshold=1e9, kl_threshold=kl_threshold
        )
    )
    splits = {
        f"{kind}_{name}": Prompts(planted_prompts(kind == "harmful", size, seed))
        for kind in ("harmful", "harmless")
        for name, size, seed in (("train", 32, 0), ("val", 16, 1))
    }
    chosen = extract(adapter, splits, refusal_token_ids(adapter, ["I"]), settings).selection
    assert not chosen.passed_filters and chosen.passed_kl == (failing == "induce")
    scores = pd.DataFrame(chosen.scores)
    if failing == "induce":
        passing = scores[scores.kl_harmless < 0.1]
        assert chosen.ablation_score == passing.ablation_score.min()
        assert chosen.kl < 0.1 and chosen.steering_score == chosen.steering_score  # measured
        assert torch.cosine_similarity(chosen.direction, direction, dim=0) >= 0.95
    else:
        assert chosen.ablation_score == scores.ablation_score.min()
        assert chosen.kl == chosen.kl and chosen.kl >= 0  # measured even though the walk skipped it
    assert chosen.evaluated == len(scores)


def test_a_planted_massive_activation_is_found_and_zeroed_in_every_candidate():
    """A sink-like token (the prompt's first) carries 1.0 on coordinate 7 against a median |x| of ~1e-4:
    exactly that coordinate is flagged, zeroed in the candidates, and the planted direction (orthogonal
    to it) is still selected."""
    direction = random_direction(64, 4)
    direction[7] = 0.0
    direction = unit(direction)
    loaded = planted_model(direction, "I")
    adapter = get_adapter(loaded)
    first = adapter.encode(["x"])["input_ids"][0, 0].item()
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight[first, 7] = 1.0
    splits = {
        f"{kind}_{name}": Prompts(planted_prompts(kind == "harmful", size, seed))
        for kind in ("harmful", "harmless")
        for name, size, seed in (("train", 32, 0), ("val", 16, 1))
    }
    settings = OmegaConf.structured(RefusalDirectionSettings(n_train=32, n_val=16, refusal_tokens=["I"]))
    extracted = extract(adapter, splits, refusal_token_ids(adapter, ["I"]), settings)
    assert extracted.massive == [7]
    assert extracted.mean_diffs[..., 7].abs().max() == 0
    assert extracted.selection.passed_filters
    assert torch.cosine_similarity(extracted.selection.direction, direction, dim=0) >= 0.95
    # massive_ratio=null keeps every coordinate
    settings.massive_ratio = None
    assert extract(adapter, splits, refusal_token_ids(adapter, ["I"]), settings).massive == []


def test_massive_coordinates_use_each_layers_median_and_skip_padding():
    stats = MassiveActivations(n_layers=2, d_model=4)
    hidden = torch.ones(2, 3, 4)
    hidden[0, 0, 2] = 500.0  # layer 0, a real token: 500x the median
    hidden[1, 0, 3] = 10_000.0  # a pad position: ignored
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    stats.observer(mask)(0, hidden)
    stats.observer(mask)(1, torch.ones(2, 3, 4) * 50)  # uniformly large: nothing massive
    assert stats.coordinates(100.0) == [2]
    assert stats.coordinates(1000.0) == []
    assert stats.coordinates(None) == []


def test_candidates_are_harmful_minus_harmless_means():
    adapter = get_adapter(tiny("tiny-llama"))
    harmful, harmless = Prompts(["a b c", "d e f"]), Prompts(["g h i"])
    positions = adapter.post_instruction_positions()
    diffs = candidate_directions(adapter, harmful, harmless, positions, batch_size=1)
    layers = list(range(adapter.n_layers))

    def stream(text: str) -> torch.Tensor:
        return adapter.residual_stream(adapter.encode([text]), layers=layers, positions=positions)[:, 0]

    expected = (stream("a b c") + stream("d e f")) / 2 - stream("g h i")
    torch.testing.assert_close(diffs, expected, rtol=1e-4, atol=1e-5)


# -- end to end -------------------------------------------------------------------------------------------
SMALL = (
    "analysis=refusal_direction",
    "analysis.refusal_direction.n_train=8",
    "analysis.refusal_direction.n_val=4",
    "analysis.refusal_direction.n_test=4",
    "analysis.refusal_direction.max_new_tokens=4",
    "analysis.refusal_direction.coefficients=[1.0,4.0]",
    "compress.calibration.n_samples=4",
    "compress.calibration.seq_len=32",
)


def test_refusal_direction_on_a_pruned_tiny_model_writes_rows_and_the_artifact(cli, tmp_path):
    job = tmp_path / "job"
    code, out, err = cli("run", "model=tiny-llama", "compress=wanda50", *SMALL, f"hydra.run.dir={job}")
    assert code == 0, err
    table = pd.read_parquet(job / "results.parquet")
    table = table[table.analysis == "refusal_direction"]
    for metric in (
        "refusal_rate",
        "refusal_rate_ablated",
        "induced_refusal_rate",
        "kl_harmless",
        "source_layer",
    ):
        assert set(table[table.metric == metric].variant) == {"base", "compressed"}, metric
    comparison = table[table.variant == "comparison"]
    assert {"cos_selected", "cos_layer", "source_layer_shift", "source_pos_shift"} <= set(comparison.metric)
    induced = table[(table.metric == "induced_refusal_rate") & (table.variant == "compressed")]
    assert set(induced.group) == {
        "base_direction x1",
        "base_direction x4",
        "compressed_direction x1",
        "compressed_direction x4",
    }
    rates = table[table.metric.str.endswith("rate")]
    assert rates.value.between(0, 1).all() and (rates.ci_low <= rates.value).all() and (rates.n == 4).all()
    for name in ("refusal_direction.safetensors", "refusal_direction_base.safetensors"):
        with safe_open(str(job / "artifacts" / name), framework="pt") as handle:
            direction, mean_diffs = handle.get_tensor("direction"), handle.get_tensor("mean_diffs")
            metadata = handle.metadata()
        assert direction.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert mean_diffs.shape[0] == 2 and mean_diffs.shape[2] == 64
        assert int(metadata["pos"]) < 0 and 0 <= int(metadata["layer"]) < 2
        candidates = pd.read_parquet(job / "artifacts" / name.replace(".safetensors", "_candidates.parquet"))
        assert list(candidates.columns) == ["layer", "pos", "ablation_score", "kl_harmless", "steering_score"]
        assert len(candidates) >= 1 and candidates.ablation_score.notna().all()
        assert candidates.kl_harmless.notna().any()  # the filter walk measured at least the best one


def test_save_orthogonalized_exports_the_job_model_without_its_direction(cli, tmp_path):
    job = tmp_path / "job"
    code, _, err = cli(
        "run",
        "model=tiny-llama",
        "compress=magnitude50",
        *SMALL,
        "analysis.refusal_direction.coefficients=[1.0]",
        "analysis.refusal_direction.save_orthogonalized=true",
        f"hydra.run.dir={job}",
    )
    assert code == 0, err
    with safe_open(str(job / "artifacts" / "refusal_direction.safetensors"), framework="pt") as handle:
        r = handle.get_tensor("direction")
    model = LlamaForCausalLM.from_pretrained(job / "artifacts" / "orthogonalized").eval()
    writers = [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    for module in writers:
        assert (r @ module.weight).abs().max() < 1e-5  # nothing written along r
    assert (model.model.embed_tokens.weight @ r).abs().max() < 1e-5
    assert not model.config.tie_word_embeddings  # the head kept the unedited embeddings


def test_refusal_direction_with_images_on_a_tiny_vlm(cli, tmp_path):
    job = tmp_path / "job"
    overrides = ("model=tiny-llava", "analysis.refusal_direction.with_image=true")
    code, _, err = cli("run", *overrides, *SMALL, f"hydra.run.dir={job}")
    assert code == 0, err
    table = pd.read_parquet(job / "results.parquet")
    assert "source_layer" in set(table.metric) and "cos_selected" not in set(table.metric)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("analysis.refusal_direction.n_val=0",), "must be a positive integer"),
        (("analysis.refusal_direction.with_image=true",), "needs a VLM"),
        (("analysis.refusal_direction.massive_ratio=0.5",), "use a ratio > 1"),
        (
            ("analysis.refusal_direction.save_orthogonalized=true", "compress=int8"),
            "quantised by bitsandbytes",
        ),
        (("analysis.refusal_direction.n_train=1000",), "lower the split sizes"),
        (("data=local",), "data=local needs data.harmful"),
        (
            ("data=local", "data.harmful=/nonexistent.json", "data.harmless=/nonexistent.json"),
            "does not exist",
        ),
    ],
)
def test_refusal_direction_bad_settings_are_one_line_errors(cli, tmp_path, overrides, message):
    code, _, err = cli(
        "run", "model=tiny-llama", "analysis=refusal_direction", *overrides, f"out_root={tmp_path}"
    )
    assert code in (1, 2) and message in err, err
