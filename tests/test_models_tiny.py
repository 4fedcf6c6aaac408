"""Tiny random-init models: seeded determinism, text and image forwards, generation, distinct tokenizers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmsafe_cli.errors import UserError
from vlmsafe_cli.models.tiny import TINY_MODELS, build_tiny

VLMS = ("tiny-llava", "tiny-paligemma", "tiny-qwen2vl")
FAMILIES = {name: name.removeprefix("tiny-") for name in TINY_MODELS}


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def image_inputs(processor, question: str = "What colour is this?"):
    """Processor inputs for one 64x64 solid-colour image and a question, through the chat template."""
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def expected_image_tokens(model, inputs) -> int:
    """Image tokens the model consumes, from its vision config (not from the processor)."""
    config = model.config
    if config.model_type == "qwen2_vl":
        merge = config.vision_config.spatial_merge_size
        return int(inputs["image_grid_thw"].prod(dim=-1).sum()) // merge**2
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return patches  # LLaVA 'default' strategy drops CLS; SigLIP has none


@pytest.mark.parametrize("name", TINY_MODELS)
def test_seed_determines_weights(name):
    first, _, family = build_tiny(name, seed=0)
    again, _, _ = build_tiny(name, seed=0)
    other, _, _ = build_tiny(name, seed=1)
    assert family == FAMILIES[name]
    assert not first.training and next(first.parameters()).dtype == torch.float32
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_build_does_not_touch_caller_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("tiny-llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_text_forward_and_generate(name):
    model, processor, _ = build_tiny(name)
    tokenizer = tokenizer_of(processor)
    batch = tokenizer(["Hello there, how are you?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    vocab = model.config.get_text_config().vocab_size
    assert vocab == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert logits.shape == (2, batch["input_ids"].shape[1], vocab)
    single = tokenizer("Hello", return_tensors="pt")
    out = model.generate(**single, max_new_tokens=3, do_sample=False)
    assert single["input_ids"].shape[1] < out.shape[1] <= single["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", VLMS)
def test_image_forward_and_generate(name):
    model, processor, _ = build_tiny(name)
    inputs = image_inputs(processor)
    image_token_id = model.config.image_token_id
    assert image_token_id == processor.image_token_id
    assert tokenizer_of(processor).convert_ids_to_tokens(image_token_id) == processor.image_token
    assert int((inputs["input_ids"] == image_token_id).sum()) == expected_image_tokens(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer_of(processor)))
    assert torch.isfinite(logits).all()
    inputs.pop("labels", None)  # PaliGemmaProcessor adds training labels for backward compatibility
    length = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert length < out.shape[1] <= length + 3


def test_chat_templates_place_the_image_token():
    for name, marker in (
        ("tiny-llava", "USER: <image>\n"),
        ("tiny-paligemma", "<image>"),
        ("tiny-qwen2vl", "<|vision_start|><|image_pad|><|vision_end|>"),
    ):
        _, processor, _ = build_tiny(name)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
        assert marker in processor.apply_chat_template(messages, add_generation_prompt=True)


def test_tokenizers_are_not_shared():
    _, first, _ = build_tiny("tiny-llava")
    _, second, _ = build_tiny("tiny-llava")
    assert first.tokenizer is not second.tokenizer
    before = len(second.tokenizer)
    first.tokenizer.add_tokens(["<only-in-first>"])
    assert len(second.tokenizer) == before


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        build_tiny("tiny-gpt5")
    assert all(name in str(err.value) for name in TINY_MODELS)
