"""`analysis=circuits`: which attention heads and MLPs (per token group) carry a task, in the base and the
compressed model, by node attribution on clean/corrupted pairs (vlmsafe_cli/circuits.py).

Tasks (`task=`): `refusal` (a harmful request vs its benign counterfactual, from VLMSafe-420 in the
chosen modality, or the data= harmful/harmless sets zipped; metric = logit difference between refusal
first tokens and compliance first tokens), `visual_counterfactual` (VLMs: the same question on an image
and on one that changes a colour, size or count; metric = logit difference of the two answers) and
`pairs` (a JSONL file of {clean, corrupted[, clean_answer, corrupted_answer, clean_image,
corrupted_image]}; answers given -> their logit difference, else the refusal metric).

Rows per model (variant base / compressed): `metric_clean`, `metric_corrupted` (mean logit difference, CI
over pairs), `faithfulness_base` / `faithfulness_compressed` (group `top<k>`: the fraction of the clean -
corrupted gap the model's own top-k circuit recovers with every other node mean-ablated),
`faithfulness_base_circuit_in_compressed`, `score_mass` (per layer: share of the total |score|; group
attn / mlp / all), `pearson_exact` (with `validate=true`: the method's node scores against exact
activation patching). Comparison rows: `jaccard_topk` (group `top<k>`), `spearman` of node scores (group
all / attn / mlp), each with a bootstrap CI over pairs. Artifacts: circuits_nodes.parquet/.csv (every
node's mean score per model), circuits_heatmap.png (layer x component: base, compressed, difference).

With `edges=true` (language part; attribution_patching, or eap_ig on ig_path=inputs): `n_edges` per model
(the edges scored: upstream writer -> later reader, per token group with positions) and the comparison
`edge_jaccard_topk` (group `top<k>`, bootstrap CI over pairs); artifact circuits_edges.parquet/.csv.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from vlmsafe_cli import circuits
from vlmsafe_cli.errors import JobError
from vlmsafe_cli.models.adapter import ModelAdapter
from vlmsafe_cli.progress import track
from vlmsafe_cli.results import ci_row, row, write_table
from vlmsafe_cli.stats import bootstrap_ci

log = logging.getLogger("vlmsafe.circuits")
ANALYSIS = "circuits"


# -- tasks ----------------------------------------------------------------------------------------------
def answer_ids(adapter: ModelAdapter, words: list[str]) -> list[int]:
    """First token ids of each word as an answer may begin (bare, with a leading space, capitalised)."""
    ids = []
    for word in words:
        for variant in {word, f" {word}", word.capitalize(), f" {word.capitalize()}"}:
            encoded = adapter.tokenizer.encode(variant, add_special_tokens=False)
            if encoded and encoded[0] not in ids:
                ids.append(encoded[0])
    return ids


def _disjoint(positive: list[int], negative: list[int], what: str) -> tuple[list[int], list[int]]:
    shared = set(positive) & set(negative)
    positive, negative = [i for i in positive if i not in shared], [i for i in negative if i not in shared]
    if not positive or not negative:
        raise JobError(f"circuits: the two answers of {what} share their first tokens; choose other words")
    return positive, negative


def _sample(items: list, n: int, seed: int) -> list:
    return items if n >= len(items) else random.Random(seed).sample(items, n)


def task_items(workspace, adapter: ModelAdapter, settings: DictConfig) -> list[dict]:
    """The task's pairs: {clean, corrupted, positive, negative, clean_image, corrupted_image}."""
    cfg = workspace.cfg
    refusal = answer_ids(adapter, list(settings.refusal_tokens))
    compliance = answer_ids(adapter, list(settings.compliance_tokens))
    refusal, compliance = _disjoint(refusal, compliance, "refusal_tokens / compliance_tokens")
    items = []
    if settings.task == "refusal" and settings.source == "vlmsafe420":
        from vlmsafe_cli.data.vlmsafe420 import load_pairs, requests

        side = _image_side(adapter) if settings.modality != "text" else None
        chosen = _sample(load_pairs(), settings.n_pairs, cfg.seed)
        sides = requests(chosen, settings.modality)
        for harmful, benign in zip(sides[0::2], sides[1::2], strict=True):
            items.append(
                {
                    "clean": harmful.text,
                    "corrupted": benign.text,
                    "clean_image": harmful.image(side) if side else None,
                    "corrupted_image": benign.image(side) if side else None,
                }
            )
    elif settings.task == "refusal":
        from vlmsafe_cli.data.prompts import load_prompt_sets

        harmful, harmless = load_prompt_sets(cfg.data)
        pairs = list(zip(harmful, harmless, strict=False))
        items = [{"clean": a, "corrupted": b} for a, b in _sample(pairs, settings.n_pairs, cfg.seed)]
    elif settings.task == "visual_counterfactual":
        from vlmsafe_cli.data.counterfactual import visual_pairs

        for pair in visual_pairs(settings.n_pairs, settings.attribute, _image_side(adapter), cfg.seed):
            positive, negative = _disjoint(
                answer_ids(adapter, [pair["clean_answer"]]),
                answer_ids(adapter, [pair["corrupted_answer"]]),
                f"{pair['clean_answer']!r} / {pair['corrupted_answer']!r}",
            )
            items.append(
                {
                    "clean": pair["question"],
                    "corrupted": pair["question"],
                    "clean_image": pair["clean_image"],
                    "corrupted_image": pair["corrupted_image"],
                    "positive": positive,
                    "negative": negative,
                }
            )
    else:
        items = _pairs_file(adapter, settings)
    for item in items:
        item.setdefault("positive", refusal)
        item.setdefault("negative", compliance)
    return items


def _pairs_file(adapter: ModelAdapter, settings: DictConfig) -> list[dict]:
    from PIL import Image

    path = Path(settings.pairs_file)
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        item = {"clean": record["clean"], "corrupted": record["corrupted"]}
        if record.get("clean_answer") and record.get("corrupted_answer"):
            item["positive"], item["negative"] = _disjoint(
                answer_ids(adapter, [record["clean_answer"]]),
                answer_ids(adapter, [record["corrupted_answer"]]),
                f"line {number} of {path}",
            )
        for side in ("clean_image", "corrupted_image"):
            if record.get(side):
                image_path = Path(record[side])
                image_path = image_path if image_path.is_absolute() else path.parent / image_path
                item[side] = Image.open(image_path).convert("RGB")
        items.append(item)
    return items[: settings.n_pairs]


def _image_side(adapter: ModelAdapter) -> int:
    from vlmsafe_cli.compress.calibration import image_side

    return image_side(adapter.processor.image_processor)


def batches(adapter: ModelAdapter, items: list[dict], batch_size: int, part: str) -> list[circuits.PairBatch]:
    space = circuits.node_space(adapter, part)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        with_images = chunk[0].get("clean_image") is not None
        out.append(
            circuits.pair_batch(
                adapter,
                [item["clean"] for item in chunk],
                [item["corrupted"] for item in chunk],
                [item["positive"] for item in chunk],
                [item["negative"] for item in chunk],
                [item["clean_image"] for item in chunk] if with_images else None,
                [item["corrupted_image"] for item in chunk] if with_images else None,
                space,
            )
        )
    return out


# -- one model ------------------------------------------------------------------------------------------
def scores_of(adapter: ModelAdapter, pair_batches: list[circuits.PairBatch], method: str, settings) -> dict:
    """Per-pair node scores and metrics over every batch."""
    edges = settings.edges and method != "activation_patching"  # validate=true: exact node scores only
    parts = [
        circuits.node_scores(adapter, pairs, method, settings.ig_steps, settings.ig_path, edges=edges)
        for pairs in track(pair_batches, description=f"circuits {method}")
    ]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def circuit_metrics(adapter, pair_batches, circuit: torch.Tensor, means: circuits.SiteMeans) -> np.ndarray:
    return torch.cat(
        [circuits.circuit_metric(adapter, pairs, circuit, means).cpu() for pairs in pair_batches]
    ).numpy()


def faithfulness_row(variant: str, metric: str, k: int, circuit_m, clean_m, corrupted_m, seed: int):
    """A faithfulness row with a bootstrap CI over pairs; None when the model shows no clean-corrupted gap."""
    if abs(clean_m.mean() - corrupted_m.mean()) < 1e-6:
        log.info("circuits %s: no clean - corrupted metric gap; %s not defined", variant, metric)
        return None
    index = np.arange(len(clean_m))
    estimate = bootstrap_ci(
        index,
        lambda i: circuits.faithfulness(
            circuit_m[i.astype(int)], clean_m[i.astype(int)], corrupted_m[i.astype(int)]
        ),
        seed=seed,
    )
    return ci_row(ANALYSIS, variant, metric, estimate, n=len(index), group=f"top{k}")


def mass_rows(variant: str, mean_scores: torch.Tensor, n_heads: int) -> list[dict]:
    magnitude = mean_scores.abs()
    total = magnitude.sum().item()
    if total == 0:
        return []
    parts = {"all": magnitude, "attn": magnitude[:, :n_heads], "mlp": magnitude[:, n_heads:]}
    return [
        row(ANALYSIS, variant, "score_mass", part[layer].sum().item() / total, layer=layer, group=name)
        for name, part in parts.items()
        for layer in range(magnitude.shape[0])
    ]


def metric_rows(variant: str, result: dict, seed: int) -> list[dict]:
    rows = []
    for name in ("clean", "corrupted"):
        estimate = bootstrap_ci(result[name].numpy(), seed=seed)
        rows.append(ci_row(ANALYSIS, variant, f"metric_{name}", estimate, n=len(result[name])))
    return rows


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


# -- comparison -----------------------------------------------------------------------------------------
def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def comparison_rows(
    base: torch.Tensor,
    compressed: torch.Tensor,
    candidates: torch.Tensor,
    top_k: list[int],
    n_heads: int,
    seed: int,
    n_boot: int,
) -> list[dict]:
    """Jaccard of the top-k nodes and Spearman of node scores (over the `candidates` nodes), with a
    bootstrap over pairs (per-pair scores resampled, then averaged, ranked and compared)."""
    n = base.shape[0]
    parts = {"all": slice(None), "attn": slice(0, n_heads), "mlp": slice(n_heads, None)}
    values: dict = {}
    for draw in _draws(n, seed, n_boot):
        b, c = base[draw].mean(0), compressed[draw].mean(0)
        for k in top_k:
            values.setdefault(("jaccard_topk", f"top{k}"), []).append(
                circuits.jaccard(circuits.top_nodes(b, k, candidates), circuits.top_nodes(c, k, candidates))
            )
        for name, part in parts.items():
            keep = candidates[:, part]
            values.setdefault(("spearman", name), []).append(
                _spearman(b[:, part][keep].numpy(), c[:, part][keep].numpy())
            )
    return _bootstrap_rows(values, n)


def edge_comparison_rows(
    base: torch.Tensor, compressed: torch.Tensor, candidates: torch.Tensor, top_k: list[int], seed, n_boot
) -> list[dict]:
    """Jaccard of the top-k edges by |mean score| among `candidates`, bootstrapped over pairs."""
    values: dict = {}
    for draw in _draws(base.shape[0], seed, n_boot):
        b, c = base[draw].mean(0), compressed[draw].mean(0)
        for k in top_k:
            values.setdefault(("edge_jaccard_topk", f"top{k}"), []).append(
                circuits.jaccard(circuits.top_nodes(b, k, candidates), circuits.top_nodes(c, k, candidates))
            )
    return _bootstrap_rows(values, base.shape[0])


def _draws(n: int, seed: int, n_boot: int) -> list[np.ndarray]:
    """The pairs themselves, then `n_boot` resamples with replacement."""
    rng = np.random.default_rng(seed)
    return [np.arange(n)] + [rng.integers(0, n, n) for _ in range(n_boot)]


def _bootstrap_rows(values: dict, n: int) -> list[dict]:
    """Comparison rows from {(metric, group): [estimate on the pairs, then one per resample]}."""
    rows = []
    for (metric, group), series in values.items():
        resampled = np.array(series[1:])
        resampled = resampled[np.isfinite(resampled)]
        if not np.isfinite(series[0]):
            continue
        low, high = np.quantile(resampled, [0.025, 0.975]) if len(resampled) else (np.nan, np.nan)
        optional = {"ci_low": float(low), "ci_high": float(high)} if len(resampled) else {}
        rows.append(row(ANALYSIS, "comparison", metric, series[0], n=n, group=group, **optional))
    return rows


def edge_rows(results: dict, pair_batches: list[circuits.PairBatch], settings, seed: int) -> list[dict]:
    """`n_edges` per model and, with a compressed model, `edge_jaccard_topk` (k below the edge count)."""
    candidates = circuits.active_edges(pair_batches)
    n_edges = int(candidates.sum())
    n_pairs = len(results["base"]["clean"])
    rows = [row(ANALYSIS, variant, "n_edges", n_edges, n=n_pairs) for variant in results]
    top_k = [k for k in sorted(set(int(k) for k in settings.top_k)) if k < n_edges]
    if "compressed" in results:
        base, compressed = results["base"]["edges"], results["compressed"]["edges"]
        rows += edge_comparison_rows(base, compressed, candidates, top_k, seed, settings.n_bootstrap)
    return rows


# -- artifacts ------------------------------------------------------------------------------------------
def node_table(means: dict[str, torch.Tensor], n_heads: int, groups: tuple[str, ...]) -> pd.DataFrame:
    reference = next(iter(means.values()))
    layers = reference.shape[0]
    index = pd.MultiIndex.from_product(
        [range(layers), [f"head{h}" for h in range(n_heads)] + ["mlp"], list(groups)],
        names=["layer", "component", "group"],
    )
    table = pd.DataFrame(index=index).reset_index()
    for variant, mean in means.items():
        table[f"score_{variant}"] = mean.flatten().numpy()
    return table


def edge_table(means: dict[str, torch.Tensor], space: circuits.NodeSpace) -> pd.DataFrame:
    """Every structurally valid edge x token group with its mean score per model (embeddings: upstream
    layer -1; logits: downstream layer n_layers)."""
    upstream_labels, downstream_labels = circuits.edge_labels(space)
    upstream, downstream = circuits.edge_valid(space).nonzero(as_tuple=True)
    groups = len(space.groups)
    table = pd.DataFrame(
        {
            "upstream_layer": np.repeat([upstream_labels[u][0] for u in upstream.tolist()], groups),
            "upstream_component": np.repeat([upstream_labels[u][1] for u in upstream.tolist()], groups),
            "downstream_layer": np.repeat([downstream_labels[v][0] for v in downstream.tolist()], groups),
            "downstream_kind": np.repeat([downstream_labels[v][1] for v in downstream.tolist()], groups),
            "group": np.tile(list(space.groups), len(upstream)),
        }
    )
    for variant, mean in means.items():
        table[f"score_{variant}"] = mean[upstream, downstream].flatten().numpy()
    return table


def heatmap(means: dict[str, torch.Tensor], n_heads: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = {variant: mean.sum(-1).numpy() for variant, mean in means.items()}  # summed over token groups
    if "compressed" in panels:
        panels["compressed - base"] = panels["compressed"] - panels["base"]
    fig = Figure(figsize=(3.2 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    for index, (title, data) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), index + 1)
        bound = float(np.abs(data).max()) or 1.0
        image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, origin="lower")
        ax.set(title=title, xlabel="component", ylabel="layer")
        ax.set_xticks(range(n_heads + 1), [str(h) for h in range(n_heads)] + ["mlp"], fontsize=6)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120)


# -- entry ----------------------------------------------------------------------------------------------
def run(workspace, settings: DictConfig) -> list[dict]:
    cfg = workspace.cfg
    models = workspace.adapters()
    items = task_items(workspace, models["base"], settings)
    if len(items) < 2:
        raise JobError(f"circuits: {len(items)} pairs for task={settings.task}; at least 2 are needed")
    top_k = sorted(set(int(k) for k in settings.top_k))
    rows, results, pair_batches, site_means = [], {}, {}, {}
    for variant, adapter in models.items():
        pair_batches[variant] = batches(adapter, items, settings.batch_size, settings.part)
        results[variant] = scores_of(adapter, pair_batches[variant], settings.method, settings)
        rows += metric_rows(variant, results[variant], cfg.seed)
        space = pair_batches[variant][0].space
        rows += mass_rows(variant, results[variant]["scores"].mean(0), space.n_heads)
        if settings.validate and settings.method != "activation_patching":
            exact = scores_of(adapter, pair_batches[variant], "activation_patching", settings)
            value = pearson(results[variant]["scores"].mean(0), exact["scores"].mean(0))
            rows.append(row(ANALYSIS, variant, "pearson_exact", value, n=exact["scores"][0].numel()))
        site_means[variant] = circuits.site_means(adapter, pair_batches[variant])
    mean_scores = {variant: result["scores"].mean(0) for variant, result in results.items()}
    space = pair_batches["base"][0].space
    n_heads = space.n_heads
    candidates = circuits.active_nodes(mean_scores["base"].shape, pair_batches["base"])
    n_nodes = int(candidates.sum())
    if any(k >= n_nodes for k in top_k):
        log.info("circuits: top_k >= the %d nodes of this model and task are skipped", n_nodes)
    top_k = [k for k in top_k if k < n_nodes]
    for k in top_k:
        own = {variant: circuits.top_nodes(mean, k, candidates) for variant, mean in mean_scores.items()}
        runs = [("base", "faithfulness_base", own["base"])]
        if "compressed" in models:
            runs += [
                ("compressed", "faithfulness_compressed", own["compressed"]),
                ("compressed", "faithfulness_base_circuit_in_compressed", own["base"]),
            ]
        for variant, metric, circuit in runs:
            circuit_m = circuit_metrics(models[variant], pair_batches[variant], circuit, site_means[variant])
            result = results[variant]
            faithful = faithfulness_row(
                variant, metric, k, circuit_m, result["clean"].numpy(), result["corrupted"].numpy(), cfg.seed
            )
            rows += [faithful] if faithful else []
    if "compressed" in models:
        rows += comparison_rows(
            results["base"]["scores"],
            results["compressed"]["scores"],
            candidates,
            top_k,
            n_heads,
            cfg.seed,
            settings.n_bootstrap,
        )
    if settings.edges:
        rows += edge_rows(results, pair_batches["base"], settings, cfg.seed)
        mean_edges = {variant: result["edges"].mean(0) for variant, result in results.items()}
        write_table(edge_table(mean_edges, space), workspace.artifacts, "circuits_edges")
    table = node_table(mean_scores, n_heads, space.groups)
    write_table(table, workspace.artifacts, "circuits_nodes")
    heatmap(mean_scores, n_heads, workspace.artifacts / "circuits_heatmap.png")
    return rows
