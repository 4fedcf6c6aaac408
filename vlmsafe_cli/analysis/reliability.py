"""`analysis=reliability`: where reliability lives (Mann et al. 2026, PAPERS.md section 3), and what
compression does to it.

On ground-truth tasks (vlmsafe_cli/data/reliability_tasks.py: synthetic VQA on VLMs, arithmetic and facts on
chat LLMs, or a local POPE / VQAv2-style JSONL) each model answers greedily; correctness is normalised exact
match. Per sample, and related to correctness by AUROC (scikit-learn) and point-biserial r (scipy), each
with a percentile bootstrap CI over samples:
- behaviour: `mean_logprob` of the greedy answer's tokens, `logit_margin` (top-1 minus top-2 logit) and
  `entropy` (nats) at the first answer token, `self_consistency` (majority fraction of K answers sampled at
  `temperature`, `top_p`, seeded);
- hidden states: logistic-regression probes on the last prompt token's residual entering each decoder layer
  (group `probe`, `layer` as `residual_stream`) and on the concatenation of the last `last_k_layers`
  entries (group `probe_last<k>`); the scores are held-out predictions of stratified k-fold CV, never
  in-sample;
- attention over image tokens (VLM tasks with images): the last prompt token's head-averaged attention over
  the image tokens, per layer: `attention_entropy`, `attention_top_mass` (mass of the top `top_fraction`
  cells) and `attention_clusters` (8-connected components of those cells on the patch grid: DBSCAN with
  eps 1.5 and min_samples 1, the paper's clustering without its min-3 core rule).
Rows: `accuracy` (Wilson CI, group all and per task kind), `auroc` and `pointbiserial_r` per signal (group =
signal). AUROCs are of the raw signal: entropy is expected below 0.5. A compressed job measures both models
on the same tasks and adds comparison rows: `delta_accuracy`, `delta_auroc` per signal (compressed minus
base, paired bootstrap over the same samples) and `answer_agreement`. Artifact: reliability_samples.parquet
/.csv (per model and sample: question, answers, prediction, correctness, signals, held-out probe score).
Causal checks (`causal`): accuracy with the probe's top-k residual coordinates of one layer zeroed or
mean-ablated vs k random ones, and on VLM tasks with the most attended image patches masked vs random ones.
The AUROC and r bootstrap is vectorised by hand (rank-sum AUROC over all resamples at once): calling
roc_auc_score per resample costs seconds per signal and layer.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from scipy import ndimage
from scipy.stats import pointbiserialr, rankdata

from vlmsafe_cli.data.reliability_tasks import (
    TEXT_KINDS,
    VISUAL_KINDS,
    Task,
    is_correct,
    local_tasks,
    normalize_answer,
    text_tasks,
    visual_tasks,
)
from vlmsafe_cli.generation import generate_all
from vlmsafe_cli.models.adapter import ModelAdapter
from vlmsafe_cli.progress import track
from vlmsafe_cli.results import ci_row, write_table
from vlmsafe_cli.stats import bootstrap_ci, proportion_ci

log = logging.getLogger("vlmsafe.reliability")
ANALYSIS = "reliability"
BEHAVIOUR_SIGNALS = ("mean_logprob", "logit_margin", "entropy", "self_consistency")
ATTENTION_SIGNALS = ("attention_entropy", "attention_top_mass", "attention_clusters")


# -- tasks ----------------------------------------------------------------------------------------------
def load_tasks(settings: DictConfig, adapter: ModelAdapter, seed: int) -> list[Task]:
    """The job's tasks: `auto` = synthetic VQA on a VLM, text tasks on a chat LLM."""
    source = settings.tasks
    if source == "auto":
        source = "visual" if adapter.is_vlm else "text"
    if source == "local":
        return local_tasks(settings.path, settings.n_tasks, seed)
    kinds = tuple(settings.kinds) or (VISUAL_KINDS if source == "visual" else TEXT_KINDS)
    make = visual_tasks if source == "visual" else text_tasks
    tasks = make(settings.n_tasks, seed, kinds)
    if len(tasks) < settings.n_tasks:
        log.info("reliability: %d unique %s tasks of kinds %s", len(tasks), source, ", ".join(kinds))
    return tasks


def prompt_of(task: Task, settings: DictConfig) -> str:
    return f"{task.question} {settings.prompt_suffix}".strip()


def task_images(adapter: ModelAdapter, tasks: list[Task]) -> Optional[list]:
    """One image per task on a VLM when the tasks have images (None otherwise: text-only prompts)."""
    if not adapter.is_vlm or not any(task.has_image for task in tasks):
        return None
    from vlmsafe_cli.compress.calibration import image_side

    side = image_side(adapter.processor.image_processor)
    return [task.image(side) for task in tasks]


def correctness(predictions: list[str], tasks: list[Task], settings: DictConfig) -> np.ndarray:
    return np.array(
        [
            is_correct(text, task.answers, settings.match, settings.number_words, settings.strip_articles)
            for text, task in zip(predictions, tasks, strict=True)
        ]
    )


# -- signals ----------------------------------------------------------------------------------------------
def answer_scores(
    logits: list[torch.Tensor], tokens: torch.Tensor, eos_ids: set[int]
) -> dict[str, np.ndarray]:
    """Per sample, from the raw logits of each generated step ((batch, vocab) per step) and the generated
    tokens (batch, steps): mean log-prob of the tokens before the first eos (the first token when the
    answer is empty), top-1 minus top-2 logit and entropy (nats) at the first step."""
    stacked = torch.stack([step.float() for step in logits], dim=1)  # (batch, steps, vocab)
    log_probs = torch.log_softmax(stacked, dim=-1)
    chosen = log_probs.gather(-1, tokens[..., None].to(log_probs.device))[..., 0]
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= tokens == eos
    before_eos = (is_eos.long().cumsum(1) == 0).to(chosen.device)
    before_eos[:, 0] = True
    mean_logprob = (chosen * before_eos).sum(1) / before_eos.sum(1)
    top2 = stacked[:, 0].topk(2, dim=-1).values
    first = log_probs[:, 0]
    entropy = -(first.exp() * first).sum(-1)
    return {
        "mean_logprob": mean_logprob.cpu().numpy(),
        "logit_margin": (top2[:, 0] - top2[:, 1]).cpu().numpy(),
        "entropy": entropy.cpu().numpy(),
    }


def self_consistency(
    sample: Callable[[int], list[str]], k: int, key: Callable[[str], str] = normalize_answer
) -> np.ndarray:
    """Per item, the fraction of `k` sampled answers that agree with the most common one (after `key`).
    `sample(draw)` returns one answer per item for draw 0..k-1 (seeded by the caller)."""
    draws = [[key(text) for text in sample(draw)] for draw in range(k)]
    per_item = zip(*draws, strict=True)
    return np.array([Counter(answers).most_common(1)[0][1] / k for answers in per_item])


def attention_structure(weights: np.ndarray, grid: tuple[int, int], top_fraction: float) -> dict[str, float]:
    """Spatial entropy (nats), top-`top_fraction` mass and the number of 8-connected clusters of the top
    cells of one attention map over image tokens (`weights` in patch order, renormalised here)."""
    total = float(weights.sum())
    p = weights / total if total > 0 else np.full_like(weights, 1 / weights.size)
    nonzero = p[p > 0]
    top = np.argsort(p, kind="stable")[-max(1, math.ceil(top_fraction * p.size)) :]
    mask = np.zeros(p.size, dtype=bool)
    mask[top] = True
    _, clusters = ndimage.label(mask.reshape(grid), structure=np.ones((3, 3)))
    return {
        "attention_entropy": float(-(nonzero * np.log(nonzero)).sum()),
        "attention_top_mass": float(p[top].sum()),
        "attention_clusters": float(clusters),
    }


def image_grid(adapter: ModelAdapter, batch, index: int, n_tokens: int) -> tuple[int, int]:
    """The (rows, columns) patch grid of one sample's image tokens: Qwen2-VL's merged grid, else a square,
    else one row (a layout this cannot recover, e.g. LLaVA-NeXT's tiles)."""
    if "image_grid_thw" in batch:
        merge = getattr(adapter.model.config.vision_config, "spatial_merge_size", 2)
        t, h, w = (int(v) for v in batch["image_grid_thw"][index])
        if t * (h // merge) * (w // merge) == n_tokens:
            return t * (h // merge), w // merge
    side = math.isqrt(n_tokens)
    return (side, side) if side * side == n_tokens else (1, n_tokens)


@contextmanager
def eager_attention(adapter: ModelAdapter) -> Iterator[None]:
    """Eager attention for the duration (SDPA and flash kernels return no attention weights)."""
    before = adapter.model.config._attn_implementation
    if before == "eager":
        yield
        return
    adapter.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        adapter.model.set_attn_implementation(before)


@torch.no_grad()
def attention_signals(
    adapter: ModelAdapter, batch, top_fraction: float
) -> tuple[np.ndarray, list[Optional[tuple[np.ndarray, tuple[int, int]]]]]:
    """(layers, batch, 3) attention structure of the last prompt token over each sample's image tokens, and
    per sample its layer-averaged map over the image tokens with their patch grid (None without any)."""
    output = adapter.model(**batch, output_attentions=True, use_cache=False)
    image_mask = adapter.image_token_mask(batch).cpu()
    result = np.full((len(output.attentions), image_mask.shape[0], len(ATTENTION_SIGNALS)), np.nan)
    sums: list = [None] * image_mask.shape[0]
    for layer, attention in enumerate(output.attentions):
        last = attention[:, :, -1].float().mean(1).cpu()  # (batch, keys), heads averaged
        for index in range(last.shape[0]):
            weights = last[index][image_mask[index]].numpy()
            if weights.size:
                grid = image_grid(adapter, batch, index, weights.size)
                stats = attention_structure(weights, grid, top_fraction)
                result[layer, index] = [stats[name] for name in ATTENTION_SIGNALS]
                sums[index] = weights if sums[index] is None else sums[index] + weights
    maps = [
        None if total is None else (total / len(output.attentions), image_grid(adapter, batch, i, total.size))
        for i, total in enumerate(sums)
    ]
    return result, maps


@dataclass
class Measured:
    """One model's answers and per-sample signals on the tasks."""

    predictions: list[str]
    correct: np.ndarray  # (n,) bool
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,)
    hidden: Optional[np.ndarray] = None  # (n_layers + 1, n, d_model) last prompt token residual
    attention: Optional[np.ndarray] = None  # (layers, n, 3) ATTENTION_SIGNALS
    attention_maps: list = field(default_factory=list)  # per sample (layer-mean map, grid) or None
    probe_scores: dict[tuple[str, Optional[int]], np.ndarray] = field(default_factory=dict)


def eos_token_ids(adapter: ModelAdapter) -> set[int]:
    eos = adapter.model.generation_config.eos_token_id or adapter.tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids | {adapter.pad_token_id}


@torch.no_grad()
def measure(adapter: ModelAdapter, tasks: list[Task], settings: DictConfig, seed: int, name: str) -> Measured:
    """Greedy answers with their scores, the last-token residual of every layer, the attention structure
    (VLM tasks with images), then self-consistency samples."""
    prompts = [prompt_of(task, settings) for task in tasks]
    images = task_images(adapter, tasks)
    with_attention = settings.attention and images is not None
    eos_ids = eos_token_ids(adapter)
    predictions, scores, hidden, attention, maps = [], [], [], [], []
    starts = range(0, len(tasks), settings.batch_size)
    for start in track(starts, description=f"reliability {name}"):
        stop = start + settings.batch_size
        batch = adapter.encode(prompts[start:stop], images=None if images is None else images[start:stop])
        hidden.append(adapter.residual_stream(batch, positions=[-1])[:, :, 0].float().cpu().numpy())
        if with_attention:
            with eager_attention(adapter):
                structure, batch_maps = attention_signals(adapter, batch, settings.top_fraction)
                attention.append(structure)
                maps += batch_maps
        output = adapter.model.generate(
            **batch,
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=adapter.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = output.sequences[:, batch["input_ids"].shape[1] :]
        predictions += adapter.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        scores.append(answer_scores(list(output.logits), tokens, eos_ids))
    measured = Measured(predictions, correctness(predictions, tasks, settings))
    measured.signals = {key: np.concatenate([s[key] for s in scores]) for key in scores[0]}
    measured.hidden = np.concatenate(hidden, axis=1)
    if attention:
        measured.attention = np.concatenate(attention, axis=1)
        measured.attention_maps = maps
    if settings.k_samples:

        def sample(draw: int) -> list[str]:
            return generate_all(
                adapter,
                prompts,
                images=images,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                do_sample=True,
                seed=seed + 1 + draw,
                description=f"reliability {name} sample {draw + 1}/{settings.k_samples}",
                temperature=settings.temperature,
                top_p=settings.top_p,
            )

        def key(text: str) -> str:
            return normalize_answer(text, settings.number_words, settings.strip_articles)

        measured.signals["self_consistency"] = self_consistency(sample, settings.k_samples, key)
    return measured


# -- probes ---------------------------------------------------------------------------------------------
def probe_scores(
    features: np.ndarray, correct: np.ndarray, folds: int = 5, seed: int = 0, c: float = 1.0
) -> Optional[np.ndarray]:
    """Held-out P(correct) per sample from a standardised logistic-regression probe under stratified k-fold
    CV (each sample scored by the probe that never saw it); None when a class has fewer than `folds`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(correct).astype(int)
    if min(int(labels.sum()), int((1 - labels).sum())) < folds:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(probe, features, labels, cv=splitter, method="predict_proba")[:, 1]


def fit_probes(measured: Measured, settings: DictConfig, seed: int, name: str, kinds: list[str]) -> None:
    """Held-out probe scores per layer and for the last-k concatenation, into `measured.probe_scores`, and
    a baseline probe on the task kind alone (`probe_task_kind`, with several kinds): when correctness
    follows the kind, a hidden-state probe can score well by reading the kind from the prompt, and only
    the margin over this baseline is reliability the task kind does not explain."""
    counts = (int(measured.correct.sum()), int((~measured.correct).sum()))
    if min(counts) < settings.folds:
        log.info(
            "reliability %s: no probes: %d correct and %d wrong answers, %d of each needed (folds)",
            name,
            *counts,
            settings.folds,
        )
        return
    hidden = measured.hidden
    for layer in track(range(hidden.shape[0]), description=f"reliability {name} probes"):
        scores = probe_scores(hidden[layer], measured.correct, settings.folds, seed, settings.probe_c)
        measured.probe_scores["probe", layer] = scores
    last = hidden[-settings.last_k_layers :]
    concatenated = np.concatenate(list(last), axis=1)
    scores = probe_scores(concatenated, measured.correct, settings.folds, seed, settings.probe_c)
    measured.probe_scores[f"probe_last{settings.last_k_layers}", None] = scores
    names = sorted(set(kinds))
    if len(names) > 1:
        one_hot = np.array([[kind == name for name in names] for kind in kinds], dtype=float)
        scores = probe_scores(one_hot, measured.correct, settings.folds, seed, settings.probe_c)
        measured.probe_scores["probe_task_kind", None] = scores


# -- relating signals to correctness --------------------------------------------------------------------
def auroc_rows_of(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row of `scores` (resamples, n) against the same row of bool `labels` (rank-sum form,
    ties averaged: equal to roc_auc_score); NaN where a row holds one class."""
    ranks = rankdata(scores, axis=-1)
    positives = labels.sum(-1)
    negatives = labels.shape[-1] - positives
    u = (ranks * labels).sum(-1) - positives * (positives + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)


def pointbiserial_rows_of(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pearson r of each row of `scores` with the same row of 0/1 `labels`; NaN where either is constant."""
    x = scores - scores.mean(-1, keepdims=True)
    y = labels - labels.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    return np.where(np.isfinite(r), r, np.nan)


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def relate(scores: np.ndarray, correct: np.ndarray, n_resamples: int, seed: int) -> dict[str, tuple]:
    """{"auroc" | "pointbiserial_r": (value, low, high)} of a signal with correctness, percentile bootstrap
    95% CIs over samples (resamples holding one class are left out); a metric is absent when undefined
    (one class; r of a constant signal)."""
    from sklearn.metrics import roc_auc_score

    scores, correct = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    if correct.all() or not correct.any() or not np.isfinite(scores).all():
        return {}
    index = resample_indices(len(scores), n_resamples, seed)
    out = {
        "auroc": (
            float(roc_auc_score(correct, scores)),
            *_interval(auroc_rows_of(scores[index], correct[index])),
        )
    }
    if np.ptp(scores) > 0:
        r = float(pointbiserialr(correct, scores).statistic)
        out["pointbiserial_r"] = (r, *_interval(pointbiserial_rows_of(scores[index], correct[index])))
    return out


def delta_auroc(
    base: tuple[np.ndarray, np.ndarray],
    compressed: tuple[np.ndarray, np.ndarray],
    n_resamples: int,
    seed: int,
) -> Optional[tuple[float, float, float]]:
    """Compressed minus base AUROC (each with its own correctness), paired bootstrap over the same samples."""
    from sklearn.metrics import roc_auc_score

    (scores_b, correct_b), (scores_c, correct_c) = base, compressed
    for scores, correct in (base, compressed):
        if correct.all() or not correct.any() or not np.isfinite(scores).all():
            return None
    index = resample_indices(len(scores_b), n_resamples, seed)
    deltas = auroc_rows_of(scores_c[index], correct_c[index]) - auroc_rows_of(
        scores_b[index], correct_b[index]
    )
    value = roc_auc_score(correct_c, scores_c) - roc_auc_score(correct_b, scores_b)
    return (float(value), *_interval(deltas))


def all_signals(measured: Measured) -> dict[tuple[str, Optional[int]], np.ndarray]:
    """(group, layer) -> per-sample scores: behaviour, held-out probes, attention per layer."""
    out: dict[tuple[str, Optional[int]], np.ndarray] = {(k, None): v for k, v in measured.signals.items()}
    out.update({key: scores for key, scores in measured.probe_scores.items() if scores is not None})
    if measured.attention is not None:
        for layer in range(measured.attention.shape[0]):
            for position, name in enumerate(ATTENTION_SIGNALS):
                out[name, layer] = measured.attention[layer, :, position]
    return out


def model_rows(
    variant: str, measured: Measured, tasks: list[Task], settings: DictConfig, seed: int
) -> list[dict]:
    rows = []
    kinds = {"all": np.ones(len(tasks), dtype=bool)}
    kinds |= {
        kind: np.array([t.kind == kind for t in tasks]) for kind in dict.fromkeys(t.kind for t in tasks)
    }
    for group, members in kinds.items():
        rate, low, high = proportion_ci(list(measured.correct[members]))
        rows.append(
            ci_row(
                ANALYSIS,
                variant,
                "accuracy",
                (rate, low, high),
                n=int(members.sum()),
                group=group,
            )
        )
    skipped = []
    for (group, layer), scores in all_signals(measured).items():
        related = relate(scores, measured.correct, settings.n_bootstrap, seed)
        if not related:
            skipped.append(group if layer is None else f"{group}@{layer}")
        for metric, (value, low, high) in related.items():
            rows.append(
                ci_row(
                    ANALYSIS,
                    variant,
                    metric,
                    (value, low, high),
                    n=len(scores),
                    layer=layer,
                    group=group,
                )
            )
    if skipped:
        log.info(
            "reliability %s: no AUROC for %s (accuracy %.3f: one class, or a non-finite signal)",
            variant,
            ", ".join(skipped),
            float(measured.correct.mean()),
        )
    return rows


def comparison_rows(base: Measured, compressed: Measured, settings: DictConfig, seed: int) -> list[dict]:
    difference = compressed.correct.astype(float) - base.correct.astype(float)
    value, low, high = bootstrap_ci(difference, seed=seed, n_resamples=settings.n_bootstrap)
    rows = [ci_row(ANALYSIS, "comparison", "delta_accuracy", (value, low, high), n=len(difference))]

    def key(text: str) -> str:
        return normalize_answer(text, settings.number_words, settings.strip_articles)

    agree = [key(a) == key(b) for a, b in zip(base.predictions, compressed.predictions, strict=True)]
    rate, low, high = proportion_ci(agree)
    rows.append(ci_row(ANALYSIS, "comparison", "answer_agreement", (rate, low, high), n=len(agree)))
    base_signals, compressed_signals = all_signals(base), all_signals(compressed)
    for (group, layer), scores_b in base_signals.items():
        if (group, layer) not in compressed_signals:
            continue
        delta = delta_auroc(
            (scores_b, base.correct),
            (compressed_signals[group, layer], compressed.correct),
            settings.n_bootstrap,
            seed,
        )
        if delta is not None:
            value, low, high = delta
            rows.append(
                ci_row(
                    ANALYSIS,
                    "comparison",
                    "delta_auroc",
                    (value, low, high),
                    n=len(scores_b),
                    layer=layer,
                    group=group,
                )
            )
    return rows


def sample_table(variant: str, measured: Measured, tasks: list[Task], settings: DictConfig) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "variant": variant,
            "id": [t.id for t in tasks],
            "kind": [t.kind for t in tasks],
            "question": [t.question for t in tasks],
            "answers": ["|".join(t.answers) for t in tasks],
            "prediction": measured.predictions,
            "correct": measured.correct,
            **measured.signals,
        }
    )
    last = measured.probe_scores.get((f"probe_last{settings.last_k_layers}", None))
    if last is not None:
        table[f"probe_last{settings.last_k_layers}"] = last
    if measured.attention is not None:
        for layer in range(measured.attention.shape[0]):
            for position, name in enumerate(ATTENTION_SIGNALS):
                table[f"{name}_l{layer}"] = measured.attention[layer, :, position]
    return table


# -- causal check: ablate the probe's top neurons -------------------------------------------------------
def top_probe_neurons(features: np.ndarray, correct: np.ndarray, k: int, c: float = 1.0) -> np.ndarray:
    """The `k` residual coordinates with the largest |weight| of a standardised logistic-regression probe fit
    on the given samples (weights per standard deviation, so coordinate scales do not decide)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(features)
    probe = LogisticRegression(C=c, max_iter=2000).fit(scaled, np.asarray(correct).astype(int))
    return np.argsort(-np.abs(probe.coef_[0]), kind="stable")[:k]


@contextmanager
def ablated_neurons(
    adapter: ModelAdapter, layer: int, indices: np.ndarray, values: np.ndarray
) -> Iterator[None]:
    """Set residual coordinates `indices` to `values` (zeros, or their means) at every position of residual
    entry `layer` (the input of decoder layer `layer`; `n_layers`: the last layer's output)."""
    index = torch.as_tensor(indices, dtype=torch.long)
    replacement = torch.as_tensor(values, dtype=torch.float32)

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[..., index.to(hidden.device)] = replacement.to(hidden.device, hidden.dtype)
        return hidden

    if layer < adapter.n_layers:
        context = adapter.hook_layer_input(layer, fn)
    else:
        context = adapter.hook_layer_output(layer - 1, fn)
    with context:
        yield


def intervention_rows(
    variant: str, prefix: str, per_task: np.ndarray, reference: np.ndarray, settings, seed: int, **optional
) -> list[dict]:
    """`<prefix>_accuracy` and `<prefix>_delta_accuracy` (minus the unintervened accuracy of the same tasks),
    each with a bootstrap CI over tasks."""
    return [
        ci_row(
            ANALYSIS,
            variant,
            f"{prefix}_{metric}",
            bootstrap_ci(values, seed=seed, n_resamples=settings.n_bootstrap),
            n=len(per_task),
            **optional,
        )
        for metric, values in (("accuracy", per_task), ("delta_accuracy", per_task - reference))
    ]


def ablation_layer(settings: DictConfig, adapter: ModelAdapter) -> int:
    layer = adapter.n_layers if settings.ablate_layer == "last" else int(settings.ablate_layer)
    return min(max(layer, 1), adapter.n_layers)


def causal_rows(
    variant: str,
    adapter: ModelAdapter,
    measured: Measured,
    tasks: list[Task],
    settings: DictConfig,
    seed: int,
) -> list[dict]:
    """Accuracy with the probe's top-k neurons of one residual entry zeroed or set to their mean, against
    k random neurons (`random_seeds` draws): `ablation_accuracy` and `ablation_delta_accuracy` (minus the
    unablated accuracy, paired bootstrap over tasks), group "<mode>_top<k>" / "<mode>_random<k>".
    Held out: the neurons and their means come from a seeded stratified half of the tasks, and the
    accuracies are measured on the other half."""
    if min(int(measured.correct.sum()), int((~measured.correct).sum())) < 4:
        log.info("reliability %s: no causal check: each half needs 2 right and 2 wrong answers", variant)
        return []
    from sklearn.model_selection import train_test_split

    select, held_out = train_test_split(
        np.arange(len(tasks)), test_size=0.5, stratify=measured.correct, random_state=seed
    )
    layer = ablation_layer(settings, adapter)
    features = measured.hidden[layer][select]
    k = min(settings.ablate_k, features.shape[1])
    chosen = {"top": [top_probe_neurons(features, measured.correct[select], k, settings.probe_c)]}
    rng = np.random.default_rng(seed)
    chosen["random"] = [rng.choice(features.shape[1], k, replace=False) for _ in range(settings.random_seeds)]
    tasks = [tasks[i] for i in held_out]
    unablated = measured.correct[held_out].astype(float)
    prompts = [prompt_of(task, settings) for task in tasks]
    images = task_images(adapter, tasks)
    rows = []
    for mode in settings.ablate_modes:
        for kind, draws in chosen.items():
            outcomes = []
            for indices in draws:
                values = np.zeros(k) if mode == "zero" else features[:, indices].mean(0)
                with ablated_neurons(adapter, layer, indices, values):
                    answers = generate_all(
                        adapter,
                        prompts,
                        images=images,
                        max_new_tokens=settings.max_new_tokens,
                        batch_size=settings.batch_size,
                        description=f"reliability {variant} {mode}-ablate {kind} {k}",
                    )
                outcomes.append(correctness(answers, tasks, settings).astype(float))
            per_task = np.mean(outcomes, axis=0)  # random: averaged over the draws
            rows += intervention_rows(
                variant,
                "ablation",
                per_task,
                unablated,
                settings,
                seed,
                layer=layer,
                group=f"{mode}_{kind}{k}",
            )
    return rows


# -- causal check: mask the most attended image patches -----------------------------------------------------
def masked_image(image, grid: tuple[int, int], cells: np.ndarray, fill: tuple[int, int, int]):
    """A copy of `image` with the patch-grid `cells` (row-major indices) painted `fill`."""
    from PIL import ImageDraw

    image = image.copy()
    draw = ImageDraw.Draw(image)
    rows, columns = grid
    width, height = image.size
    for cell in cells:
        r, c = divmod(int(cell), columns)
        box = (
            c * width / columns,
            r * height / rows,
            (c + 1) * width / columns - 1,
            (r + 1) * height / rows - 1,
        )
        draw.rectangle(box, fill=fill)
    return image


def patch_mask_rows(
    variant: str,
    adapter: ModelAdapter,
    measured: Measured,
    tasks: list[Task],
    settings: DictConfig,
    seed: int,
) -> list[dict]:
    """Accuracy with the `mask_fraction` most attended image patches (the last prompt token's layer- and
    head-averaged attention) painted the processor's mean colour, against as many random patches
    (`random_seeds` draws): `patch_mask_accuracy` and `patch_mask_delta_accuracy` (paired bootstrap over
    tasks), group "top<percent>" / "random<percent>". Tasks whose image tokens form no 2-D grid: left out."""
    usable = [i for i, m in enumerate(measured.attention_maps) if m is not None and min(m[1]) > 1]
    if not measured.attention_maps:
        return []  # text tasks, or attention=false
    if not usable:
        log.info("reliability %s: no patch masking: no image-token grid to mask", variant)
        return []
    from vlmsafe_cli.compress.calibration import image_side

    side = image_side(adapter.processor.image_processor)
    mean = getattr(adapter.processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    fill = tuple(int(round(255 * channel)) for channel in mean)
    rng = np.random.default_rng(seed)
    subset = [tasks[i] for i in usable]
    prompts = [prompt_of(task, settings) for task in subset]
    originals = [task.image(side) for task in subset]
    percent = int(round(100 * settings.mask_fraction))
    draws = {"top": 1, "random": settings.random_seeds}
    unmasked = measured.correct[usable].astype(float)
    rows = []
    for kind, count in draws.items():
        outcomes = []
        for _ in range(count):
            images = []
            for image, index in zip(originals, usable, strict=True):
                weights, grid = measured.attention_maps[index]
                k = max(1, int(round(settings.mask_fraction * weights.size)))
                cells = (
                    np.argsort(-weights, kind="stable")[:k]
                    if kind == "top"
                    else rng.choice(weights.size, k, replace=False)
                )
                images.append(masked_image(image, grid, cells, fill))
            answers = generate_all(
                adapter,
                prompts,
                images=images,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.batch_size,
                description=f"reliability {variant} mask {kind} {percent}%",
            )
            outcomes.append(correctness(answers, subset, settings).astype(float))
        per_task = np.mean(outcomes, axis=0)
        rows += intervention_rows(
            variant, "patch_mask", per_task, unmasked, settings, seed, group=f"{kind}{percent}"
        )
    return rows


def run(workspace, settings: DictConfig) -> list[dict]:
    cfg = workspace.cfg
    models = workspace.adapters()
    tasks = load_tasks(settings, models["base"], cfg.seed)
    rows, tables, measured = [], [], {}
    for variant, adapter in models.items():
        measured[variant] = measure(adapter, tasks, settings, cfg.seed, variant)
        fit_probes(measured[variant], settings, cfg.seed, variant, [task.kind for task in tasks])
        rows += model_rows(variant, measured[variant], tasks, settings, cfg.seed)
        if settings.causal:
            rows += causal_rows(variant, adapter, measured[variant], tasks, settings, cfg.seed)
            rows += patch_mask_rows(variant, adapter, measured[variant], tasks, settings, cfg.seed)
        tables.append(sample_table(variant, measured[variant], tasks, settings))
        log.info(
            "reliability %s: accuracy %.3f on %d tasks", variant, measured[variant].correct.mean(), len(tasks)
        )
    if "compressed" in measured:
        rows += comparison_rows(measured["base"], measured["compressed"], settings, cfg.seed)
    write_table(pd.concat(tables, ignore_index=True), workspace.artifacts, "reliability_samples")
    return rows
