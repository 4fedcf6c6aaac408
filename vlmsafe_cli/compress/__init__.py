"""Compression stage: pick the target matrices, run the method, cache the result, verify it.

A compressed model is cached as the tensors the method changed (`weights.safetensors`), keyed by the
model identity, the compress config and its calibration; a later job (another analysis, a re-run)
applies them to a freshly loaded model instead of compressing again.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from vlmsafe_cli import cache
from vlmsafe_cli.compress.storage import dense_weight, linear_facts
from vlmsafe_cli.config import parse_pattern, parse_targets
from vlmsafe_cli.errors import JobError
from vlmsafe_cli.models import LoadedModel

CACHE_FORMAT = 1
PROJECTOR_RE = re.compile(r"(multi_modal_projector|visual\.merger|mm_projector)")
VISION_RE = re.compile(r"(vision_tower|vision_model|visual\.)")


def part_of(module_name: str) -> str:
    """Which part of a (vision-)language model a module belongs to, from its qualified name."""
    if PROJECTOR_RE.search(module_name):
        return "projector"
    if VISION_RE.search(module_name):
        return "vision_tower"
    return "language_model"


def target_linears(model: nn.Module, parts: list[str], skip: list[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules of the targeted parts whose names match no `skip` pattern."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and part_of(name) in parts
        and not any(pattern in name for pattern in skip)
    }


@dataclass
class CompressOutcome:
    seconds: float  # time the compression itself took (when it was built, possibly by an earlier job)
    cache_hit: bool
    cache_path: Optional[Path]


def run_method(loaded: LoadedModel, comp: DictConfig) -> None:
    """Compress `loaded.model` in place with the configured method (no cache).

    Methods get the whole LoadedModel: calibration-based ones build their inputs with its adapter;
    bnb replaces `loaded.model` with a reloaded, quantised model.
    """
    model = loaded.model
    linears = target_linears(model, parse_targets(comp.target), list(comp.skip))
    if not linears:
        raise JobError(f"compress.target={comp.target} selects no linear layer of this model")
    if comp.method == "magnitude":
        from vlmsafe_cli.compress.magnitude import magnitude_prune

        magnitude_prune(linears, comp.sparsity, parse_pattern(comp.pattern))
    elif comp.method == "wanda":
        from vlmsafe_cli.compress.wanda import wanda_prune

        wanda_prune(loaded, linears, comp)
    elif comp.method == "sparsegpt":
        from vlmsafe_cli.compress.sparsegpt import sparsegpt_prune

        sparsegpt_prune(loaded, linears, comp)
    elif comp.method == "gptq":
        from vlmsafe_cli.compress.gptq import gptq_quantize

        gptq_quantize(loaded, linears, comp)
    elif comp.method == "awq":
        from vlmsafe_cli.compress.awq import awq_quantize

        awq_quantize(loaded, linears, comp)
    elif comp.method == "rtn":
        from vlmsafe_cli.compress.quantize import rtn_quantize

        rtn_quantize(linears, comp.bits, comp.group_size)
    elif comp.method == "bnb":  # bitsandbytes quantises while loading: the model is replaced
        from vlmsafe_cli.compress.bnb import quantize_bnb

        loaded.model = quantize_bnb(loaded, comp, linears)
    else:  # validate() admits only implemented methods
        raise JobError(f"compress.method={comp.method} has no implementation")


def compress_model(loaded: LoadedModel, comp: DictConfig, identity: dict) -> CompressOutcome:
    """Compress `loaded.model` in place (from the cache when this exact compression was built before).

    bnb is not cached: it replaces `loaded.model` by a reload, which costs no more than reading a cache.
    """
    model = loaded.model
    if comp.method == "none":
        return CompressOutcome(seconds=0.0, cache_hit=False, cache_path=None)
    if comp.method == "bnb":
        start = time.perf_counter()
        run_method(loaded, comp)
        return CompressOutcome(seconds=time.perf_counter() - start, cache_hit=False, cache_path=None)
    key = {"format": CACHE_FORMAT, "model": identity, "compress": weights_settings(comp)}
    targets = target_linears(model, parse_targets(comp.target), list(comp.skip))
    built = {}

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        run_method(loaded, comp)
        built["seconds"] = time.perf_counter() - start
        tensors = {
            f"{name}.weight": linear.weight.detach().cpu().contiguous() for name, linear in targets.items()
        }
        save_file(tensors, str(tmp / "weights.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"seconds": built["seconds"]}))

    def load(path: Path) -> float:
        tensors = load_file(str(path / "weights.safetensors"))
        expected = {f"{name}.weight" for name in targets}
        if set(tensors) != expected:
            raise ValueError("cached tensors do not match the model's target layers")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return float(json.loads((path / "meta.json").read_text())["seconds"])

    seconds = cache.get_or_build("compressed", key, build, load)
    return CompressOutcome(
        seconds=seconds, cache_hit="seconds" not in built, cache_path=cache.entry_path("compressed", key)
    )


def sparsity_by_part(model: nn.Module, comp: DictConfig) -> dict[str, tuple[float, int]]:
    """Fraction of exactly-zero weights (and weight count) in each targeted part's linear layers."""
    parts = parse_targets(comp.target)
    counts: dict[str, list[int]] = {part: [0, 0] for part in parts}
    for name, linear in target_linears(model, parts, list(comp.skip)).items():
        weight = dense_weight(linear)
        counts[part_of(name)][0] += int((weight == 0).sum())
        counts[part_of(name)][1] += weight.numel()
    return {
        part: (zeros / total if total else 0.0, total) for part, (zeros, total) in counts.items() if total
    }


def n_m_valid(model: nn.Module, comp: DictConfig) -> Optional[tuple[float, int]]:
    """Fraction of M-groups holding at least N zeros (the N:M constraint), over all target matrices."""
    n_m = parse_pattern(comp.pattern)
    if n_m is None or comp.method == "none":
        return None
    zeros_needed, group = n_m
    valid = total = 0
    for linear in target_linears(model, parse_targets(comp.target), list(comp.skip)).values():
        weight = dense_weight(linear)
        if weight.shape[1] % group:
            continue
        zeros = (weight.reshape(weight.shape[0], -1, group) == 0).sum(-1)
        valid += int((zeros >= zeros_needed).sum())
        total += zeros.numel()
    return (valid / total if total else 0.0), total


def verify_sparsity(model: nn.Module, comp: DictConfig) -> None:
    """Fail the job when a pruning method missed its requested sparsity by more than the tolerance."""
    if comp.method == "none":
        return
    n_m = parse_pattern(comp.pattern)
    requested = n_m[0] / n_m[1] if n_m else comp.sparsity
    if requested == 0:
        return
    for part, (actual, _) in sparsity_by_part(model, comp).items():
        if abs(actual - requested) > comp.tolerance:
            raise JobError(
                f"compression missed its target on {part}: sparsity {actual:.4f} "
                f"vs requested {requested:.4f} "
                f"(tolerance {comp.tolerance})"
            )


# Compress settings that do not change the compressed weights (perplexity, export), left out of cache keys.
NOT_WEIGHT_KEYS = ("ppl_samples", "ppl_seq_len", "save")


def weights_settings(comp: DictConfig) -> dict:
    """The compress config minus NOT_WEIGHT_KEYS: what the cached compressed weights depend on."""
    settings = OmegaConf.to_container(comp, resolve=True)
    assert isinstance(settings, dict)
    return {key: value for key, value in settings.items() if key not in NOT_WEIGHT_KEYS}


def bits_by_part(
    model: nn.Module, comp: DictConfig, fake_quant: Optional[tuple[int, int, int]] = None
) -> dict[str, tuple[float, int]]:
    """Storage bits per weight (scales and zero points included) and weight count of each targeted part.

    Measured from the modules (dtype bits, bitsandbytes packed data + scales); `fake_quant` = (bits,
    group_size, column bits) counts the targets as packed matrices, since fake-quant weights are stored dense.
    """
    parts = parse_targets(comp.target)
    totals: dict[str, list[float]] = {part: [0.0, 0] for part in parts}
    for name, linear in target_linears(model, parts, list(comp.skip)).items():
        count, bits = linear_facts(linear, fake_quant)
        totals[part_of(name)][0] += bits
        totals[part_of(name)][1] += count
    return {part: (bits / count, int(count)) for part, (bits, count) in totals.items() if count}
