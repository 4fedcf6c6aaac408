"""`smol-llava`: a LlavaForConditionalGeneration whose language model is `smollm2-aligned`.

Its CLIP-style vision tower and projector are small and seeded-random: the vision path is UNTRAINED.
It exists so that every VLM code path (image tokens, vision-tower compression, image+text prompts)
runs on a CPU in seconds with a language model that refuses. Prompts use SmolLM2's ChatML format with
`<image>` in the user turn, so the text path is exactly the organism's.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_SIZE, PATCH_SIZE = 112, 14  # 8 x 8 = 64 image tokens
VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, '"
    "'trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] if part['type'] == 'image' %}"
    "{{ '<image>\n' }}{% endfor %}{% for part in message['content'] if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@torch.no_grad()
def build_smol_llava(
    language_model, tokenizer, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Wrap `language_model` (a LlamaForCausalLM) with a seeded-random vision tower and projector."""
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text_config = language_model.config.to_dict()
    text_config.update(vocab_size=len(tokenizer), tie_word_embeddings=False)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        text_config=text_config,
        image_token_index=image_token,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    text_state = {
        k.removeprefix("model."): v for k, v in language_model.state_dict().items() if k != "lm_head.weight"
    }
    embed = text_state.pop("embed_tokens.weight")
    rows = embed.shape[0]
    new_embed = torch.cat([embed, embed.mean(0, keepdim=True).expand(len(tokenizer) - rows, -1)])
    missing = model.model.language_model.load_state_dict(
        {**text_state, "embed_tokens.weight": new_embed}, strict=False
    )
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"smol-llava: language model weights do not fit: {missing}")
    head = language_model.get_output_embeddings().weight
    model.lm_head.weight.copy_(
        torch.cat([head, head.mean(0, keepdim=True).expand(len(tokenizer) - rows, -1)])
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_IMAGE_TEMPLATE,
    )
    return model.to(dtype=language_model.dtype, device=language_model.device).eval(), processor
