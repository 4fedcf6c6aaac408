"""Perplexity on held-out text, the standard utility check of a compressed language model.

ppl = exp(mean next-token NLL) over `compress.ppl_samples` windows of `compress.ppl_seq_len` tokens drawn
from the evaluation half of `compress.calibration.dataset` (disjoint from the calibration text, see
data/corpus.py); the 95% CI is a percentile bootstrap of the mean NLL over windows, exponentiated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from vlmsafe_cli import cache
from vlmsafe_cli.data.corpus import load_text, token_windows
from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import get_adapter
from vlmsafe_cli.results import row
from vlmsafe_cli.stats import bootstrap_ci

BATCH_SIZE = 4  # windows per forward: bounds the (batch, seq_len, vocab) logits in memory


def evaluation_windows(loaded: LoadedModel, comp: DictConfig, seed: int) -> torch.Tensor:
    """(ppl_samples, ppl_seq_len) token ids at seeded offsets in the evaluation text (no bos: mid-text)."""
    text = load_text(comp.calibration.dataset, "evaluation")
    tokenizer = get_adapter(loaded).tokenizer
    return token_windows(tokenizer, text, comp.ppl_samples, comp.ppl_seq_len, seed)


@torch.no_grad()
def window_nlls(loaded: LoadedModel, windows: torch.Tensor) -> list[float]:
    """Mean next-token negative log-likelihood (nats) of each window, text only (also on a VLM)."""
    device = get_adapter(loaded).device
    nlls: list[float] = []
    for batch in windows.split(BATCH_SIZE):
        batch = batch.to(device)
        logits = loaded.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        nlls += losses.view(batch.shape[0], -1).mean(dim=1).tolist()
    return nlls


def perplexity_rows(
    loaded: LoadedModel, comp: DictConfig, variant: str, seed: int, cache_key: Optional[dict] = None
) -> list[dict]:
    """The `ppl` row of `loaded` (none when compress.ppl_samples is 0); with `cache_key` (the base model's
    identity) the per-window NLLs are cached, so a sweep measures the base model once."""
    if comp.ppl_samples == 0:
        return []

    def compute() -> list[float]:
        return window_nlls(loaded, evaluation_windows(loaded, comp, seed))

    if cache_key is None:
        nlls = compute()
    else:
        settings = {"dataset": comp.calibration.dataset, "n": comp.ppl_samples, "seq_len": comp.ppl_seq_len}
        key = {**cache_key, "ppl": settings, "seed": seed}

        def build(tmp: Path) -> None:
            (tmp / "nlls.json").write_text(json.dumps(compute()))

        def load(path: Path) -> list[float]:
            values = json.loads((path / "nlls.json").read_text())
            if len(values) != comp.ppl_samples or not all(math.isfinite(v) for v in values):
                raise ValueError("cached NLLs do not match the settings")
            return values

        nlls = cache.get_or_build("ppl", key, build, load)
    mean_nll, low, high = bootstrap_ci(nlls, seed=seed)
    n_tokens = len(nlls) * (comp.ppl_seq_len - 1)
    return [
        row(
            "compression",
            variant,
            "ppl",
            math.exp(mean_nll),
            ci_low=math.exp(low),
            ci_high=math.exp(high),
            n=n_tokens,
            split="evaluation",
        )
    ]
