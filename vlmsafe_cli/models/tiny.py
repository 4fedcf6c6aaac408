"""Random-initialised tiny models of the real transformers classes, for fast tests of every model family.

Each is built in-process from a small config with an explicit seed (same seed -> bit-identical weights),
with the SmolLM2 tokenizer plus the family's special tokens, and the family's real processor class.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vlmsafe_cli.errors import UserError
from vlmsafe_cli.models.smollm2 import smollm2_tokenizer

TINY_MODELS = ("tiny-llama", "tiny-llava", "tiny-paligemma", "tiny-qwen2vl")
TEXT = {  # shared by every tiny text tower: 64 wide, 2 layers, 4 heads of 16, 2 KV heads
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

# Chat templates with each family's public prompt structure; content may be a string or typed parts.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# PaliGemma has no roles: images first, then the prefix text (the processor adds bos and "\n").
PALIGEMMA_TEMPLATE = (
    "{% for message in messages if message['role'] == 'user' %}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] if part['type'] == 'image' %}"
    "{{ '<image>' }}{% endfor %}{% for part in message['content'] if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endfor %}{% endif %}{% endfor %}"
)
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


class _Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video modality: its video processor needs torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _tokenizer(extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerBase:
    """A fresh SmolLM2 tokenizer (never shared between models) with `extra_tokens` as special tokens."""
    tokenizer = smollm2_tokenizer()
    if extra_tokens:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": list(extra_tokens)}, replace_extra_special_tokens=False
        )
    return tokenizer


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    """bos/eos/pad ids of `tokenizer`, for the model and generation configs."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _text_config(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The shared tiny text tower sized to `tokenizer` (embedding rows = len(tokenizer))."""
    return {**TEXT, **_special_ids(tokenizer), "vocab_size": len(tokenizer)}


def _tiny_llama() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _tokenizer()
    config = LlamaConfig(**_text_config(tokenizer), tie_word_embeddings=True)
    return LlamaForCausalLM(config), tokenizer


def _tiny_llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    """CLIP tower 56 px / patch 14 -> 16 patches + CLS; 'default' strategy drops CLS -> 16 image tokens."""
    tokenizer = _tokenizer(("<image>",))
    vision = CLIPVisionConfig(**VISION, image_size=56, patch_size=14, projection_dim=32)
    text = LlamaConfig(**_text_config(tokenizer))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **_special_ids(tokenizer),
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def _tiny_paligemma() -> tuple[PreTrainedModel, ProcessorMixin]:
    """SigLIP tower 32 px / patch 8 -> 16 image tokens; the processor adds <image>, <locNNNN>, <segNNN>."""
    tokenizer = _tokenizer()
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor, tokenizer, chat_template=PALIGEMMA_TEMPLATE)
    vision = SiglipVisionConfig(**VISION, image_size=32, patch_size=8)
    text = GemmaConfig(**_text_config(tokenizer), hidden_activation="gelu_pytorch_tanh")
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=TEXT["hidden_size"],
        hidden_size=TEXT["hidden_size"],
        **_special_ids(tokenizer),
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _tiny_qwen2vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2-VL ViT patch 14, 2x2 merge; images resized to 56x56 -> 4x4 patches -> 4 image tokens."""
    tokenizer = _tokenizer(QWEN2VL_TOKENS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2VL_TOKENS}
    vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": TEXT["hidden_size"]}
    # M-RoPE splits head_dim / 2 = 8 rotary frequencies over (time, height, width).
    mrope = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    text = {**_text_config(tokenizer), "rope_parameters": mrope}
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **_special_ids(tokenizer),
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = _Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=QWEN2VL_TEMPLATE)
    return Qwen2VLForConditionalGeneration(config), processor


BUILDERS = {
    "tiny-llama": ("llama", _tiny_llama),
    "tiny-llava": ("llava", _tiny_llava),
    "tiny-paligemma": ("paligemma", _tiny_paligemma),
    "tiny-qwen2vl": ("qwen2vl", _tiny_qwen2vl),
}


def build_tiny(
    name: str, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerBase, str]:
    """A random-init tiny model (fp32, eval), its processor (tokenizer for tiny-llama) and its family name."""
    if name not in BUILDERS:
        raise UserError(f"unknown tiny model {name!r}; valid: {', '.join(TINY_MODELS)}")
    family, builder = BUILDERS[name]
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model, processor = builder()
    return model.float().eval(), processor, family
