"""`analysis=crosscoder`: what compression does to features. Paired activations of the base and the
compressed model on the same prompts at one hook point train an acausal crosscoder
(vlmsafe_cli/crosscoder.py); each feature's decoder pair says whether it is shared, rotated, attenuated,
amplified or exclusive.

Hook points (`hook=`): `residual` (the language model's residual stream entering decoder layer `layer`;
`layer=auto` takes the refusal direction's source layer when refusal_direction or aird ran earlier in the
job, else the middle layer), `vision` (the vision tower's last hidden state, every patch token), `projector`
(the projector's output, every image token). Prompts: the job's `data=` prompts (harmful and harmless
together), paired with seeded synthetic images for `vision` / `projector`. Every non-pad token is one
activation vector, recorded with the index of its prompt. Activations are collected batch by batch into
safetensors shards in the cache ("pairs" and "prompt"), keyed by (cache format, model, compression, hook,
layer, prompts), so a second analysis on the same key skips collection. The cache stays raw: tokens whose
norm in either model exceeds `exclude_massive` x that model's median token norm (attention sinks) are dropped
after loading, and a seeded `holdout_fraction` of the prompts is held out (split by prompt, never by token);
the crosscoder trains on the rest (at most `max_tokens`, a seeded sample).

Rows: `fve_base`, `fve_compressed` (fraction of variance explained), `l0`, `dead_fraction` (all four on the
held-out prompts' tokens, split=heldout), `feature_fraction` per class (group), `mean_theta_shared`
(rotation), `median_norm_ratio_shared` (||d_c|| / ||d_b||: attenuation), `n_tokens` (collected),
`n_tokens_massive_dropped`, `n_tokens_train` (trained on), `n_tokens_heldout` (evaluated on); with a base
refusal direction in
the job (residual hook at its layer): `refusal_top_theta`, `refusal_top_rho` (means over the `refusal_top`
features whose base decoder is most aligned with it) and `refusal_max_cos`. Artifacts: crosscoder.safetensors
(weights, normalisation scales), crosscoder_features.parquet/.csv (per feature: norms, rho, theta, class,
refusal cosine), crosscoder_rho.png, crosscoder_theta_rho.png.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from vlmsafe_cli.crosscoder import (
    FIXED_THRESHOLDS,
    CrosscoderConfig,
    classify,
    dead_fraction,
    fired_latents,
    fraction_of_variance_explained,
    gmm_thresholds,
    heldout_prompts,
    massive_tokens,
    mean_l0,
    rho_theta,
    train_crosscoder,
)
from vlmsafe_cli.errors import JobError
from vlmsafe_cli.models.adapter import ModelAdapter
from vlmsafe_cli.progress import track
from vlmsafe_cli.results import row, write_table

log = logging.getLogger("vlmsafe.crosscoder")
ANALYSIS = "crosscoder"
CACHE_FORMAT = 2  # 2: shards hold "prompt" (int64, each token's prompt index) next to "pairs"


def base_refusal_selection(workspace):
    """The base model's selected refusal direction when refusal_direction or aird ran earlier in the job."""
    from vlmsafe_cli.analysis.refusal_direction import ANALYSIS as REFUSAL

    for key, extracted in workspace.memo.items():
        if isinstance(key, tuple) and key[:2] == (REFUSAL, "base"):
            return extracted.selection
    return None


def resolve_layer(workspace, adapter: ModelAdapter, settings: DictConfig) -> int:
    if settings.layer != "auto":
        return int(settings.layer)
    selection = base_refusal_selection(workspace)
    return adapter.n_layers // 2 if selection is None else selection.layer


def _prompts(workspace, settings: DictConfig) -> list[str]:
    from vlmsafe_cli.data.prompts import load_prompt_sets

    harmful, harmless = load_prompt_sets(workspace.cfg.data)
    texts = [text for pair in zip(harmful, harmless, strict=False) for text in pair]
    return texts[: settings.n_prompts]


@torch.no_grad()
def _activations(adapter: ModelAdapter, batch, hook: str, layer: int) -> torch.Tensor:
    """(tokens, d) float32 activations of one batch at the hook point (pad tokens dropped)."""
    if hook == "residual":
        hidden = adapter.residual_stream(batch, layers=[layer])[0]
        mask = batch["attention_mask"].bool().to(hidden.device)
        return hidden[mask].float().cpu()
    captured = {}
    module = adapter.vision_tower() if hook == "vision" else adapter.projector()

    def grab(_module, _args, output):
        captured["out"] = (
            output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
        )

    handle = module.register_forward_hook(grab)
    try:
        adapter.model(**batch, use_cache=False)
    finally:
        handle.remove()
    out = captured["out"]
    return out.reshape(-1, out.shape[-1]).float().cpu()


def _token_prompts(batch, hook: str, n_tokens: int) -> torch.Tensor:
    """(tokens,) int64 index, within the batch, of the prompt each of `_activations`' rows came from."""
    mask = batch["attention_mask"]
    if hook == "residual":
        return torch.arange(mask.shape[0]).repeat_interleave(mask.bool().sum(1).cpu())
    n_prompts = mask.shape[0]  # one image per prompt, all the same size: equal runs of image tokens
    if n_tokens % n_prompts:
        raise JobError(
            f"crosscoder hook={hook}: {n_tokens} image tokens do not split over {n_prompts} prompts"
        )
    return torch.arange(n_prompts).repeat_interleave(n_tokens // n_prompts)


def collect(
    workspace, models: dict[str, ModelAdapter], settings: DictConfig, layer: int, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, 2, d) paired activations and (tokens,) prompt indices into `texts`, from the cache or
    collected into it in shards."""
    from vlmsafe_cli.analysis.refusal_direction import _with_images

    cfg = workspace.cfg
    compress = OmegaConf.to_container(cfg.compress, resolve=True)
    compress.pop("save", None)
    key = {
        "format": CACHE_FORMAT,
        "compress": compress,
        "hook": settings.hook,
        "layer": layer if settings.hook == "residual" else None,
        "prompts": texts,
        "batch_size": settings.batch_size,
    }

    def build(tmp: Path) -> None:
        adapter_b, adapter_c = models["base"], models["compressed"]
        needs_images = settings.hook != "residual"
        prompts = _with_images(adapter_c, texts, cfg.seed) if needs_images else None
        shard, shard_prompts, count = [], [], 0

        def save() -> None:
            tensors = {
                "pairs": torch.cat(shard).contiguous(),
                "prompt": torch.cat(shard_prompts).contiguous(),
            }
            save_file(tensors, str(tmp / f"shard{count:04d}.safetensors"))

        for start in track(range(0, len(texts), settings.batch_size), description="crosscoder activations"):
            chunk = texts[start : start + settings.batch_size]
            images = None if prompts is None else prompts.images[start : start + settings.batch_size]
            batch = adapter_c.encode(chunk, images=images)
            pair = torch.stack(
                [
                    _activations(adapter_b, batch, settings.hook, layer),
                    _activations(adapter_c, batch, settings.hook, layer),
                ],
                dim=1,
            )
            shard.append(pair)
            shard_prompts.append(start + _token_prompts(batch, settings.hook, pair.shape[0]))
            if sum(p.shape[0] for p in shard) >= settings.shard_tokens:
                save()
                shard, shard_prompts, count = [], [], count + 1
        if shard:
            save()

    def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        shards = [load_file(str(shard)) for shard in sorted(path.glob("shard*.safetensors"))]
        if not shards:
            raise ValueError("no activation shards")
        pairs = torch.cat([shard["pairs"] for shard in shards])
        prompt = torch.cat([shard["prompt"] for shard in shards])
        if prompt.shape != pairs.shape[:1] or prompt.dtype != torch.int64:
            raise ValueError("prompt indices do not match the activation pairs")
        return pairs, prompt

    return workspace.cached("crosscoder/activations", key, build, load)


def split_tokens(
    pairs: torch.Tensor, prompt: torch.Tensor, heldout: torch.Tensor, settings: DictConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train pairs, held-out pairs, tokens dropped as massive) given each token's prompt and the held-out
    prompts' mask: attention-sink tokens dropped first (the median over every collected token), then split
    by prompt; `max_tokens` subsamples the training part (seeded)."""
    keep = torch.ones(pairs.shape[0], dtype=torch.bool)
    if settings.exclude_massive is not None:
        keep = ~massive_tokens(pairs, settings.exclude_massive)
        log.info(
            "crosscoder: dropped %d of %d tokens with a norm above %g x the median in either model "
            "(massive activations)",
            int((~keep).sum()),
            pairs.shape[0],
            settings.exclude_massive,
        )
    dropped = int((~keep).sum())
    heldout = heldout[prompt]
    train, test = pairs[keep & ~heldout], pairs[keep & heldout]
    if not len(train) or not len(test):
        raise JobError(
            f"crosscoder: {len(train)} training and {len(test)} held-out tokens left after dropping "
            f"{dropped} massive ones; raise analysis.crosscoder.n_prompts or exclude_massive"
        )
    if settings.max_tokens and train.shape[0] > settings.max_tokens:
        index = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
        train = train[index[: settings.max_tokens]]
    return train, test, dropped


def feature_table(
    model, refusal: torch.Tensor | None, thresholds: tuple[float, ...], live: torch.Tensor
) -> pd.DataFrame:
    """One row per latent: decoder norms, rho, theta, class, `live` (fired on the training tokens: a latent
    that never fired keeps its random initial decoder, whose rho and theta mean nothing)."""
    decoder = model.decoder().detach().cpu()
    rho, theta = rho_theta(decoder)
    norms = decoder.norm(dim=-1).numpy()
    table = pd.DataFrame(
        {
            "feature": np.arange(len(rho)),
            "norm_base": norms[:, 0],
            "norm_compressed": norms[:, 1],
            "rho": rho,
            "theta": theta,
            "class": classify(rho, theta, thresholds),
            "live": live.numpy(),
        }
    )
    if refusal is not None:
        r = torch.nn.functional.normalize(refusal.float().cpu(), dim=0)
        table["refusal_cos_base"] = torch.cosine_similarity(decoder[:, 0], r[None], dim=-1).numpy()
    return table


def summary_rows(table: pd.DataFrame, settings: DictConfig) -> list[dict]:
    """Class fractions, rotation, attenuation and the refusal link, over the live latents only."""
    from vlmsafe_cli.crosscoder import CLASSES

    rows = [row(ANALYSIS, "comparison", "n_live_features", int(table.live.sum()), n=len(table))]
    table = table[table.live]
    if not len(table):
        log.warning("crosscoder: no latent fired on the training tokens; no feature rows")
        return rows
    counts = table["class"].value_counts()
    for name in CLASSES:
        rows.append(
            row(
                ANALYSIS,
                "comparison",
                "feature_fraction",
                counts.get(name, 0) / len(table),
                group=name,
                n=len(table),
            )
        )
    shared = table[table["class"].str.startswith("shared")]
    if len(shared):
        rows.append(
            row(ANALYSIS, "comparison", "mean_theta_shared", float(shared.theta.mean()), n=len(shared))
        )
        ratio = (shared.norm_compressed / shared.norm_base.clip(lower=1e-12)).median()
        rows.append(row(ANALYSIS, "comparison", "median_norm_ratio_shared", float(ratio), n=len(shared)))
    if "refusal_cos_base" in table:
        top = table.reindex(table.refusal_cos_base.abs().sort_values(ascending=False).index).head(
            settings.refusal_top
        )
        rows += [
            row(ANALYSIS, "comparison", "refusal_max_cos", float(table.refusal_cos_base.abs().max())),
            row(ANALYSIS, "comparison", "refusal_top_theta", float(top.theta.mean()), n=len(top)),
            row(ANALYSIS, "comparison", "refusal_top_rho", float(top.rho.mean()), n=len(top)),
        ]
    return rows


def plots(table: pd.DataFrame, directory: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(table.rho, bins=40, range=(0, 1), color="#4c72b0")
    ax.set(xlabel="rho = |d_c| / (|d_b| + |d_c|)", ylabel="features", title="decoder norm share")
    fig.savefig(directory / "crosscoder_rho.png", dpi=120)
    fig = Figure(figsize=(5, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, part in table.groupby("class"):
        ax.scatter(part.rho, part.theta, s=6, label=name)
    ax.set(xlabel="rho", ylabel="theta = cos(d_b, d_c)", xlim=(0, 1), ylim=(-1, 1), title="features")
    ax.legend(fontsize=6, markerscale=2)
    fig.savefig(directory / "crosscoder_theta_rho.png", dpi=120)


def run(workspace, settings: DictConfig) -> list[dict]:
    cfg = workspace.cfg
    if cfg.compress.method == "none":
        log.info("crosscoder: compress=none has nothing to compare; no rows")
        return []
    models = workspace.adapters()
    if settings.hook != "residual" and not models["compressed"].is_vlm:
        raise JobError(f"crosscoder hook={settings.hook} needs a VLM; {cfg.model.name} is a text model")
    layer = resolve_layer(workspace, models["base"], settings)
    texts = _prompts(workspace, settings)
    try:
        heldout_mask = heldout_prompts(len(texts), settings.holdout_fraction, cfg.seed)
    except ValueError as err:
        raise JobError(f"crosscoder: {err} (analysis.crosscoder.n_prompts and data=)") from None
    pairs, prompt = collect(workspace, models, settings, layer, texts)
    train, heldout, dropped = split_tokens(pairs, prompt, heldout_mask, settings, cfg.seed)
    d = pairs.shape[-1]
    config = CrosscoderConfig(
        d_in=d,
        n_latents=int(settings.expansion * d),
        k=settings.k,
        sparsity=settings.sparsity,
        l1=settings.l1,
        cross_weight=settings.cross_weight,
        forced_shared=settings.forced_shared,
    )
    device = workspace.device
    model, history = train_crosscoder(
        train, config, settings.steps, settings.train_batch_size, settings.lr, cfg.seed, device
    )
    scales = torch.tensor(history["scales"])  # from the training tokens, applied to the held-out ones
    fve_base, fve_compressed = fraction_of_variance_explained(model, heldout, scales)
    selection = base_refusal_selection(workspace)
    use = settings.hook == "residual" and selection is not None and selection.layer == layer
    refusal = selection.direction if use else None
    live = fired_latents(model, train, scales)
    rho, _ = rho_theta(model.decoder().detach().cpu()[live])
    thresholds, source = (
        (FIXED_THRESHOLDS, "fixed") if settings.thresholds == "fixed" else gmm_thresholds(rho)
    )
    table = feature_table(model, refusal, thresholds, live)
    artifacts = workspace.artifacts
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(
        {**state, "scales": scales},
        str(artifacts / "crosscoder.safetensors"),
        metadata={
            "hook": settings.hook,
            "layer": str(layer),
            "thresholds": ",".join(f"{t:.4f}" for t in thresholds),
            "threshold_source": source,
            "config": str(config),
            "heldout_prompts": ",".join(str(i) for i in heldout_mask.nonzero().ravel().tolist()),
        },
    )
    write_table(table, artifacts, stem="crosscoder_features")
    plots(table[table.live], artifacts)
    log.info(
        "crosscoder %s layer %d: held-out fve %.3f / %.3f (%d train, %d held-out tokens), thresholds %s (%s)",
        settings.hook,
        layer,
        fve_base,
        fve_compressed,
        len(train),
        len(heldout),
        thresholds,
        source,
    )
    n_heldout = len(heldout)
    rows = [
        row(ANALYSIS, "comparison", "fve_base", fve_base, n=n_heldout, split="heldout"),
        row(ANALYSIS, "comparison", "fve_compressed", fve_compressed, n=n_heldout, split="heldout"),
        row(ANALYSIS, "comparison", "l0", mean_l0(model, heldout, scales), n=n_heldout, split="heldout"),
        row(
            ANALYSIS,
            "comparison",
            "dead_fraction",
            dead_fraction(model, heldout, scales),
            n=n_heldout,
            split="heldout",
        ),
        row(ANALYSIS, "comparison", "n_tokens", pairs.shape[0]),
        row(ANALYSIS, "comparison", "n_tokens_massive_dropped", dropped),
        row(ANALYSIS, "comparison", "n_tokens_train", len(train)),
        row(ANALYSIS, "comparison", "n_tokens_heldout", n_heldout),
        row(ANALYSIS, "comparison", "hook_layer", layer),
    ]
    return rows + summary_rows(table, settings)
