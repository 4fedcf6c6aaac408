"""`analysis=safety`: refusal on a public safety set or local prompt files (`data=advbench|harmbench|
jailbreakbench|strongreject|xstest|mmsafetybench|figstep|local`), base and compressed.

The same generation and judging as `analysis=vlmsafe420`, but items are not paired: per category (and
"all", group "<category>/<modality>") the harmful items give `genuine_refusal_rate`,
`refusal_then_comply_rate`, `asr`, `degenerate_rate` and the benign ones (XSTest's safe prompts,
JailbreakBench's benign behaviours, `data.harmless=`) `over_refusal_rate` and `benign_degenerate_rate`, each
with a 95% bootstrap CI over items and n. Compressed jobs add paired `delta_<metric>` rows. Image items
(MM-SafetyBench, FigStep) need a VLM; a text-only model skips them (logged). `data.n` samples n items of
each class, seeded.
"""

from __future__ import annotations

import logging
import random

from omegaconf import DictConfig

from vlmsafe_cli.analysis.vlmsafe420 import (
    BENIGN_METRICS,
    HARMFUL_METRICS,
    bootstrap_row,
    completion_records,
    generate,
    write_completions,
)
from vlmsafe_cli.data.public import SafetyItem, load_public_set
from vlmsafe_cli.errors import UserError
from vlmsafe_cli.judge import make_judge

log = logging.getLogger("vlmsafe.safety")
ANALYSIS = "safety"
DELTA_METRICS = ("genuine_refusal_rate", "asr", "over_refusal_rate")


def safety_items(data: DictConfig) -> list[SafetyItem]:
    """The configured set's items, `data.n` of each class (seeded)."""
    if data.name == "local":
        from vlmsafe_cli.data.prompts import read_prompt_file

        items = []
        for key, harmful in (("harmful", True), ("harmless", False)):
            if data[key]:
                texts = read_prompt_file(data[key])
                items += [SafetyItem(f"local-{key}-{i:04d}", text, harmful) for i, text in enumerate(texts)]
    else:
        items = load_public_set(data.name, data.path, data.image_kind)
    if data.n is not None:
        rng = random.Random(data.seed)
        sampled = []
        for harmful in (True, False):
            group = [item for item in items if item.harmful == harmful]
            sampled += group if data.n >= len(group) else rng.sample(group, data.n)
        items = sampled
    return items


def _metric_values(labels: dict[str, str], items: list[SafetyItem], metric: str) -> dict[str, float]:
    harmful = metric in HARMFUL_METRICS
    wanted = HARMFUL_METRICS[metric] if harmful else BENIGN_METRICS[metric]
    return {item.id: float(labels[item.id] in wanted) for item in items if item.harmful == harmful}


def _groups(items: list[SafetyItem]) -> dict[str, list[SafetyItem]]:
    out = {"all": items}
    for category in sorted({item.category for item in items if item.category}):
        out[category] = [item for item in items if item.category == category]
    return out


def rate_rows(
    variant: str, modality: str, items: list[SafetyItem], labels: dict[str, str], seed: int
) -> list:
    rows = []
    for metric in (*HARMFUL_METRICS, *BENIGN_METRICS):
        for group, members in _groups(items).items():
            values = _metric_values(labels, members, metric)
            if values:
                rows.append(
                    bootstrap_row(
                        variant, metric, list(values.values()), f"{group}/{modality}", seed, ANALYSIS
                    )
                )
    return rows


def delta_rows(
    modality: str, items: list, base: dict[str, str], compressed: dict[str, str], seed: int
) -> list:
    rows = []
    for metric in DELTA_METRICS:
        for group, members in _groups(items).items():
            before, after = _metric_values(base, members, metric), _metric_values(compressed, members, metric)
            if before:
                differences = [after[key] - before[key] for key in before]
                group_name = f"{group}/{modality}"
                rows.append(
                    bootstrap_row("comparison", f"delta_{metric}", differences, group_name, seed, ANALYSIS)
                )
    return rows


def run(workspace, settings: DictConfig) -> list[dict]:
    cfg = workspace.cfg
    items = safety_items(cfg.data)
    models = workspace.adapters()
    rater = make_judge(cfg.judge, workspace.device)
    by_modality = {m: [item for item in items if item.modality == m] for m in ("text", "image_text")}
    rows, records, labels = [], [], {}
    for variant, adapter in models.items():
        for modality, members in by_modality.items():
            if not members:
                continue
            if modality != "text" and not adapter.is_vlm:
                log.info(
                    "safety: %d image items skipped: %s is a text-only model", len(members), cfg.model.name
                )
                continue
            completions = generate(adapter, members, settings, cfg.seed)
            judged = rater.labels([i.text for i in members], completions, [i.harmful for i in members])
            labels[variant, modality] = {item.id: label for item, label in zip(members, judged, strict=True)}
            rows += rate_rows(variant, modality, members, labels[variant, modality], cfg.seed)
            records += completion_records(members, completions, judged, variant)
    for (variant, modality), compressed in labels.items():
        if variant == "compressed" and ("base", modality) in labels:
            rows += delta_rows(
                modality, by_modality[modality], labels["base", modality], compressed, cfg.seed
            )
    if not records:
        raise UserError(f"analysis=safety: no item of data={cfg.data.name} can run on {cfg.model.name}")
    write_completions(workspace, records)
    return rows
