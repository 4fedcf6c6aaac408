"""smol-llava (the organism behind a random vision tower) and the llava-7b-random architecture."""

from __future__ import annotations

import torch
from PIL import Image

from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import get_adapter
from vlmsafe_cli.models.random_arch import build_llava_7b_random
from vlmsafe_cli.models.smol_llava import IMAGE_SIZE, PATCH_SIZE, build_smol_llava
from vlmsafe_cli.models.smollm2 import load_smollm2


def test_smol_llava_text_path_is_exactly_its_language_model():
    language_model, tokenizer = load_smollm2()
    text_adapter = get_adapter(LoadedModel("smollm2", "llama", language_model, tokenizer))
    prompts = ["What is the capital of France?", "Name three fruits."]
    expected_prompt = text_adapter.chat_prompt(prompts[0])
    expected = text_adapter.logits_next(text_adapter.encode(prompts))

    model, processor = build_smol_llava(language_model, load_smollm2()[1], seed=0)
    adapter = get_adapter(LoadedModel("smol-llava", "llava", model, processor))
    assert adapter.chat_prompt(prompts[0]) == expected_prompt
    logits = adapter.logits_next(adapter.encode(prompts))
    torch.testing.assert_close(logits[:, : expected.shape[1]], expected, rtol=1e-4, atol=1e-4)
    assert adapter.post_instruction_positions() == text_adapter.post_instruction_positions()

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200, 30, 30))
    batch = adapter.encode(["Describe the image."], images=[image])
    assert int(adapter.image_token_mask(batch).sum()) == (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert isinstance(adapter.generate(batch, max_new_tokens=3)[0], str)

    # the vision tower is seeded: same seed, same weights; different seed, different weights
    again, _ = build_smol_llava(load_smollm2()[0], load_smollm2()[1], seed=0)
    other, _ = build_smol_llava(load_smollm2()[0], load_smollm2()[1], seed=1)
    tower = next(k for k in model.state_dict() if "vision_tower" in k and k.endswith("mlp.fc1.weight"))
    assert torch.equal(model.state_dict()[tower], again.state_dict()[tower])
    assert not torch.equal(model.state_dict()[tower], other.state_dict()[tower])


def test_llava_7b_random_has_llava_15_7b_architecture():
    model, processor = build_llava_7b_random(torch.device("meta"), torch.bfloat16)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        4096,
        32,
        32,
        11008,
    )
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        1024,
        24,
        336,
        14,
    )
    n_params = sum(p.numel() for p in model.parameters())
    vocab_extra = (text.vocab_size - 32064) * 4096 * 2  # embedding + untied lm_head rows beyond LLaVA's vocab
    assert abs(n_params - vocab_extra - 7.06e9) < 0.01e9
    assert next(model.parameters()).dtype == torch.bfloat16
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
