"""Load a hub checkpoint (by id, or from a local directory with `model.path=`) with transformers.

Safetensors only; `trust_remote_code` off unless the user sets it; bf16 + `device_map=auto` on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vlmsafe_cli.errors import UserError


def pretrained_source(model_cfg: DictConfig) -> dict:
    """The from_pretrained arguments naming the checkpoint: local directory (wins) or hub id + revision."""
    if model_cfg.path:
        path = str(Path(str(model_cfg.path)).expanduser())
        return {"pretrained_model_name_or_path": path, "trust_remote_code": bool(model_cfg.trust_remote_code)}
    return {
        "pretrained_model_name_or_path": model_cfg.id,
        "revision": model_cfg.revision,
        "trust_remote_code": bool(model_cfg.trust_remote_code),
    }


def load_pretrained(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer or processor) for a text (`llama`) or vision-language family."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from vlmsafe_cli.models import VLM_FAMILIES, hub_reachable

    source = str(Path(str(model_cfg.path)).expanduser()) if model_cfg.path else model_cfg.id
    common = {
        "revision": None if model_cfg.path else model_cfg.revision,
        "trust_remote_code": bool(model_cfg.trust_remote_code),
        "local_files_only": bool(model_cfg.path) or not hub_reachable(),
    }
    is_vlm = model_cfg.family in VLM_FAMILIES
    model_class = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    processor_class = AutoProcessor if is_vlm else AutoTokenizer
    placement = {"device_map": "auto"} if device.type == "cuda" else {}
    try:
        model = model_class.from_pretrained(source, dtype=dtype, use_safetensors=True, **placement, **common)
        processor = processor_class.from_pretrained(source, **common)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {model_cfg.name!r} from {source}: {first_line}") from err
    if device.type != "cuda":
        model = model.to(device)
    return model, processor
