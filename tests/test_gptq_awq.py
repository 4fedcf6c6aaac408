"""Known answers for GPTQ and AWQ, the propagation AWQ calibrates on, and both methods through the CLI."""

from __future__ import annotations

import pytest
import torch
from helpers import compressed, correlated_inputs, run_job
from omegaconf import OmegaConf
from torch import nn

from vlmsafe_cli.compress import target_linears
from vlmsafe_cli.compress.awq import awq_weight, clipped_quantize, search_scales
from vlmsafe_cli.compress.gptq import gptq_weight
from vlmsafe_cli.compress.layerwise import Hessian, prune_layerwise
from vlmsafe_cli.compress.quantize import bits_per_weight, quantize_dequantize
from vlmsafe_cli.config import CalibrationConfig
from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import get_adapter
from vlmsafe_cli.models.tiny import build_tiny


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    hessian = Hessian(inputs.shape[1], inputs.device)
    hessian.add(inputs)
    return hessian.value()


def output_error(weight: torch.Tensor, quantized: torch.Tensor, inputs: torch.Tensor) -> float:
    """||W X - W' X|| / ||W X|| over the calibration tokens."""
    reference = inputs @ weight.T
    return float((reference - inputs @ quantized.T).norm() / reference.norm())


def layer(seed: int, rows: int = 48, columns: int = 256, tokens: int = 1024):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator), correlated_inputs(tokens, columns, seed=seed)


# -- GPTQ -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [128, 32, -1])
def test_gptq_with_a_diagonal_hessian_is_rtn(group_size):
    """Uncorrelated inputs: H^-1 is diagonal, no column's error can be compensated by another, so GPTQ's
    result is exactly round-to-nearest on the same grids."""
    weight, _ = layer(1)
    hessian = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(
        gptq_weight(weight, hessian, 4, group_size), quantize_dequantize(weight, 4, group_size)
    )


def test_gptq_act_order_with_one_grid_per_row_and_a_diagonal_hessian_is_rtn():
    weight, _ = layer(2)
    hessian = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(2)) + 0.5)
    quantized = gptq_weight(weight, hessian, 4, -1, act_order=True)
    torch.testing.assert_close(quantized, quantize_dequantize(weight, 4, -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_below_rtn_at_the_same_bits_and_group_size(bits, act_order):
    weight, inputs = layer(3)
    quantized = gptq_weight(weight, hessian_of(inputs), bits, 128, act_order=act_order)
    rtn = quantize_dequantize(weight, bits, 128)
    assert output_error(weight, quantized, inputs) < 0.8 * output_error(weight, rtn, inputs)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_weights_lie_on_each_groups_grid(bits):
    """Every (row, group of 128 columns) holds at most 2^bits distinct values, evenly spaced with a zero
    point: (w - w_min) / step is an integer."""
    weight, inputs = layer(4)
    quantized = gptq_weight(weight, hessian_of(inputs), bits, 128)
    for group in quantized.split(128, dim=1):
        for row in group:
            levels = torch.unique(row)
            assert len(levels) <= 2**bits
            steps = levels[1:] - levels[:-1]
            unit = steps.min()
            torch.testing.assert_close(steps / unit, torch.round(steps / unit), rtol=0, atol=1e-3)


def test_gptq_at_8_bits_is_close_and_zeroes_dead_inputs_without_nan():
    weight, inputs = layer(5, columns=64)
    inputs[:, 7] = 0  # a channel that is never active: H_77 = 0
    quantized = gptq_weight(weight, hessian_of(inputs), 8, 32)
    assert torch.isfinite(quantized).all() and torch.all(quantized[:, 7] == 0)
    assert output_error(weight, quantized, inputs) < 0.01


# -- AWQ --------------------------------------------------------------------------------------------------
def test_awq_without_activation_outliers_is_rtn():
    """All channels equally active: every alpha gives s = 1 after normalisation, so without clipping AWQ
    is exactly RTN."""
    weight, inputs = layer(6)
    mean_abs = torch.ones(256)
    unclipped = awq_weight(weight, hessian_of(inputs), mean_abs, 4, 128, clip=False)
    assert torch.equal(unclipped, quantize_dequantize(weight, 4, 128))


def test_awq_protects_a_planted_salient_channel():
    """Inputs with a few channels 30x more active than the rest (the outliers AWQ is about): the search
    picks alpha > 0, gives those channels the largest scales, and cuts the output error well below RTN."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 256, generator=generator)
    inputs = torch.randn(2048, 256, generator=generator)
    salient = torch.tensor([3, 100, 200])
    inputs[:, salient] *= 30
    hessian, mean_abs = hessian_of(inputs), inputs.abs().mean(0)
    scales, alpha = search_scales(weight, hessian, mean_abs, 4, 128)
    assert alpha > 0
    assert set(torch.topk(scales, 3).indices.tolist()) == set(salient.tolist())
    awq = awq_weight(weight, hessian, mean_abs, 4, 128)
    rtn = quantize_dequantize(weight, 4, 128)
    assert output_error(weight, awq, inputs) < 0.7 * output_error(weight, rtn, inputs)


def test_awq_clipping_never_raises_a_groups_output_error():
    """The clip search includes r = 1 (no clipping), so each (row, group)'s output error is at most the
    unclipped one, and strictly lower where clipping helped."""
    weight, inputs = layer(8)
    hessian = hessian_of(inputs)

    def group_errors(quantized: torch.Tensor) -> torch.Tensor:
        delta = weight - quantized
        blocks = [(delta[:, s : s + 128], hessian[s : s + 128, s : s + 128]) for s in (0, 128)]
        return torch.stack([((part @ block) * part).sum(1) for part, block in blocks], dim=1)

    clipped = group_errors(clipped_quantize(weight, hessian, 3, 128))
    unclipped = group_errors(quantize_dequantize(weight, 3, 128))
    assert torch.all(clipped <= unclipped * (1 + 1e-5))
    assert (clipped < unclipped).float().mean() > 0.2


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_error_at_most_rtn_and_gptq_below_both(bits):
    weight, inputs = layer(9)
    hessian, mean_abs = hessian_of(inputs), inputs.abs().mean(0)
    error = {
        "rtn": output_error(weight, quantize_dequantize(weight, bits, 128), inputs),
        "awq": output_error(weight, awq_weight(weight, hessian, mean_abs, bits, 128), inputs),
        "gptq": output_error(weight, gptq_weight(weight, hessian, bits, 128), inputs),
    }
    assert error["gptq"] < error["awq"] < error["rtn"], error


def test_awq_calibrates_each_block_on_the_uncompressed_outputs_before_it():
    """propagate_compressed=False: block 1's statistics see block 0's outputs from before block 0 was
    compressed, i.e. the base model's residual stream entering layer 1."""
    model, processor, family = build_tiny("tiny-llama")
    loaded = LoadedModel("tiny-llama", family, model, processor)
    adapter = get_adapter(loaded)
    calibration = OmegaConf.structured(CalibrationConfig(n_samples=6, seq_len=16))
    from vlmsafe_cli.compress.calibration import calibration_batches

    batches = calibration_batches(loaded, calibration, with_images=False)
    base_layer1 = torch.cat([adapter.residual_stream(batch, layers=[1])[0] for batch in batches])
    seen = []
    hook = adapter.decoder_layers()[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))

    def zero_out(linears: dict[str, nn.Linear], stats: dict) -> None:
        for linear in linears.values():
            linear.weight.zero_()

    linears = target_linears(loaded.model, ["language_model"], ["lm_head", "embed_tokens"])
    first_two = {
        name: linear for name, linear in linears.items() if ".layers.0." in name or ".layers.1." in name
    }
    prune_layerwise(loaded, first_two, calibration, Hessian, zero_out, propagate_compressed=False)
    hook.remove()
    statistics_pass = torch.cat(seen[-len(batches) :])
    torch.testing.assert_close(statistics_pass, base_layer1)


# -- end to end -------------------------------------------------------------------------------------------
# tiny-llama's target matrices per layer (out x in): q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128:
# 28,672 weights in rows of 64 inputs (one group of 128 covers the row) and 8,192 in rows of 128.
TINY_LLAMA_WEIGHTS, TINY_LLAMA_COLUMNS = 36864, 6 * 64 + 128


@pytest.mark.parametrize("compress, bits, column_bits", [("gptq4", 4, 0), ("gptq3", 3, 0), ("awq4", 4, 16)])
def test_gptq_and_awq_on_tiny_llama(cli, tmp_path, monkeypatch, compress, bits, column_bits):
    table = run_job(cli, tmp_path, monkeypatch, "model=tiny-llama", f"compress={compress}")
    scale_zero_bits = 28672 * 32 / 64 + 8192 * 32 / 128  # an fp16 scale and zero per row-group
    expected = bits + (scale_zero_bits + column_bits * TINY_LLAMA_COLUMNS) / TINY_LLAMA_WEIGHTS
    assert compressed(table, "bits_per_weight")["language_model"] == pytest.approx(expected)
    ppl = table[(table.metric == "ppl")].set_index("variant").value
    assert ppl.notna().all() and ppl["compressed"] != ppl["base"]


def test_gptq_act_order_counts_its_column_index(cli, tmp_path, monkeypatch):
    table = run_job(
        cli, tmp_path, monkeypatch, "model=tiny-llama", "compress=gptq4", "compress.act_order=true"
    )
    index_bits = 32 * TINY_LLAMA_COLUMNS / TINY_LLAMA_WEIGHTS  # one int32 group index per input column
    plain = (28672 * bits_per_weight(4, 128, row_length=64) + 8192 * bits_per_weight(4, 128, 128)) / 36864
    assert compressed(table, "bits_per_weight")["language_model"] == pytest.approx(plain + index_bits)


@pytest.mark.parametrize("compress", ["gptq4", "awq4"])
def test_gptq_and_awq_on_every_part_of_a_tiny_vlm(cli, tmp_path, monkeypatch, compress):
    table = run_job(
        cli, tmp_path, monkeypatch, "model=tiny-llava", f"compress={compress}", "compress.target=all"
    )
    bits = compressed(table, "bits_per_weight")
    assert set(bits.index) == {"language_model", "vision_tower", "projector"}
    assert (bits > 4).all() and (
        bits < 6
    ).all()  # 4 bits + scales, zeros (+ AWQ's column scales) of 32-wide rows


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("compress=rtn4", "compress.act_order=true"), "act_order applies to gptq only"),
        (("compress=gptq4", "compress.sparsity=0.5"), "does not apply to gptq"),
        (("compress=awq4", "compress.group_size=null"), "needs compress.bits"),
        (("compress=gptq4", "compress.bits=9"), "out of range"),
    ],
)
def test_gptq_and_awq_settings_are_validated(cli, tmp_path, overrides, message):
    code, _, err = cli("run", "model=tiny-llama", *overrides, f"out_root={tmp_path}")
    assert code == 2 and message in err, err
