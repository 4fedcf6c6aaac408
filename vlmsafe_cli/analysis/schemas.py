"""Settings schemas of the analyses (the YAML under conf/analysis/), with the value checks types cannot
express; kept free of torch so that validation runs before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

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
    # candidates are zeroed on residual coordinates whose peak |x| exceeds this many times the layer's
    # median |x| (massive activations, Sun et al. 2024); null keeps every coordinate (Arditi et al. as-is)
    massive_ratio: Optional[float] = 100.0
    coefficients: List[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # addition scan
    max_new_tokens: int = 64
    batch_size: int = 32
    with_image: bool = False  # VLMs: pair every prompt with a seeded synthetic image
    # also export the job's model with its own direction orthogonalised out of the weights (the permanent
    # ablation) as a Hugging Face checkpoint in artifacts/orthogonalized
    save_orthogonalized: bool = False


def check_refusal_direction(settings: DictConfig, cfg: DictConfig) -> None:
    name = "aird" if "method" in settings else "refusal_direction"  # aird shares these settings
    for key in ("n_train", "n_val", "n_test", "max_new_tokens", "batch_size"):
        if settings[key] < 1:
            raise UserError(f"analysis.{name}.{key}={settings[key]} must be a positive integer")
    if not 0 < settings.max_layer_fraction <= 1:
        raise UserError(f"analysis.{name}.max_layer_fraction={settings.max_layer_fraction}: use (0, 1]")
    if settings.massive_ratio is not None and settings.massive_ratio <= 1:
        raise UserError(
            f"analysis.{name}.massive_ratio={settings.massive_ratio}: use a ratio > 1 (e.g. 100) or null"
        )
    if not settings.refusal_tokens:
        raise UserError(f"analysis.{name}.refusal_tokens is empty: give at least one token, e.g. [I, As]")
    if settings.with_image and cfg.model.family not in VLM_FAMILIES:
        raise UserError(f"analysis.{name}.with_image=true needs a VLM; {cfg.model.name} is a text model")
    _check_split_sizes(cfg.data, settings.n_train + settings.n_val + settings.n_test, name)
    if settings.save_orthogonalized and cfg.compress.method == "bnb":
        raise UserError(
            f"analysis.{name}.save_orthogonalized=true edits weights that compress={cfg.compress.name} "
            "stores quantised by bitsandbytes; orthogonalise a dense or fake-quantised model instead"
        )


def _check_split_sizes(data: DictConfig, needed: int, analysis: str) -> None:
    """Each class of prompts must hold the analysis' train + val + test prompts (read from data=)."""
    from vlmsafe_cli.data.prompts import load_prompt_sets

    for kind, prompts in zip(("harmful", "harmless"), load_prompt_sets(data), strict=True):
        if len(prompts) < needed:
            raise UserError(
                f"analysis.{analysis}: {len(prompts)} {kind} prompts in data={data.name}, {needed} needed "
                "(n_train + n_val + n_test); lower the split sizes or give a larger data set"
            )


AIRD_METHODS = ("restore_write", "ridge_readout", "mask_preserving")


@dataclass
class AirdSettings(RefusalDirectionSettings):
    """The refusal-direction settings (for the base direction and the prompt splits) plus the edit's."""

    method: str = "restore_write"  # restore_write | ridge_readout | mask_preserving
    layer: Any = "auto"  # auto | scan | a decoder layer index
    matrix: str = "mlp"  # the residual writer edited: mlp (down_proj) | attn (o_proj)
    alpha: float = 1.0  # restore_write's step along the base-minus-compressed write
    ridge: float = 0.01  # ridge_readout's penalty, relative to the mean diagonal of A^T A


def check_aird(settings: DictConfig, cfg: DictConfig) -> None:
    check_refusal_direction(settings, cfg)
    if settings.save_orthogonalized:
        raise UserError(
            "analysis.aird.save_orthogonalized is not an aird setting: set "
            "analysis.refusal_direction.save_orthogonalized=true (with analysis=[refusal_direction,aird])"
        )
    if settings.method not in AIRD_METHODS:
        raise UserError(
            f"analysis.aird.method={settings.method!r} is not valid; choose one of: {', '.join(AIRD_METHODS)}"
        )
    if settings.matrix not in ("mlp", "attn"):
        raise UserError(f"analysis.aird.matrix={settings.matrix!r} is not valid; choose mlp or attn")
    layer = settings.layer
    if layer not in ("auto", "scan") and not (
        isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0
    ):
        raise UserError(f"analysis.aird.layer={layer!r} is not valid; use auto, scan or a layer index >= 0")


UTILITY_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@dataclass
class UtilitySettings:
    tasks: List[str] = field(default_factory=lambda: list(UTILITY_TASKS))
    task_dir: Optional[str] = None  # local lm-eval task YAMLs (offline), searched besides lm-eval's own
    limit: Optional[int] = None  # documents per task (None = all)
    num_fewshot: int = 0
    batch_size: int = 16


def check_utility(settings: DictConfig, cfg: DictConfig) -> None:
    if not settings.tasks:
        raise UserError("analysis.utility.tasks is empty: name at least one lm-eval task")
    if settings.task_dir and not Path(str(settings.task_dir)).expanduser().is_dir():
        raise UserError(f"analysis.utility.task_dir={settings.task_dir!r} is not a directory")
    if settings.limit is not None and settings.limit < 1:
        raise UserError(f"analysis.utility.limit={settings.limit} must be a positive integer or null")
    if settings.num_fewshot < 0 or settings.batch_size < 1:
        raise UserError("analysis.utility: num_fewshot must be >= 0 and batch_size >= 1")


VLMSAFE420_MODALITIES = ("text", "typographic", "image_text")


@dataclass
class SafetySettings:
    """Generation of judged completions (analysis=safety; vlmsafe420 adds its modalities)."""

    max_new_tokens: int = 64
    batch_size: int = 32  # 32 generated 1.4x faster than 16 on a 2-core CPU (RESULTS.md)
    do_sample: bool = False  # greedy by default; sampling is seeded by the job's seed
    temperature: float = 0.7  # used only with do_sample
    top_p: float = 0.9  # used only with do_sample


@dataclass
class Vlmsafe420Settings(SafetySettings):
    modalities: List[str] = field(default_factory=lambda: list(VLMSAFE420_MODALITIES))  # text-only: text


def check_safety(settings: DictConfig, cfg: DictConfig, name: str = "safety") -> None:
    for key in ("max_new_tokens", "batch_size"):
        if settings[key] < 1:
            raise UserError(f"analysis.{name}.{key}={settings[key]} must be a positive integer")
    if settings.do_sample and not (settings.temperature > 0 and 0 < settings.top_p <= 1):
        raise UserError(f"analysis.{name}: sampling needs temperature > 0 and top_p in (0, 1]")
    if name == "safety" and cfg.data.name == "builtin":
        raise UserError(
            "analysis=safety reads a public set (data=advbench, xstest, ...) or data=local; "
            "for the project's own benchmark use analysis=vlmsafe420"
        )


def check_vlmsafe420(settings: DictConfig, cfg: DictConfig) -> None:
    unknown = [m for m in settings.modalities if m not in VLMSAFE420_MODALITIES]
    if unknown or not settings.modalities:
        raise UserError(
            f"analysis.vlmsafe420.modalities={list(settings.modalities)} is not valid; "
            f"choose from: {', '.join(VLMSAFE420_MODALITIES)}"
        )
    check_safety(settings, cfg, "vlmsafe420")
    if cfg.data.n is not None and cfg.data.n > 420:
        raise UserError(f"data.n={cfg.data.n}: VLMSafe-420 has 420 pairs; use data.n <= 420")


CROSSCODER_HOOKS = ("residual", "vision", "projector")


@dataclass
class CrosscoderSettings:
    hook: str = "residual"  # residual | vision | projector
    layer: Any = "auto"  # residual hook: auto (the refusal source layer when known, else the middle) | index
    n_prompts: int = 128  # harmful and harmless prompts of data=, interleaved
    batch_size: int = 16  # prompts per collection batch
    shard_tokens: int = 65536  # activation vectors per cached shard
    max_tokens: Optional[int] = 200000  # train on at most this many (seeded sample of the training part)
    holdout_fraction: float = 0.125  # prompts held out (seeded, at least one) for fve / l0 / dead_fraction
    exclude_massive: Optional[float] = 10.0  # drop tokens with norm > this x the median in either model
    expansion: float = 4.0  # dictionary size / d_model (the study: 4)
    k: int = 32  # batchtopk / topk: active latents per token
    sparsity: str = "batchtopk"  # batchtopk | topk | l1
    l1: float = 1e-3
    cross_weight: float = 0.0  # the study's cross-reconstruction weight is 0.4
    forced_shared: float = 0.0  # the study forces 6% of latents shared
    steps: int = 2000
    train_batch_size: int = 512
    lr: float = 3e-4
    thresholds: str = "fixed"  # fixed (0.15/0.35/0.65/0.85) | gmm
    refusal_top: int = 10  # refusal-aligned features summarised


def check_crosscoder(settings: DictConfig, cfg: DictConfig) -> None:
    if settings.hook not in CROSSCODER_HOOKS:
        raise UserError(
            f"analysis.crosscoder.hook={settings.hook!r} is not valid; "
            f"choose one of: {', '.join(CROSSCODER_HOOKS)}"
        )
    if settings.hook != "residual" and cfg.model.family not in VLM_FAMILIES:
        raise UserError(
            f"analysis.crosscoder.hook={settings.hook} needs a VLM; {cfg.model.name} is a text model"
        )
    if settings.sparsity not in ("batchtopk", "topk", "l1"):
        raise UserError(
            f"analysis.crosscoder.sparsity={settings.sparsity!r} is not valid; choose batchtopk, topk or l1"
        )
    if settings.thresholds not in ("fixed", "gmm"):
        raise UserError(
            f"analysis.crosscoder.thresholds={settings.thresholds!r} is not valid; choose fixed or gmm"
        )
    layer = settings.layer
    if layer != "auto" and not (isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0):
        raise UserError(f"analysis.crosscoder.layer={layer!r} is not valid; use auto or a layer index >= 0")
    for key in ("n_prompts", "batch_size", "shard_tokens", "k", "steps", "train_batch_size", "refusal_top"):
        if settings[key] < 1:
            raise UserError(f"analysis.crosscoder.{key}={settings[key]} must be a positive integer")
    if settings.expansion <= 0 or settings.lr <= 0:
        raise UserError("analysis.crosscoder: expansion and lr must be positive")
    if settings.n_prompts < 2:
        raise UserError(
            f"analysis.crosscoder.n_prompts={settings.n_prompts} is too few; the held-out split needs >= 2"
        )
    if not 0 < settings.holdout_fraction < 1:
        raise UserError(
            f"analysis.crosscoder.holdout_fraction={settings.holdout_fraction} is not valid; "
            "use a fraction in (0, 1)"
        )
    if settings.exclude_massive is not None and settings.exclude_massive <= 1:
        raise UserError(
            f"analysis.crosscoder.exclude_massive={settings.exclude_massive} is not valid; "
            "use a multiple > 1 of the median token norm, or null to keep every token"
        )


CIRCUIT_TASKS = ("refusal", "visual_counterfactual", "pairs")
CIRCUIT_METHODS = ("activation_patching", "attribution_patching", "eap_ig")


@dataclass
class CircuitsSettings:
    task: str = "refusal"  # refusal | visual_counterfactual (VLMs) | pairs (pairs_file)
    part: str = "language"  # language (decoder layers) | vision (a CLIP/SigLIP vision encoder's layers)
    source: str = "vlmsafe420"  # refusal pairs: vlmsafe420 (matched benign counterfactuals) | data
    modality: str = "text"  # refusal from vlmsafe420: text | typographic | image_text (the last two: VLMs)
    attribute: str = "color"  # visual_counterfactual: color | size | count
    pairs_file: Optional[str] = None  # task=pairs: JSONL of {clean, corrupted[, answers, images]}
    n_pairs: int = 32
    method: str = "attribution_patching"  # activation_patching | attribution_patching | eap_ig
    ig_steps: int = 5  # eap_ig: midpoints on each clean -> corrupted path
    ig_path: str = "activations"  # eap_ig: activations (each site's own line) | inputs (input embeddings)
    edges: bool = False  # also score edges (EAP / EAP-IG on ig_path=inputs; the language model)
    validate: bool = False  # also run exact activation patching and report pearson_exact
    top_k: List[int] = field(default_factory=lambda: [10, 25, 50])
    batch_size: int = 8  # pairs per batch
    refusal_tokens: List[str] = field(default_factory=lambda: ["I", "As"])
    compliance_tokens: List[str] = field(default_factory=lambda: ["Sure", "Here"])
    n_bootstrap: int = 1000


def check_circuits(settings: DictConfig, cfg: DictConfig) -> None:
    from vlmsafe_cli.data.counterfactual import ATTRIBUTES

    choices = {
        "task": CIRCUIT_TASKS,
        "source": ("vlmsafe420", "data"),
        "modality": VLMSAFE420_MODALITIES,
        "attribute": ATTRIBUTES,
        "method": CIRCUIT_METHODS,
        "ig_path": ("activations", "inputs"),
        "part": ("language", "vision"),
    }
    for key, valid in choices.items():
        if settings[key] not in valid:
            raise UserError(
                f"analysis.circuits.{key}={settings[key]!r} is not valid; choose one of: {', '.join(valid)}"
            )
    needs_vlm = settings.task == "visual_counterfactual" or (
        settings.task == "refusal" and settings.source == "vlmsafe420" and settings.modality != "text"
    )
    if needs_vlm and cfg.model.family not in VLM_FAMILIES:
        what = "task=visual_counterfactual" if settings.task != "refusal" else f"modality={settings.modality}"
        raise UserError(f"analysis.circuits.{what} needs a VLM; {cfg.model.name} is a text model")
    if settings.part == "vision" and cfg.model.family not in VLM_FAMILIES:
        raise UserError(f"analysis.circuits.part=vision needs a VLM; {cfg.model.name} is a text model")
    if settings.edges and settings.part != "language":
        raise UserError("analysis.circuits.edges=true scores the language model's edges; use part=language")
    if settings.edges and settings.method == "activation_patching":
        raise UserError(
            "analysis.circuits.edges=true needs method=attribution_patching or eap_ig (exact patching per "
            "edge is not built)"
        )
    if settings.edges and settings.method == "eap_ig" and settings.ig_path != "inputs":
        raise UserError(
            "analysis.circuits.edges=true with method=eap_ig needs ig_path=inputs (per-site paths do not "
            "give one gradient per downstream node)"
        )
    if settings.task == "pairs":
        if not settings.pairs_file:
            raise UserError("analysis.circuits.task=pairs needs analysis.circuits.pairs_file=PATH (JSONL)")
        if not Path(settings.pairs_file).is_file():
            raise UserError(f"analysis.circuits.pairs_file={settings.pairs_file}: no such file")
    for key in ("n_pairs", "ig_steps", "batch_size", "n_bootstrap"):
        if settings[key] < 1:
            raise UserError(f"analysis.circuits.{key}={settings[key]} must be a positive integer")
    if settings.n_pairs < 2:
        raise UserError("analysis.circuits.n_pairs must be at least 2")
    if not settings.top_k or any(k < 1 for k in settings.top_k):
        raise UserError(
            f"analysis.circuits.top_k={list(settings.top_k)}: use positive node counts, e.g. [10]"
        )
    if not settings.refusal_tokens or not settings.compliance_tokens:
        raise UserError("analysis.circuits: refusal_tokens and compliance_tokens need a token each at least")


RELIABILITY_TASKS = ("auto", "visual", "text", "local")


@dataclass
class ReliabilitySettings:
    tasks: str = "auto"  # auto (visual on a VLM, text otherwise) | visual | text | local
    path: Optional[str] = None  # tasks=local: JSONL with question, answer, optional image
    kinds: List[str] = field(default_factory=list)  # generated task kinds; empty = all of the source
    n_tasks: int = 500  # generated: this many (seeded); local: a seeded sample (all when fewer)
    prompt_suffix: str = "Answer with one word."
    match: str = "exact"  # exact | first_word | contains (after normalisation)
    number_words: bool = True  # "three" -> "3" before matching
    strip_articles: bool = True
    max_new_tokens: int = 8
    batch_size: int = 16
    k_samples: int = 10  # self-consistency samples per task (0 = skip)
    temperature: float = 0.7
    top_p: float = 0.9
    folds: int = 5  # stratified k-fold CV of the probes
    probe_c: float = 1.0  # inverse L2 strength of the logistic-regression probes
    last_k_layers: int = 5  # the concatenated probe
    attention: bool = True  # VLM tasks with images: attention structure over image tokens (eager attention)
    top_fraction: float = 0.1  # attention cells counted as "top" (mass, clusters)
    n_bootstrap: int = 1000  # resamples of every CI
    causal: bool = True  # ablate the probe's top-k neurons vs random-k and re-measure accuracy
    ablate_layer: Any = "last"  # residual entry: last (the last layer's output) | an index 1..n_layers
    ablate_k: int = 5
    ablate_modes: List[str] = field(default_factory=lambda: ["zero", "mean"])
    random_seeds: int = 3  # random-k control draws
    mask_fraction: float = 0.3  # VLM tasks: the most attended image patches masked (vs random ones)


def check_reliability(settings: DictConfig, cfg: DictConfig) -> None:
    from vlmsafe_cli.data.reliability_tasks import MATCH_MODES, TEXT_KINDS, VISUAL_KINDS

    name = "analysis.reliability"
    if settings.tasks not in RELIABILITY_TASKS:
        raise UserError(
            f"{name}.tasks={settings.tasks!r} is not valid; choose one of: {', '.join(RELIABILITY_TASKS)}"
        )
    if settings.tasks == "local" and not settings.path:
        raise UserError(f"{name}.tasks=local needs {name}.path=FILE (JSONL with question, answer, image)")
    if settings.tasks == "local" and not Path(str(settings.path)).expanduser().is_file():
        raise UserError(f"{name}.path={settings.path!r} is not a file")
    if settings.tasks == "visual" and cfg.model.family not in VLM_FAMILIES:
        raise UserError(f"{name}.tasks=visual needs a VLM; {cfg.model.name} is a text model (use tasks=text)")
    visual = settings.tasks == "visual" or (settings.tasks == "auto" and cfg.model.family in VLM_FAMILIES)
    valid_kinds = VISUAL_KINDS if visual else TEXT_KINDS
    unknown = [kind for kind in settings.kinds if kind not in valid_kinds]
    if unknown and settings.tasks != "local":
        raise UserError(f"{name}.kinds={list(settings.kinds)}: choose from: {', '.join(valid_kinds)}")
    if settings.match not in MATCH_MODES:
        raise UserError(
            f"{name}.match={settings.match!r} is not valid; choose one of: {', '.join(MATCH_MODES)}"
        )
    for key in ("n_tasks", "max_new_tokens", "batch_size", "last_k_layers", "n_bootstrap"):
        if settings[key] < 1:
            raise UserError(f"{name}.{key}={settings[key]} must be a positive integer")
    if settings.folds < 2:
        raise UserError(f"{name}.folds={settings.folds}: cross-validation needs at least 2 folds")
    if settings.k_samples == 1 or settings.k_samples < 0:
        raise UserError(f"{name}.k_samples={settings.k_samples}: use 0 (no self-consistency) or >= 2")
    if settings.k_samples and not (settings.temperature > 0 and 0 < settings.top_p <= 1):
        raise UserError(f"{name}: sampling needs temperature > 0 and top_p in (0, 1]")
    if not 0 < settings.top_fraction < 1 or settings.probe_c <= 0:
        raise UserError(f"{name}: top_fraction must be in (0, 1) and probe_c > 0")
    layer = settings.ablate_layer
    if layer != "last" and not (isinstance(layer, int) and not isinstance(layer, bool) and layer >= 1):
        raise UserError(f"{name}.ablate_layer={layer!r} is not valid; use last or a residual index >= 1")
    unknown = [mode for mode in settings.ablate_modes if mode not in ("zero", "mean")]
    if unknown or not settings.ablate_modes:
        raise UserError(f"{name}.ablate_modes={list(settings.ablate_modes)}: choose from: zero, mean")
    if settings.ablate_k < 1 or settings.random_seeds < 1:
        raise UserError(f"{name}: ablate_k and random_seeds must be positive integers")
    if not 0 < settings.mask_fraction < 1:
        raise UserError(f"{name}.mask_fraction={settings.mask_fraction}: use a fraction in (0, 1)")
