"""Settings schemas of the analyses (the YAML under conf/analysis/), with the value checks types cannot
express; kept free of torch so that validation runs before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from vlmsafe_cli.errors import UserError

VLM_FAMILIES = ("llava", "paligemma", "qwen2vl")


@dataclass
class RefusalDirectionSettings:
    n_train: int = 128  # per class, for the candidate mean differences
    n_val: int = 32  # per class, for selection
    n_test: int = 32  # per class, for the reported rates
    refusal_tokens: List[str] = field(default_factory=lambda: ["I", "As"])
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    max_layer_fraction: float = 0.8
    coefficients: List[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # addition scan
    max_new_tokens: int = 64
    batch_size: int = 32
    with_image: bool = False  # VLMs: pair every prompt with a seeded synthetic image


def check_refusal_direction(settings: DictConfig, cfg: DictConfig) -> None:
    for key in ("n_train", "n_val", "n_test", "max_new_tokens", "batch_size"):
        if settings[key] < 1:
            raise UserError(f"analysis.refusal_direction.{key}={settings[key]} must be a positive integer")
    if not 0 < settings.max_layer_fraction <= 1:
        raise UserError(
            f"analysis.refusal_direction.max_layer_fraction={settings.max_layer_fraction}: use (0, 1]"
        )
    if not settings.refusal_tokens:
        raise UserError(
            "analysis.refusal_direction.refusal_tokens is empty: give at least one token, e.g. [I, As]"
        )
    if settings.with_image and cfg.model.family not in VLM_FAMILIES:
        raise UserError(
            f"analysis.refusal_direction.with_image=true needs a VLM; {cfg.model.name} is a text model"
        )
    _check_split_sizes(cfg.data, settings.n_train + settings.n_val + settings.n_test, "refusal_direction")


def _check_split_sizes(data: DictConfig, needed: int, analysis: str) -> None:
    """Each class of prompts must hold the analysis' train + val + test prompts (read from data=)."""
    from vlmsafe_cli.data.prompts import load_prompt_sets

    for kind, prompts in zip(("harmful", "harmless"), load_prompt_sets(data), strict=True):
        if len(prompts) < needed:
            raise UserError(
                f"analysis.{analysis}: {len(prompts)} {kind} prompts in data={data.name}, {needed} needed "
                "(n_train + n_val + n_test); lower the split sizes or give a larger data set"
            )
