"""`llava-7b-random`: LLaVA-1.5-7B's architecture with random weights, for GPU speed benchmarks offline.

Architecture of llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (24 layers, width 1024, select layer -2),
a 2-layer GELU projector, and a Llama-2-7B decoder (32 layers, width 4096, 32 heads, MLP 11008). One
difference: the vocabulary is the offline SmolLM2 tokenizer's plus `<image>` (49,153 rows instead of
32,064), so prompts can be tokenized without a download. Built directly on the target device.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmsafe_cli.models.smol_llava import CHATML_IMAGE_TEMPLATE

VISION_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


def llava_7b_config(tokenizer) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_L14_336),
        text_config=LlamaConfig(**LLAMA2_7B, vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava_7b_random(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, processor): the random-weight LLaVA-1.5-7B architecture, initialised on `device`."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from vlmsafe_cli.models.smollm2 import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    config = llava_7b_config(tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default_dtype)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_IMAGE_TEMPLATE,
    )
    return model.eval(), processor
