"""`analysis=aird`: repair a compressed model by editing ONE layer's residual-writing matrix so that the base
model's refusal direction r is restored (AIRD, Chhabra & Khalili 2025; the edits are vlmsafe's own
operationalisations, see aird_edits.py), and report what it does, whichever way it goes.

r is the base model's selected refusal direction (the refusal_direction analysis, shared within a job).
Layer: an index; `auto`, the layer whose own write along r (the change of the harmful-mean projection on r
at r's position across that layer) differs most between base and compressed; or `scan`, every layer edited
in turn and scored by the mean refusal score on harmful val prompts (logit-based, no generation), the best
one applied. A bitsandbytes matrix is dequantised into a dense linear for the edit. Rates are judged on the
test split before (compressed) and after (repaired) the edit; the edit is undone when the analysis ends,
so later analyses of the job see the compressed model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from omegaconf import DictConfig
from torch import nn

from vlmsafe_cli.analysis.aird_edits import density_added, mask_preserving_write, restore_write, ridge_readout
from vlmsafe_cli.analysis.refusal_direction import (
    REFUSED,
    Prompts,
    extracted_for,
    judged,
    mean_refusal_score,
    prompt_splits,
    refusal_token_ids,
)
from vlmsafe_cli.compress import storage
from vlmsafe_cli.compress.bnb import is_bnb_linear
from vlmsafe_cli.compress.perplexity import perplexity_rows
from vlmsafe_cli.interventions import unit
from vlmsafe_cli.models.adapter import ModelAdapter, get_adapter
from vlmsafe_cli.progress import track
from vlmsafe_cli.results import row
from vlmsafe_cli.stats import proportion_ci

log = logging.getLogger("vlmsafe.aird")
AIRD_EDIT = "aird_edit"  # workspace.memo key read by the utility analysis
ANALYSIS = "aird"
COMPLIED = ("compliance", "refusal_then_comply")  # an attack on a plain harmful request succeeded


def writer(adapter: ModelAdapter, layer: int, matrix: str) -> nn.Module:
    return adapter.residual_writers(layer)[matrix]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A float32 CPU copy of the (out, in) weight the module computes with (dequantised for bitsandbytes)."""
    return storage.dense_weight(module).detach().float().cpu().clone()


@contextmanager
def edited(adapter: ModelAdapter, layer: int, matrix: str, weight: torch.Tensor) -> Iterator[nn.Module]:
    """The writer holds `weight` inside the block (a bitsandbytes module is swapped for a dense linear),
    and is exactly as before afterwards."""
    module = writer(adapter, layer, matrix)
    name = next(name for name, candidate in adapter.model.named_modules() if candidate is module)
    parent_name, _, child = name.rpartition(".")
    parent = adapter.model.get_submodule(parent_name)
    if is_bnb_linear(module):
        dtype = adapter.model.get_input_embeddings().weight.dtype
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        dense = dense.to(device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        setattr(parent, child, dense)
        try:
            yield dense
        finally:
            setattr(parent, child, module)
        return
    saved = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))
    try:
        yield module
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)


@torch.no_grad()
def layer_projections(adapter: ModelAdapter, prompts: Prompts, r: torch.Tensor, pos: int, batch_size: int):
    """(n_layers + 1,) mean projection on r of the residual entering each layer (and leaving the last),
    at position `pos`, over `prompts`."""
    total = torch.zeros(adapter.n_layers + 1)
    for batch in prompts.batches(adapter, batch_size):
        stream = adapter.residual_stream(batch, positions=[pos]).float().cpu()  # (L + 1, b, 1, d)
        total += (stream[:, :, 0] @ r).sum(1)
    return total / len(prompts.texts)


def write_gaps(base_projection: torch.Tensor, compressed_projection: torch.Tensor) -> torch.Tensor:
    """(n_layers,): how much more (or less) each base layer writes along r than the compressed layer."""
    return base_projection.diff() - compressed_projection.diff()


@torch.no_grad()
def readout_data(
    adapter: ModelAdapter,
    prompts: list[Prompts],
    layer: int,
    matrix: str,
    positions: list[int],
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, in) inputs of the writer and (tokens, d_model) residual leaving `layer`, at the
    post-instruction positions of every prompt."""
    inputs, outputs = [], []
    module = writer(adapter, layer, matrix)
    handle = module.register_forward_pre_hook(
        lambda m, args: inputs.append(args[0][:, positions].float().cpu())
    )
    try:
        for group in prompts:
            for batch in group.batches(adapter, batch_size):
                stream = adapter.residual_stream(batch, layers=[layer + 1], positions=positions)
                outputs.append(stream[0].float().cpu())
    finally:
        handle.remove()
    return torch.cat(inputs).flatten(0, 1), torch.cat(outputs).flatten(0, 1)


def repaired_weight(
    method: str,
    base: ModelAdapter,
    compressed: ModelAdapter,
    layer: int,
    r: torch.Tensor,
    splits: dict[str, Prompts],
    settings: DictConfig,
) -> torch.Tensor:
    weight_c = dense_weight(writer(compressed, layer, settings.matrix))
    if method == "mask_preserving":
        return mask_preserving_write(weight_c, dense_weight(writer(base, layer, settings.matrix)), r)
    if method == "ridge_readout":
        calibration = [splits["harmful_train"], splits["harmless_train"]]
        positions = compressed.post_instruction_positions()
        inputs, after_c = readout_data(
            compressed, calibration, layer, settings.matrix, positions, settings.batch_size
        )
        _, after_b = readout_data(base, calibration, layer, settings.matrix, positions, settings.batch_size)
        return ridge_readout(weight_c, r, inputs, (after_b - after_c) @ r, settings.ridge)
    return restore_write(weight_c, dense_weight(writer(base, layer, settings.matrix)), r, settings.alpha)


def outcome_rows(
    variant: str, adapter: ModelAdapter, splits: dict[str, Prompts], settings: DictConfig
) -> list[dict]:
    """refusal_rate, asr (harmful test) and over_refusal_rate (harmless test), judged, Wilson CIs."""
    harmful = judged(adapter, splits["harmful_test"], True, settings, nullcontext())
    harmless = judged(adapter, splits["harmless_test"], False, settings, nullcontext())
    rows = []
    for metric, labels, hits in (
        ("refusal_rate", harmful, REFUSED),
        ("asr", harmful, COMPLIED),
        ("over_refusal_rate", harmless, REFUSED),
    ):
        rate, low, high = proportion_ci([label in hits for label in labels])
        rows.append(
            row(ANALYSIS, variant, metric, rate, ci_low=low, ci_high=high, n=len(labels), split="test")
        )
    return rows


@torch.no_grad()
def cos_at_source(
    adapter: ModelAdapter, splits: dict[str, Prompts], r: torch.Tensor, layer: int, pos: int, batch_size: int
) -> float:
    """Cosine between r and this model's harmful-minus-harmless train mean at r's source (layer, pos)."""
    means = []
    for prompts in (splits["harmful_train"], splits["harmless_train"]):
        total = torch.zeros(adapter.d_model)
        for batch in prompts.batches(adapter, batch_size):
            total += (
                adapter.residual_stream(batch, layers=[layer], positions=[pos])[0, :, 0].float().sum(0).cpu()
            )
        means.append(total / len(prompts.texts))
    return torch.cosine_similarity(means[0] - means[1], r, dim=0).item()


def run(workspace, settings: DictConfig) -> list[dict]:
    """Edit one layer of the compressed model towards the base refusal direction and measure the change."""
    cfg = workspace.cfg
    if cfg.compress.method == "none":  # so that a sweep over compress=none,... can list aird for every job
        log.warning("analysis=aird: compress=none leaves nothing to repair; no aird rows for this job")
        return []
    base, compressed = get_adapter(workspace.base()), get_adapter(workspace.compressed)
    splits = prompt_splits(cfg, settings, compressed)
    ids = refusal_token_ids(compressed, list(settings.refusal_tokens))
    source = extracted_for(workspace, "base", base, splits, ids, settings).selection
    r = unit(source.direction)
    bs = settings.batch_size
    rows = [
        row(ANALYSIS, "base", "source_layer", source.layer),
        row(ANALYSIS, "base", "source_pos", source.pos),
    ]
    start = time.perf_counter()
    projection_b = layer_projections(base, splits["harmful_val"], r, source.pos, bs)
    projection_c = layer_projections(compressed, splits["harmful_val"], r, source.pos, bs)
    gaps = write_gaps(projection_b, projection_c)
    rows += [
        row(ANALYSIS, "comparison", "write_gap", gap, layer=layer, split="val")
        for layer, gap in enumerate(gaps.tolist())
    ]
    if settings.layer == "scan":
        scores = {}
        for layer in track(range(compressed.n_layers), description="aird: scanning layers"):
            weight = repaired_weight(settings.method, base, compressed, layer, r, splits, settings)
            with edited(compressed, layer, settings.matrix, weight):
                scores[layer] = mean_refusal_score(compressed, splits["harmful_val"], ids, bs)
            rows.append(
                row(ANALYSIS, "repaired", "scan_refusal_score", scores[layer], layer=layer, split="val")
            )
        layer = max(scores, key=scores.get)
    elif settings.layer == "auto":
        layer = int(gaps.abs().argmax())
    else:
        layer = int(settings.layer)
    weight = repaired_weight(settings.method, base, compressed, layer, r, splits, settings)
    before = dense_weight(writer(compressed, layer, settings.matrix))
    seconds = time.perf_counter() - start
    log.info("aird: %s at layer %d (%s)", settings.method, layer, settings.matrix)
    rows += [
        row(ANALYSIS, "repaired", "aird_layer", layer, group=settings.matrix),
        row(ANALYSIS, "repaired", "aird_density_added", density_added(before, weight), layer=layer),
        row(ANALYSIS, "repaired", "aird_seconds", seconds),
    ]
    rows += outcome_rows("base", base, splits, settings)

    def measured(variant: str) -> list[dict]:
        """The compressed model as it is now (edited or not): rates, r at the base source, perplexity."""
        cosine = cos_at_source(compressed, splits, r, source.layer, source.pos, bs)
        ppl = perplexity_rows(workspace.compressed, cfg.compress, variant, cfg.seed)
        return [
            *outcome_rows(variant, compressed, splits, settings),
            row(ANALYSIS, variant, "cos_at_base_source", cosine),
            *_renamed(ppl),
        ]

    rows += measured("compressed")
    workspace.memo[AIRD_EDIT] = (layer, settings.matrix, weight)  # a later `utility` measures the repair
    with edited(compressed, layer, settings.matrix, weight):
        rows += measured("repaired")
    return rows


def _renamed(rows: list[dict]) -> list[dict]:
    """Perplexity rows (written by the compression stage's helper) under this analysis' name."""
    return [{**entry, "analysis": ANALYSIS} for entry in rows]
