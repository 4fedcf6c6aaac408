"""Known answers for Wanda and SparseGPT, the layer-by-layer machinery, and both methods through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compressed, correlated_inputs, run_job
from omegaconf import OmegaConf
from torch import nn

from vlmsafe_cli.compress import target_linears
from vlmsafe_cli.compress.calibration import calibration_batches, image_side, synthetic_scene
from vlmsafe_cli.compress.layerwise import ColumnSquares, Hessian, prune_layerwise
from vlmsafe_cli.compress.magnitude import magnitude_prune
from vlmsafe_cli.compress.masks import kept_mask
from vlmsafe_cli.compress.sparsegpt import sparsegpt_weight
from vlmsafe_cli.compress.wanda import wanda_mask
from vlmsafe_cli.config import CalibrationConfig
from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import get_adapter
from vlmsafe_cli.models.tiny import build_tiny


def pruned_weights(weight: torch.Tensor, inputs: torch.Tensor, method: str, sparsity: float, n_m=None):
    """The weight after pruning one linear layer whose calibration inputs are `inputs` (tokens, in)."""
    if method == "magnitude":
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        magnitude_prune({"linear": linear}, sparsity, n_m)
        return linear.weight.detach()
    if method == "wanda":
        squares = ColumnSquares(weight.shape[1], weight.device)
        squares.add(inputs)
        return weight * wanda_mask(weight, squares.norms(), sparsity, n_m)
    hessian = Hessian(weight.shape[1], weight.device)
    hessian.add(inputs)
    return sparsegpt_weight(weight, hessian.value(), sparsity, n_m)


# -- Wanda ------------------------------------------------------------------------------------------------
def test_wanda_mask_is_weight_times_input_norm_lowest_half_per_row():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 8, generator=generator)
    inputs = torch.randn(40, 8, generator=generator) * torch.tensor([0.1, 5, 1, 0.5, 2, 0.01, 3, 1])
    pruned = pruned_weights(weight, inputs, "wanda", 0.5)
    scores = weight.abs() * inputs.pow(2).sum(0).sqrt()  # S_ij = |W_ij| ||X_j||_2
    for row in range(6):
        lowest = set(scores[row].argsort()[:4].tolist())
        assert {j for j in range(8) if pruned[row, j] == 0} == lowest
        assert torch.equal(pruned[row, scores[row].argsort()[4:]], weight[row, scores[row].argsort()[4:]])


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8)])
def test_wanda_n_m_prunes_the_lowest_scores_of_every_group(n_m):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 16, generator=generator)
    inputs = correlated_inputs(64, 16, seed=1)
    pruned = pruned_weights(weight, inputs, "wanda", 0.0, n_m)
    zeros, group = n_m
    assert torch.all((pruned == 0).reshape(8, -1, group).sum(-1) == zeros)
    scores = (weight.abs() * inputs.norm(dim=0)).reshape(8, -1, group)
    for row in range(8):
        for block in range(16 // group):
            lowest = set(scores[row, block].argsort()[:zeros].tolist())
            assert {j for j in range(group) if pruned[row, block * group + j] == 0} == lowest


def test_wanda_differs_from_magnitude_when_input_scales_differ():
    weight = torch.ones(2, 4)
    inputs = torch.tensor([[1.0, 10.0, 0.1, 5.0]]).repeat(4, 1)
    assert torch.equal(pruned_weights(weight, inputs, "wanda", 0.5)[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))


# -- SparseGPT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(n_m):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 256, generator=generator)  # two SparseGPT blocks of 128 columns
    inputs = correlated_inputs(1024, 256, seed=2)
    reference = inputs @ weight.T
    error = {
        method: (reference - inputs @ pruned_weights(weight, inputs, method, 0.5, n_m).T).norm().item()
        for method in ("magnitude", "wanda", "sparsegpt")
    }
    for method in error:
        pruned = pruned_weights(weight, inputs, method, 0.5, n_m)
        assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=0.005), method
    assert error["sparsegpt"] < error["wanda"] < error["magnitude"], error


def test_sparsegpt_with_zero_sparsity_leaves_the_weight_unchanged():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 160, generator=generator)
    assert torch.equal(pruned_weights(weight, correlated_inputs(256, 160, seed=3), "sparsegpt", 0.0), weight)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 64, generator=generator)
    hessian = 2 * torch.eye(64)  # white inputs: no correlations, so no error to compensate
    unstructured = sparsegpt_weight(weight, hessian, 0.5, None)
    assert torch.equal(unstructured, weight * kept_mask(weight.abs(), 0.5, None, per_row=True))
    semi_structured = sparsegpt_weight(weight, hessian, 0.0, (2, 4))
    assert torch.equal(semi_structured, pruned_weights(weight, None, "magnitude", 0.0, (2, 4)))


def test_sparsegpt_zeroes_dead_inputs_without_nan():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 32, generator=generator)
    inputs = correlated_inputs(128, 32, seed=5)
    inputs[:, 3] = 0  # a channel that is never active: H_33 = 0
    pruned = pruned_weights(weight, inputs, "sparsegpt", 0.5)
    assert torch.isfinite(pruned).all() and torch.all(pruned[:, 3] == 0)


# -- layer by layer ---------------------------------------------------------------------------------------
def tiny(name: str) -> LoadedModel:
    model, processor, family = build_tiny(name)
    return LoadedModel(name, family, model, processor)


def test_later_blocks_are_calibrated_on_the_pruned_blocks_before_them():
    loaded = tiny("tiny-llama")
    adapter = get_adapter(loaded)
    blocks = adapter.decoder_layers()
    calibration = OmegaConf.structured(CalibrationConfig(n_samples=20, seq_len=24))
    batches = calibration_batches(loaded, calibration, with_images=False)
    base_layer1 = [adapter.residual_stream(batch, layers=[1])[0] for batch in batches]

    records: dict[str, list] = {"model": [], "inputs_0": [], "outputs_0": [], "inputs_1": [], "pruned": []}
    handles = [
        loaded.model.register_forward_pre_hook(lambda module, args: records["model"].append(1)),
        blocks[0].register_forward_pre_hook(lambda module, args: records["inputs_0"].append(args[0])),
        blocks[0].register_forward_hook(lambda module, args, output: records["outputs_0"].append(output)),
        blocks[1].register_forward_pre_hook(lambda module, args: records["inputs_1"].append(args[0])),
    ]

    def prune_stub(linears: dict[str, nn.Linear], stats: dict) -> None:
        """Record which linears were pruned together, then magnitude-prune them."""
        assert set(stats) == set(linears)
        records["pruned"].append(sorted(linears))
        magnitude_prune(linears, 0.5, None)

    linears = target_linears(loaded.model, ["language_model"], ["lm_head", "embed_tokens"])
    prune_layerwise(loaded, linears, calibration, ColumnSquares, prune_stub)
    for handle in handles:
        handle.remove()

    # 20 samples in batches of 8: three forwards of the model (the capture), not twenty
    assert len(batches) == 3 and records["model"] == [1, 1, 1]
    assert [names[0].split(".")[2] for names in records["pruned"]] == ["0", "1"]
    # block 0 is called 3 x 3 times: capture (skipped, identity), statistics (stopped early), pruned pass;
    # block 1 by the capture (its pre-hook stops the forward) and its statistics pass (the last one needed)
    assert len(records["inputs_0"]) == 9 and len(records["outputs_0"]) == 6
    assert len(records["inputs_1"]) == 6
    pruned_outputs, seen_by_1 = records["outputs_0"][3:], records["inputs_1"][3:]
    assert [len(hidden) for hidden in seen_by_1] == [8, 8, 4]
    for output, seen, base in zip(pruned_outputs, seen_by_1, base_layer1, strict=True):
        assert torch.equal(seen, output)
        assert not torch.allclose(seen, base, atol=1e-3)  # block 0 was pruned before block 1 saw it
    # and block 1's inputs are what the final pruned model feeds it
    for batch, seen in zip(batches, seen_by_1, strict=True):
        torch.testing.assert_close(adapter.residual_stream(batch, layers=[1])[0], seen)


def test_linears_reading_one_input_share_its_statistic():
    loaded = tiny("tiny-llama")
    shared = {}

    def prune_stub(linears: dict[str, nn.Linear], stats: dict) -> None:
        shared.update({name.rsplit(".", 1)[1]: id(stats[name]) for name in linears})

    linears = target_linears(loaded.model, ["language_model"], ["lm_head", "embed_tokens"])
    calibration = OmegaConf.structured(CalibrationConfig(n_samples=4, seq_len=16))
    prune_layerwise(loaded, linears, calibration, Hessian, prune_stub)
    assert shared["q_proj"] == shared["k_proj"] == shared["v_proj"] != shared["o_proj"]
    assert shared["gate_proj"] == shared["up_proj"] != shared["down_proj"]


def test_image_calibration_is_deterministic_and_sized_for_the_processor():
    import random

    loaded = tiny("tiny-qwen2vl")
    assert image_side(loaded.processor.image_processor) == 56
    first, second = synthetic_scene(56, random.Random(7)), synthetic_scene(56, random.Random(7))
    assert first[1] == second[1] and first[0].tobytes() == second[0].tobytes()
    calibration = OmegaConf.structured(CalibrationConfig(n_samples=10))
    batches = calibration_batches(loaded, calibration, with_images=True)
    assert [len(batch["input_ids"]) for batch in batches] == [8, 2] and "pixel_values" in batches[0]


# -- end to end -------------------------------------------------------------------------------------------
def test_wanda50_on_tiny_llama(cli, tmp_path, monkeypatch):
    table = run_job(cli, tmp_path, monkeypatch, "model=tiny-llama", "compress=wanda50")
    assert compressed(table, "sparsity_actual").to_dict() == {"language_model": 0.5}


def test_sparsegpt_2of4_on_tiny_llama(cli, tmp_path, monkeypatch):
    table = run_job(cli, tmp_path, monkeypatch, "model=tiny-llama", "compress=sparsegpt_2of4")
    assert compressed(table, "sparsity_actual").to_dict() == {"language_model": 0.5}
    assert compressed(table, "n_m_valid").tolist() == [1.0]


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2vl"])
def test_wanda50_on_every_part_of_a_tiny_vlm(cli, tmp_path, monkeypatch, model):
    table = run_job(cli, tmp_path, monkeypatch, f"model={model}", "compress=wanda50", "compress.target=all")
    sparsity = compressed(table, "sparsity_actual")
    assert set(sparsity.index) == {"language_model", "vision_tower", "projector"}
    assert (sparsity - 0.5).abs().max() <= 0.005


CALIBRATED = ("wanda", "sparsegpt", "gptq", "awq")
ISSUE_METHODS = {  # the compress options the compression issue names
    "none", "magnitude50", "wanda50", "sparsegpt50", "magnitude_2of4", "wanda_2of4", "sparsegpt_2of4",
    "wanda_4of8", "int8", "nf4", "fp4", "gptq4", "gptq3", "awq4", "rtn4", "rtn8",
}  # fmt: skip
CONF_COMPRESS = Path(__file__).resolve().parents[1] / "conf" / "compress"


def test_every_compress_option_of_the_issue_exists():
    assert {path.stem for path in CONF_COMPRESS.glob("*.yaml")} == ISSUE_METHODS


@pytest.mark.parametrize("name", sorted(ISSUE_METHODS))
def test_compress_configs_validate(name):
    from vlmsafe_cli.config import VlmsafeConfig, validate

    path = CONF_COMPRESS / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    model = {"name": "tiny-llama", "family": "llama", "source": "tiny"}
    compress = OmegaConf.load(path)
    cfg = OmegaConf.merge(OmegaConf.structured(VlmsafeConfig), {"model": model, "compress": compress})
    validate(cfg)
    assert cfg.compress.name == name
    if cfg.compress.method in CALIBRATED:  # the issue's calibration: 64 samples of 256 tokens
        assert (cfg.compress.calibration.n_samples, cfg.compress.calibration.seq_len) == (64, 256)


def test_calibrated_pruning_without_sparsity_is_a_user_error(cli, tmp_path):
    code, _, err = cli(
        "run", "model=tiny-llama", "compress=wanda50", "compress.sparsity=0", f"out_root={tmp_path}"
    )
    assert code == 2 and "prunes nothing" in err
