"""Weight quantization: RTN known answers, bitsandbytes int8/NF4 on tiny models, rows, export, validation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from vlmsafe_cli.compress import compress_model, part_of, run_method, target_linears
from vlmsafe_cli.compress.bnb import is_bnb_linear
from vlmsafe_cli.compress.quantize import bits_per_weight, quantize_dequantize
from vlmsafe_cli.config import TARGETS, CompressConfig, ModelConfig, hashed_config
from vlmsafe_cli.models import LoadedModel, load_model, model_identity
from vlmsafe_cli.models.adapter import get_adapter

CPU = torch.device("cpu")
PPL = ("compress.ppl_samples=4", "compress.ppl_seq_len=64")  # small but real perplexity windows


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A per-test VLMSAFE_CACHE holding only the converted tokenizer (keyed by the GGUF file, never stale)."""
    from vlmsafe_cli.cache import cache_root
    from vlmsafe_cli.models.smollm2 import smollm2_tokenizer

    smollm2_tokenizer()  # built once in the session cache
    cache = tmp_path / "cache"
    shutil.copytree(cache_root() / "tokenizers", cache / "tokenizers")
    monkeypatch.setenv("VLMSAFE_CACHE", str(cache))
    return cache


def tiny(name: str, family: str) -> LoadedModel:
    cfg = OmegaConf.structured(ModelConfig(name=name, family=family, source="tiny"))
    return load_model(cfg, CPU, seed=0)


def compress_cfg(**settings):
    return OmegaConf.structured(CompressConfig(name="test", **settings))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


def read_table(job_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(job_dir / "results.parquet")


# -- RTN known answers --------------------------------------------------------------------------------------
def test_rtn_2_and_4_bit_grids_by_hand():
    row = torch.tensor([[-1.0, -0.2, 0.13, 0.6, 1.4, 2.0]])
    # range [-1, 2]; 2 bits: scale 3/3 = 1, zero round(1/1) = 1 -> grid {-1, 0, 1, 2}
    expected_2bit = torch.tensor([[-1.0, 0.0, 0.0, 1.0, 1.0, 2.0]])
    assert torch.allclose(quantize_dequantize(row, 2, -1), expected_2bit)
    # 4 bits: scale 3/15 = 0.2, zero 5 -> grid -1.0, -0.8, ..., 2.0; 0.13 -> 0.2
    expected_4bit = torch.tensor([[-1.0, -0.2, 0.2, 0.6, 1.4, 2.0]])
    assert torch.allclose(quantize_dequantize(row, 4, -1), expected_4bit, atol=1e-6)


def test_rtn_groups_and_a_trailing_partial_group_get_their_own_grid():
    row = torch.tensor([[-1.0, -0.2, 0.13, 2.0, 0.0, 0.04, 0.16, 0.3, 1.0, -0.5]])
    # group 1: range [-1, 2] -> grid {-1, 0, 1, 2}; group 2: [0, 0.3] -> scale 0.1, zero 0 -> {0, .1, .2, .3};
    # the last two weights: [-0.5, 1] -> scale 0.5, zero 1 -> {-0.5, 0, 0.5, 1}
    expected = torch.tensor([[-1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.2, 0.3, 1.0, -0.5]])
    assert torch.allclose(quantize_dequantize(row, 2, 4), expected, atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 32), (4, 64), (8, -1)])
def test_rtn_levels_error_bound_and_zeros(bits, group_size):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(8, 64, generator=generator)
    weight[0, :5] = 0.0
    quantized = quantize_dequantize(weight, bits, group_size)
    size = 64 if group_size == -1 else group_size
    groups, original = quantized.reshape(8, -1, size), weight.reshape(8, -1, size)
    for values in groups.reshape(-1, size):
        assert values.unique().numel() <= 2**bits
    scale = (original.amax(-1).clamp(min=0) - original.amin(-1).clamp(max=0)) / (2**bits - 1)
    assert torch.all((groups - original).abs().amax(-1) <= scale / 2 + 1e-6)
    assert torch.all(quantized[0, :5] == 0), "zero is on every grid: pruned weights stay pruned"
    assert quantized.dtype == weight.dtype and quantized.shape == weight.shape


def test_bits_per_weight_counts_an_fp16_scale_and_zero_per_group():
    assert bits_per_weight(4, 128) == 4.25
    assert bits_per_weight(8, 32) == 9.0
    assert bits_per_weight(4, -1, row_length=64) == 4.5
    assert bits_per_weight(4, 128, row_length=576) == 4 + 32 * 5 / 576  # ceil(576 / 128) = 5 groups
    with pytest.raises(ValueError):
        bits_per_weight(4, -1)


# -- bitsandbytes on tiny models -------------------------------------------------------------------------
def test_int8_and_nf4_stay_close_to_fp32_and_hooks_fire():
    ids = torch.randint(0, 49000, (4, 32), generator=torch.Generator().manual_seed(0))
    base = tiny("tiny-llama", "llama")
    with torch.no_grad():
        reference = base.model(input_ids=ids).logits
    errors = {}
    for name, settings in {
        "int8": {"method": "bnb", "bits": 8},
        "nf4": {"method": "bnb", "bits": 4, "quant_type": "nf4"},
        "rtn4": {"method": "rtn", "bits": 4, "group_size": 64},  # same block size as bitsandbytes 4-bit
    }.items():
        loaded = tiny("tiny-llama", "llama")
        run_method(loaded, compress_cfg(**settings))
        with torch.no_grad():
            errors[name] = relative_error(loaded.model(input_ids=ids).logits, reference)
        if name == "nf4":
            quantized = loaded
    assert errors["int8"] < 0.02, errors
    assert errors["nf4"] < 0.15, errors  # random N(0, 0.02) weights: 4-bit costs ~10% of the logits
    assert 0.5 < errors["nf4"] / errors["rtn4"] < 2, errors  # two independent 4-bit codes agree

    adapter = get_adapter(quantized)
    o_proj = adapter.residual_writers(0)["attn"]
    assert is_bnb_linear(o_proj) and type(o_proj).__name__ == "Linear4bit"
    calls = []
    handle = o_proj.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    batch = adapter.encode(["How do I bake bread?"])
    stream = adapter.residual_stream(batch)
    handle.remove()
    assert calls and stream.shape[0] == adapter.n_layers + 1 and torch.isfinite(stream).all()
    with adapter.hook_layer_input(1, lambda hidden: torch.zeros_like(hidden)):
        ablated = adapter.logits_next(batch)
    assert not torch.allclose(ablated, adapter.logits_next(batch)), "a replacing hook changes the output"


def test_nf4_on_the_language_model_keeps_the_vision_tower_fp32():
    loaded = tiny("tiny-llava", "llava")
    run_method(loaded, compress_cfg(method="bnb", bits=4, quant_type="nf4", target="language_model"))
    kinds: dict[str, set[str]] = {}
    for name, module in loaded.model.named_modules():
        if isinstance(module, nn.Linear):
            kinds.setdefault("lm_head" if name == "lm_head" else part_of(name), set()).add(
                type(module).__name__
            )
    assert kinds["language_model"] == {"Linear4bit"}
    assert kinds["vision_tower"] == {"Linear"} and kinds["projector"] == {"Linear"}
    assert kinds["lm_head"] == {"Linear"}  # in compress.skip
    vision = [p for name, p in loaded.model.named_parameters() if part_of(name) == "vision_tower"]
    assert vision and all(param.dtype == torch.float32 for param in vision)


@pytest.mark.parametrize("name,family", [("tiny-paligemma", "paligemma"), ("tiny-qwen2vl", "qwen2vl")])
def test_nf4_on_every_part_of_other_vlms(name, family):
    loaded = tiny(name, family)
    comp = compress_cfg(method="bnb", bits=4, quant_type="nf4", target="all")
    targets = target_linears(loaded.model, list(TARGETS), list(comp.skip))
    run_method(loaded, comp)
    quantized = {module_name for module_name, m in loaded.model.named_modules() if is_bnb_linear(m)}
    # SigLIP's pooling head uses nn.MultiheadAttention, whose out_proj (a Linear subclass) bnb cannot swap
    assert quantized == {module_name for module_name, m in targets.items() if type(m) is nn.Linear}
    assert {part_of(module_name) for module_name in quantized} == set(TARGETS)


@pytest.mark.slow
def test_smollm2_perplexity_rises_as_bits_fall():
    from vlmsafe_cli.compress.perplexity import evaluation_windows, window_nlls

    model_cfg = OmegaConf.structured(ModelConfig(name="smollm2", family="llama", source="smollm2"))
    loaded = load_model(model_cfg, CPU, seed=0)
    windows = evaluation_windows(loaded, compress_cfg(ppl_samples=4, ppl_seq_len=128), seed=0)
    original = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    ppl = {}
    for bits in (None, 8, 4, 3):
        if bits is not None:
            loaded.model.load_state_dict(original, strict=False)  # back to the base weights
            run_method(loaded, compress_cfg(method="rtn", bits=bits, group_size=128))
        ppl[bits] = math.exp(sum(window_nlls(loaded, windows)) / len(windows))
    assert abs(ppl[8] / ppl[None] - 1) < 0.01, ppl
    assert ppl[None] < ppl[4] < ppl[3], ppl


# -- end to end through the CLI ------------------------------------------------------------------------------
def test_rtn4_end_to_end_rows(cli, tmp_path, fresh_cache):
    job_dir = tmp_path / "job"
    code, out, err = cli("run", "model=tiny-llama", "compress=rtn4", *PPL, f"hydra.run.dir={job_dir}")
    assert code == 0, out + err
    table = read_table(job_dir).set_index(["variant", "metric"])
    # weights per input width: every tiny-llama matrix reads 64 inputs but down_proj (128): 4.5 and 4.25 bits
    rows = {64: 0, 128: 0}
    loaded = tiny("tiny-llama", "llama")
    for name, module in loaded.model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            rows[module.in_features] += module.weight.numel()
    expected_bits = sum(n * bits_per_weight(4, 128, row_length=k) for k, n in rows.items()) / sum(
        rows.values()
    )
    assert table.loc[("compressed", "bits_per_weight"), "value"] == pytest.approx(expected_bits)
    assert table.loc[("base", "bits_per_weight"), "value"] == 32
    size = table.loc[("compressed", "size_mb"), "value"]
    effective = table.loc[("compressed", "size_mb_effective"), "value"]
    saved = sum(rows.values()) * (32 - expected_bits) / 8e6
    assert effective == pytest.approx(size - saved)  # fake-quant weights are dense; packed they would be
    assert table.loc[("base", "size_mb"), "value"] == size
    for variant in ("base", "compressed"):
        ppl = table.loc[(variant, "ppl")]
        assert math.isfinite(ppl.value) and ppl.ci_low <= ppl.value <= ppl.ci_high
        assert ppl.n == 4 * 63 and ppl.split == "evaluation"
    base_ppl, compressed_ppl = table.loc[("base", "ppl"), "value"], table.loc[("compressed", "ppl"), "value"]
    assert base_ppl != compressed_ppl and abs(compressed_ppl / base_ppl - 1) < 0.05  # random weights


def test_nf4_on_tiny_llava_language_model_end_to_end(cli, tmp_path, fresh_cache):
    job_dir = tmp_path / "job"
    args = ("run", "model=tiny-llava", "compress=nf4", "compress.target=language_model", *PPL)
    for run_dir in ("a", "b"):
        code, out, err = cli(*args, f"hydra.run.dir={job_dir / run_dir}")
        assert code == 0, out + err
        assert json.loads((job_dir / run_dir / "job.json").read_text())["compress_cache_hit"] is False
    table = read_table(job_dir / "a")
    bits = table[table.metric == "bits_per_weight"].set_index("variant")
    assert bits.group.tolist() == ["language_model", "language_model"]
    assert bits.value["base"] == 32 and 4.5 <= bits.value["compressed"] < 4.7  # 4 bits + fp32 absmax / 64
    sizes = table[table.metric == "size_mb"].set_index("variant").value
    assert sizes["compressed"] < sizes["base"]
    ppl = table[table.metric == "ppl"].set_index("variant")
    assert set(ppl.index) == {"base", "compressed"} and (ppl.ci_low <= ppl.value).all()
    assert (ppl.value <= ppl.ci_high).all() and ppl.value.map(math.isfinite).all()
    sparsity = table[(table.metric == "sparsity_actual") & (table.variant == "compressed")]
    assert sparsity.value.iloc[0] < 0.2  # measured on the dequantised weights, not the packed bytes


def test_compress_none_records_only_the_base_rows(cli, tmp_path, fresh_cache):
    code, out, err = cli(
        "run", "model=tiny-llama", "compress=none", *PPL, f"hydra.run.dir={tmp_path / 'job'}"
    )
    assert code == 0, out + err
    table = read_table(tmp_path / "job")
    assert set(table.variant) == {"base"}
    assert {"ppl", "bits_per_weight", "size_mb_effective"} <= set(table.metric)


def test_ppl_can_be_switched_off(cli, tmp_path, fresh_cache):
    code, out, _ = cli(
        "run", "model=tiny-llama", "compress=rtn8", "compress.ppl_samples=0", f"out_root={tmp_path}"
    )
    assert code == 0, out
    (results,) = tmp_path.rglob("results.parquet")
    assert "ppl" not in set(pd.read_parquet(results).metric)


def test_bnb_with_an_unsupported_bit_width_is_one_line_user_error(cli, tmp_path):
    code, out, err = cli("run", "model=tiny-llama", "compress=nf4", "compress.bits=3", f"out_root={tmp_path}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "compress.bits=3 is not valid for bitsandbytes; use 4 (nf4/fp4) or 8 (int8)" in err
    assert not list(tmp_path.rglob("job.json"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("compress=rtn4", "compress.bits=9"), "compress.bits=9 is out of range"),
        (("compress=rtn4", "compress.group_size=0"), "compress.group_size=0 is not valid"),
        (("compress=rtn4", "compress.sparsity=0.5"), "does not apply to rtn"),
        (("compress=int8", "compress.quant_type=nf4"), "compress.quant_type=nf4 is a 4-bit type"),
        (("compress=nf4", "compress.quant_type=int4"), "compress.quant_type='int4' is not valid"),
        (("compress=nf4", "compress.group_size=64"), "not used by bitsandbytes"),
    ],
)
def test_quantization_settings_are_validated(cli, tmp_path, overrides, message):
    code, _, err = cli("run", "model=tiny-llama", *overrides, f"out_root={tmp_path}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# -- compress.save ------------------------------------------------------------------------------------------
def test_save_is_not_part_of_the_config_hash():
    from vlmsafe_cli.config import VlmsafeConfig

    cfg = OmegaConf.structured(VlmsafeConfig(model=ModelConfig(name="m", family="llama", source="tiny")))
    saving = cfg.copy()
    saving.compress.save = True
    assert hashed_config(cfg) == hashed_config(saving)
    assert "save" not in hashed_config(cfg)["compress"] and "ppl_samples" in hashed_config(cfg)["compress"]


@pytest.mark.parametrize(
    "model,family,compress",
    [("tiny-llama", "llama", ("compress=rtn4",)), ("tiny-llava", "llava", ("compress=nf4",))],
)
def test_saved_export_reloads_with_the_same_logits(cli, tmp_path, fresh_cache, model, family, compress):
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    job_dir = tmp_path / "job"
    args = ("run", f"model={model}", *compress, "compress.save=true", "compress.ppl_samples=0")
    code, out, err = cli(*args, f"hydra.run.dir={job_dir}")
    assert code == 0, out + err
    export = job_dir / "artifacts" / "compressed"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))

    in_memory = tiny(model, family)
    cfg = OmegaConf.load(job_dir / "config.resolved.yaml")
    compress_model(in_memory, cfg.compress, model_identity(cfg.model, cfg.seed))
    model_class = LlavaForConditionalGeneration if family == "llava" else AutoModelForCausalLM
    reloaded_model = model_class.from_pretrained(export, device_map={"": "cpu"}).eval()
    processor = (AutoProcessor if family == "llava" else AutoTokenizer).from_pretrained(export)
    reloaded = LoadedModel(model, family, reloaded_model, processor)
    quantized = {type(m).__name__ for m in reloaded_model.modules() if is_bnb_linear(m)}
    assert quantized == ({"Linear4bit"} if family == "llava" else set())

    images = [Image.new("RGB", (56, 56), "teal")] if family == "llava" else None
    batch = get_adapter(in_memory).encode(["Tell me about the weather."], images)
    # the same weights: equal up to float32 rounding (kernel choices may differ between the two objects)
    torch.testing.assert_close(
        get_adapter(reloaded).logits_next(batch),
        get_adapter(in_memory).logits_next(batch),
        rtol=1e-5,
        atol=1e-6,
    )
