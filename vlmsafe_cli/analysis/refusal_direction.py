"""`analysis=refusal_direction`: the refusal direction (Arditi et al. 2024) of the base and the compressed
model, how it moved, and how well each one works inside each model.

Candidates: harmful-minus-harmless mean residual at every decoder layer input and every post-instruction
position, from one batched capture per class (train split). Selection (Arditi et al.'s defaults): a
candidate is kept when its layer is below `max_layer_fraction` of depth, adding it at its layer induces
refusal on harmless prompts (mean refusal score > `induce_threshold`) and ablating it keeps the KL of the
next-token distribution on harmless prompts below `kl_threshold`; the kept one with the lowest mean
refusal score under ablation on harmful prompts wins (val split). Candidates are scored by that ablation
score first and the filters checked in ascending order, which picks the same candidate as scoring every
filter for every candidate at a fraction of the cost. When no candidate passes both filters (small models:
on the 135M organism no single-layer addition induces refusal at coefficient 1), the induce filter is
relaxed first: the lowest-ablation-score candidate that passes the KL filter is taken, flagged
(`selection_passed_filters` 0, `selection_passed_kl` 1); only when none passes KL either is the lowest
ablation score taken outright (which can break the model: its KL is reported). Refusal score = log-odds
of the refusal tokens at the first generated position. The reported rates come from greedy generation
judged by the project's judge on a test split disjoint from both, with Wilson intervals.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ContextManager, Optional

import pandas as pd
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from vlmsafe_cli.compress.export import export_checkpoint
from vlmsafe_cli.data.prompts import load_prompt_sets, split
from vlmsafe_cli.errors import UserError
from vlmsafe_cli.interventions import ablated, added, orthogonalized, unit
from vlmsafe_cli.judge import judge
from vlmsafe_cli.models.adapter import ModelAdapter
from vlmsafe_cli.progress import track
from vlmsafe_cli.results import row, write_table
from vlmsafe_cli.stats import bootstrap_ci, proportion_ci

log = logging.getLogger("vlmsafe.refusal_direction")
ANALYSIS = "refusal_direction"
REFUSED = ("genuine_refusal", "refusal_then_comply", "over_refusal")
SCORE_COLUMNS = ["layer", "pos", "ablation_score", "kl_harmless", "steering_score"]


# -- prompts --------------------------------------------------------------------------------------------
@dataclass
class Prompts:
    """Instructions, with one image each on VLM runs that ask for images."""

    texts: list[str]
    images: Optional[list] = None

    def batches(self, adapter: ModelAdapter, batch_size: int) -> Iterator[Any]:
        for start in range(0, len(self.texts), batch_size):
            images = None if self.images is None else self.images[start : start + batch_size]
            yield adapter.encode(self.texts[start : start + batch_size], images=images)


def _with_images(adapter: ModelAdapter, texts: list[str], seed: int) -> Prompts:
    from vlmsafe_cli.compress.calibration import image_side, synthetic_scene

    side = image_side(adapter.processor.image_processor)
    rng = random.Random(seed)
    return Prompts(texts, [synthetic_scene(side, rng)[0] for _ in texts])


def prompt_splits(cfg: DictConfig, settings: DictConfig, adapter: ModelAdapter) -> dict[str, Prompts]:
    """harmful_/harmless_ train, val and test splits, disjoint, seeded by data.seed."""
    harmful, harmless = load_prompt_sets(cfg.data)
    sizes = {"train": settings.n_train, "val": settings.n_val, "test": settings.n_test}
    out = {}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        for name, texts in split(prompts, sizes, cfg.data.seed, kind).items():
            with_images = settings.with_image
            out[f"{kind}_{name}"] = _with_images(adapter, texts, cfg.seed) if with_images else Prompts(texts)
    return out


# -- measurements ---------------------------------------------------------------------------------------
def refusal_token_ids(adapter: ModelAdapter, tokens: list[str]) -> list[int]:
    """The first token id of each refusal token string (deduplicated)."""
    ids = []
    for token in tokens:
        encoded = adapter.tokenizer.encode(token, add_special_tokens=False)
        if encoded and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


@torch.no_grad()
def next_token_logprobs(adapter: ModelAdapter, prompts: Prompts, batch_size: int) -> torch.Tensor:
    """(n, vocab) float32 log-probabilities of the first generated token."""
    parts = [
        torch.log_softmax(adapter.logits_next_shared_prefix(batch).float(), dim=-1).cpu()
        for batch in prompts.batches(adapter, batch_size)
    ]
    return torch.cat(parts)


def refusal_scores(logprobs: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """log p(refusal) - log(1 - p(refusal)) per prompt, p = total probability of the refusal tokens."""
    refusal = torch.logsumexp(logprobs[:, refusal_ids], dim=-1)
    return refusal - torch.log1p(-refusal.exp().clamp(max=1 - 1e-7))


@torch.no_grad()
def mean_refusal_score(
    adapter: ModelAdapter, prompts: Prompts, refusal_ids: list[int], batch_size: int
) -> float:
    """The mean refusal score of `prompts` under whatever hooks are active."""
    return refusal_scores(next_token_logprobs(adapter, prompts, batch_size), refusal_ids).mean().item()


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per prompt, from log-probabilities."""
    return (reference.exp() * (reference - other)).sum(-1)


class MassiveActivations:
    """Residual coordinates that carry massive activations (Sun et al. 2024, "Massive activations in large
    language models"): at some decoder layer's input, some real token's |x_d| exceeds `ratio` times that
    layer's median |x|. They hold attention-sink state; a candidate direction with even a small component
    on them moves the sink token by a large amount when ablated, which breaks the model whatever the
    direction means (SmolLM2: coordinate 507 reaches ~26,000 against a median of ~2). Observed on the
    harmless training prompts during the candidate capture; pad positions are skipped."""

    def __init__(self, n_layers: int, d_model: int):
        self.peaks = torch.zeros(n_layers, d_model)
        self.medians: list[list[float]] = [[] for _ in range(n_layers)]

    def observer(self, attention_mask: torch.Tensor | None) -> Callable[[int, torch.Tensor], None]:
        def observe(layer: int, hidden: torch.Tensor) -> None:
            mask = attention_mask
            if mask is not None and mask.shape == hidden.shape[:2]:
                values = hidden[mask.to(hidden.device).bool()]
            else:  # a VLM whose sequence the processor does not expand: every position counts
                values = hidden.flatten(0, 1)
            values = values.float().abs()
            self.peaks[layer] = torch.maximum(self.peaks[layer], values.amax(0).cpu())
            self.medians[layer].append(values.median().item())

        return observe

    def coordinates(self, ratio: float | None) -> list[int]:
        """The massive coordinates (none when `ratio` is None)."""
        if ratio is None:
            return []
        medians = torch.tensor([statistics.median(values) for values in self.medians])
        return torch.nonzero((self.peaks > ratio * medians[:, None]).any(0)).flatten().tolist()


@torch.no_grad()
def candidate_directions(
    adapter: ModelAdapter,
    harmful: Prompts,
    harmless: Prompts,
    positions: list[int],
    batch_size: int,
    massive: MassiveActivations | None = None,
) -> torch.Tensor:
    """(n_layers, len(positions), d_model) float32: mean residual on harmful minus on harmless prompts,
    entering each decoder layer, at each post-instruction position (negative indices). `massive`, when
    given, observes every position of the harmless pass."""
    layers = list(range(adapter.n_layers))

    def mean(prompts: Prompts, observed: MassiveActivations | None) -> torch.Tensor:
        total = torch.zeros(len(layers), len(positions), adapter.d_model)
        for batch in prompts.batches(adapter, batch_size):
            observe = None if observed is None else observed.observer(batch.get("attention_mask"))
            captured = adapter.residual_stream(batch, layers=layers, positions=positions, observe=observe)
            total += captured.float().sum(1).cpu()
        return total / len(prompts.texts)

    return mean(harmful, None) - mean(harmless, massive)


@dataclass
class Selection:
    layer: int
    pos: int  # negative index from the end of the prompt
    direction: torch.Tensor  # the raw mean difference (its norm is what addition adds)
    passed_filters: bool
    ablation_score: float
    steering_score: float
    kl: float
    evaluated: int  # candidates whose filters were checked
    passed_kl: bool = True
    scores: list = field(default_factory=list)  # per candidate: layer, pos, ablation score, kl, steering


@torch.no_grad()
def select_direction(
    adapter: ModelAdapter,
    mean_diffs: torch.Tensor,
    positions: list[int],
    splits: dict[str, Prompts],
    refusal_ids: list[int],
    settings: DictConfig,
) -> Selection:
    """Arditi et al.'s selection on the val split (see the module docstring)."""
    batch_size = settings.batch_size
    max_layer = settings.max_layer_fraction * adapter.n_layers
    candidates = [
        (layer, index)
        for layer in range(adapter.n_layers)
        if layer < max_layer
        for index in range(len(positions))
        if mean_diffs[layer, index].norm() > 0
    ]
    if not candidates:
        raise UserError(f"no candidate direction below layer {max_layer:.0f}: raise max_layer_fraction")
    harmless_plain = next_token_logprobs(adapter, splits["harmless_val"], batch_size)
    ablation_scores = {}
    for layer, index in track(candidates, description="refusal direction: ablation scores"):
        with ablated(adapter, mean_diffs[layer, index]):
            ablation_scores[(layer, index)] = mean_refusal_score(
                adapter, splits["harmful_val"], refusal_ids, batch_size
            )
    ranked = sorted(candidates, key=lambda candidate: ablation_scores[candidate])
    scores = {
        candidate: {"layer": candidate[0], "pos": positions[candidate[1]], "ablation_score": value}
        for candidate, value in ablation_scores.items()
    }
    kl_only = None  # the first (lowest ablation score) candidate that passes KL but not induce
    for evaluated, (layer, index) in enumerate(ranked, start=1):
        direction = mean_diffs[layer, index]
        with ablated(adapter, direction):
            kl = kl_divergence(
                harmless_plain, next_token_logprobs(adapter, splits["harmless_val"], batch_size)
            )
        kl_mean = kl.mean().item()
        scores[(layer, index)]["kl_harmless"] = kl_mean
        if kl_mean >= settings.kl_threshold:
            log.info(
                "candidate layer %d pos %d: KL %.3f >= %g, next",
                layer,
                positions[index],
                kl_mean,
                settings.kl_threshold,
            )
            continue
        with added(adapter, direction, layer):
            steering = mean_refusal_score(adapter, splits["harmless_val"], refusal_ids, batch_size)
        scores[(layer, index)]["steering_score"] = steering
        log.info(
            "candidate layer %d pos %d: KL %.3f, steering score %.2f",
            layer,
            positions[index],
            kl_mean,
            steering,
        )
        chosen = Selection(
            layer,
            positions[index],
            direction,
            steering > settings.induce_threshold,
            ablation_scores[(layer, index)],
            steering,
            kl_mean,
            evaluated,
        )
        if chosen.passed_filters:
            chosen.scores = list(scores.values())
            return chosen
        kl_only = kl_only or chosen
    if kl_only is not None:
        log.warning(
            "no candidate passed the induce filter (steering score > %g): using the lowest ablation score "
            "among those that pass KL (layer %d pos %d), flagged",
            settings.induce_threshold,
            kl_only.layer,
            kl_only.pos,
        )
        kl_only.evaluated, kl_only.scores = len(ranked), list(scores.values())
        return kl_only
    layer, index = ranked[0]  # nothing passed KL either: report the best bypass, flagged
    log.warning("no candidate passed the KL filter: using the lowest ablation score, flagged")
    with ablated(adapter, mean_diffs[layer, index]):
        ablated_logprobs = next_token_logprobs(adapter, splits["harmless_val"], batch_size)
    kl_first = kl_divergence(harmless_plain, ablated_logprobs)
    return Selection(
        layer,
        positions[index],
        mean_diffs[layer, index],
        False,
        ablation_scores[ranked[0]],
        float("nan"),
        kl_first.mean().item(),
        len(ranked),
        False,
        list(scores.values()),
    )


@torch.no_grad()
def judged(
    adapter: ModelAdapter, prompts: Prompts, harmful: bool, settings: DictConfig, intervention: ContextManager
) -> list[str]:
    """Greedy completions judged by the rule judge, under `intervention`; completions are not kept."""
    labels = []
    with intervention:
        for batch in prompts.batches(adapter, settings.batch_size):
            for text in adapter.generate(batch, max_new_tokens=settings.max_new_tokens):
                labels.append(judge(text, harmful=harmful))
    return labels


def rate_row(variant: str, metric: str, labels: list[str], **optional: Any) -> dict:
    rate, low, high = proportion_ci([label in REFUSED for label in labels])
    return row(
        ANALYSIS, variant, metric, rate, ci_low=low, ci_high=high, n=len(labels), split="test", **optional
    )


# -- the analysis ---------------------------------------------------------------------------------------
@dataclass
class Extracted:
    """One model's candidates and selected direction."""

    mean_diffs: torch.Tensor  # (n_layers, n_positions, d_model), massive coordinates zeroed
    positions: list[int]
    selection: Selection
    massive: list[int] = field(default_factory=list)  # the residual coordinates zeroed in every candidate

    def save(self, path, model_name: str) -> None:
        tensors = {"direction": unit(self.selection.direction).contiguous(), "mean_diffs": self.mean_diffs}
        metadata = {
            "layer": str(self.selection.layer),
            "pos": str(self.selection.pos),
            "positions": ",".join(str(p) for p in self.positions),
            "passed_filters": str(self.selection.passed_filters).lower(),
            "massive_coordinates": ",".join(str(d) for d in self.massive),
            "model": model_name,
            "layer_means": "the residual entering decoder layer `layer` (HF hidden_states[layer])",
        }
        save_file(tensors, str(path), metadata=metadata)
        # every candidate's selection scores (kl / steering where the filter walk reached it), for diagnosis
        table = pd.DataFrame(self.selection.scores, columns=SCORE_COLUMNS)
        write_table(table, path.parent, stem=path.name.removesuffix(".safetensors") + "_candidates")


def extract(
    adapter: ModelAdapter, splits: dict[str, Prompts], refusal_ids: list[int], settings: DictConfig
) -> Extracted:
    positions = adapter.post_instruction_positions()
    observed = MassiveActivations(adapter.n_layers, adapter.d_model)
    mean_diffs = candidate_directions(
        adapter, splits["harmful_train"], splits["harmless_train"], positions, settings.batch_size, observed
    )
    massive = observed.coordinates(settings.massive_ratio)
    mean_diffs[..., massive] = 0.0
    if massive:
        log.info("zeroed %d massive-activation coordinates in every candidate: %s", len(massive), massive)
    selection = select_direction(adapter, mean_diffs, positions, splits, refusal_ids, settings)
    log.info(
        "selected layer %d pos %d (filters passed: %s; %d candidates checked)",
        selection.layer,
        selection.pos,
        selection.passed_filters,
        selection.evaluated,
    )
    return Extracted(mean_diffs, positions, selection, massive)


def memo_key(variant: str, settings: DictConfig) -> tuple:
    """What a model's extraction depends on, as the key it is shared under in `workspace.memo`."""
    keys = (
        "n_train",
        "n_val",
        "refusal_tokens",
        "kl_threshold",
        "induce_threshold",
        "max_layer_fraction",
        "massive_ratio",
    )
    return (ANALYSIS, variant, tuple(str(settings[k]) for k in keys), settings.with_image)


def extracted_for(
    workspace, variant: str, adapter: ModelAdapter, splits: dict, refusal_ids: list[int], settings: DictConfig
) -> Extracted:
    """`extract` once per job for a model and the settings it depends on (refusal_direction and aird
    in one job share it)."""
    key = memo_key(variant, settings)
    if key not in workspace.memo:
        workspace.memo[key] = extract(adapter, splits, refusal_ids, settings)
    return workspace.memo[key]


def selection_rows(variant: str, extracted: Extracted) -> list[dict]:
    chosen = extracted.selection
    rows = [
        row(ANALYSIS, variant, "source_layer", chosen.layer),
        row(ANALYSIS, variant, "source_pos", chosen.pos),
        row(ANALYSIS, variant, "selection_passed_filters", float(chosen.passed_filters)),
        row(ANALYSIS, variant, "selection_passed_kl", float(chosen.passed_kl)),
        row(ANALYSIS, variant, "direction_norm", chosen.direction.norm().item()),
        row(ANALYSIS, variant, "massive_coordinates", len(extracted.massive)),
        row(ANALYSIS, variant, "ablation_refusal_score", chosen.ablation_score, split="val"),
    ]
    if chosen.steering_score == chosen.steering_score:  # not NaN: the walk measured it
        rows.append(row(ANALYSIS, variant, "steering_refusal_score", chosen.steering_score, split="val"))
    rows.append(row(ANALYSIS, variant, "kl_harmless", chosen.kl, split="val"))
    return rows


def quality_rows(
    variant: str,
    adapter: ModelAdapter,
    source: str,
    chosen: Selection,
    splits: dict[str, Prompts],
    settings: DictConfig,
    plain: torch.Tensor,
) -> list[dict]:
    """Refusal under ablation, induced refusal under addition (each coefficient) and the KL ablation costs
    on harmless prompts, for one direction inside one model (test split). `plain`: the model's own
    next-token log-probabilities on the harmless test prompts."""
    group = f"{source}_direction"
    labels = judged(adapter, splits["harmful_test"], True, settings, ablated(adapter, chosen.direction))
    rows = [rate_row(variant, "refusal_rate_ablated", labels, group=group)]
    for coefficient in settings.coefficients:
        steer = added(adapter, chosen.direction, chosen.layer, coefficient)
        labels = judged(adapter, splits["harmless_test"], False, settings, steer)
        rows.append(rate_row(variant, "induced_refusal_rate", labels, group=f"{group} x{coefficient:g}"))
    with ablated(adapter, chosen.direction):
        kl = kl_divergence(plain, next_token_logprobs(adapter, splits["harmless_test"], settings.batch_size))
    value, low, high = bootstrap_ci(kl.tolist())
    rows.append(
        row(
            ANALYSIS,
            variant,
            "kl_harmless",
            value,
            ci_low=low,
            ci_high=high,
            n=len(kl),
            split="test",
            group=group,
        )
    )
    return rows


def plain_rows(
    variant: str, adapter: ModelAdapter, splits: dict[str, Prompts], settings: DictConfig
) -> list[dict]:
    harmful = judged(adapter, splits["harmful_test"], True, settings, nullcontext())
    harmless = judged(adapter, splits["harmless_test"], False, settings, nullcontext())
    return [
        rate_row(variant, "refusal_rate", harmful),
        rate_row(variant, "over_refusal_rate", harmless),
    ]


def comparison_rows(base: Extracted, compressed: Extracted) -> list[dict]:
    """How the direction moved: cosine of the selected directions, the per-layer cosine of the candidates
    at the base's selected position, and the source shift."""
    rows = [
        row(
            ANALYSIS,
            "comparison",
            "cos_selected",
            torch.cosine_similarity(base.selection.direction, compressed.selection.direction, dim=0).item(),
        ),
        row(ANALYSIS, "comparison", "source_layer_shift", compressed.selection.layer - base.selection.layer),
        row(ANALYSIS, "comparison", "source_pos_shift", compressed.selection.pos - base.selection.pos),
    ]
    index = base.positions.index(base.selection.pos)
    base_layers, compressed_layers = base.mean_diffs[:, index], compressed.mean_diffs[:, index]
    cosines = torch.cosine_similarity(base_layers, compressed_layers, dim=-1)
    defined = (base_layers.norm(dim=-1) > 0) & (compressed_layers.norm(dim=-1) > 0)  # layer 0: often zero
    for layer in torch.nonzero(defined).flatten().tolist():
        rows.append(row(ANALYSIS, "comparison", "cos_layer", cosines[layer].item(), layer=layer))
    return rows


def run(workspace, settings: DictConfig) -> list[dict]:
    """Extract, select and evaluate the refusal direction of the base (and the compressed) model."""
    cfg = workspace.cfg
    models = workspace.adapters()
    job_adapter = models.get("compressed", models["base"])
    splits = prompt_splits(cfg, settings, job_adapter)
    refusal_ids = refusal_token_ids(job_adapter, list(settings.refusal_tokens))
    extracted = {
        variant: extracted_for(workspace, variant, adapter, splits, refusal_ids, settings)
        for variant, adapter in models.items()
    }
    rows = []
    for variant, adapter in models.items():
        rows += plain_rows(variant, adapter, splits, settings)
        rows += selection_rows(variant, extracted[variant])
        plain = next_token_logprobs(adapter, splits["harmless_test"], settings.batch_size)
        for source, other in extracted.items():
            rows += quality_rows(variant, adapter, source, other.selection, splits, settings, plain)
    job_variant = "compressed" if "compressed" in models else "base"
    extracted[job_variant].save(workspace.artifacts / "refusal_direction.safetensors", cfg.model.name)
    if settings.save_orthogonalized:
        with orthogonalized(job_adapter, extracted[job_variant].selection.direction):
            export_checkpoint(workspace.compressed, workspace.artifacts / "orthogonalized")
        log.info(
            "saved the orthogonalised %s model in %s", job_variant, workspace.artifacts / "orthogonalized"
        )
    if "compressed" in models:
        extracted["base"].save(workspace.artifacts / "refusal_direction_base.safetensors", cfg.model.name)
        rows += comparison_rows(extracted["base"], extracted["compressed"])
    return rows
