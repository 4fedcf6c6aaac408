"""Model adapters on the four tiny families: prompts, left-padded batches, residual stream, image tokens,
post-instruction positions, generation, residual writers and hooks (also on bitsandbytes copies)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import ModelAdapter, get_adapter
from vlmsafe_cli.models.tiny import TINY_MODELS, build_tiny

VLMS = ("tiny-llava", "tiny-paligemma", "tiny-qwen2vl")
CASES = [(name, False) for name in TINY_MODELS] + [(name, True) for name in VLMS]  # (model, with images)
PROMPTS = ["Tell me a story about a dragon.", "Hi"]  # the second is shorter: it gets the padding
CHATML_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# What follows the instruction in each family's prompt (PaliGemma: the newline its processor appends).
SUFFIX = {
    "tiny-llama": CHATML_SUFFIX,
    "tiny-llava": " ASSISTANT:",
    "tiny-paligemma": "\n",
    "tiny-qwen2vl": CHATML_SUFFIX,
}
TEMPLATE_SUFFIX = {**SUFFIX, "tiny-paligemma": ""}  # what chat_prompt itself ends with


@pytest.fixture(scope="module")
def adapters() -> dict[str, ModelAdapter]:
    adapters = {}
    for name in TINY_MODELS:
        model, processor, family = build_tiny(name)
        adapters[name] = get_adapter(LoadedModel(name, family, model, processor))
    return adapters


def images(n: int = 2) -> list[Image.Image]:
    colours_and_sizes = [((200, 40, 40), (64, 64)), ((10, 200, 40), (80, 48))]
    return [Image.new("RGB", size, colour) for colour, size in colours_and_sizes[:n]]


def expected_image_tokens(adapter: ModelAdapter, batch, row: int) -> int:
    """Image tokens of row's image from the vision config (Qwen2-VL: merged patches of its image grid)."""
    config = adapter.model.config
    if config.model_type == "qwen2_vl":
        return int(batch["image_grid_thw"][row].prod()) // config.vision_config.spatial_merge_size**2
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


@pytest.mark.parametrize("name", TINY_MODELS)
def test_dimensions_and_modules(adapters, name):
    adapter = adapters[name]
    assert (adapter.n_layers, adapter.d_model, adapter.n_heads, adapter.head_dim) == (2, 64, 4, 16)
    assert adapter.device == torch.device("cpu") and adapter.is_vlm == (name in VLMS)
    assert adapter.decoder_layers() is adapter.language_model().layers
    assert adapter.lm_head().weight.shape == (len(adapter.tokenizer), 64)
    assert adapter.final_norm() is adapter.language_model().norm
    if adapter.is_vlm:
        tower, projector = adapter.vision_tower(), adapter.projector()
        assert (
            sum(p.numel() for p in tower.parameters()) > 0
            and sum(p.numel() for p in projector.parameters()) > 0
        )
        assert not {id(p) for p in tower.parameters()} & {id(p) for p in projector.parameters()}
    else:
        assert adapter.vision_tower() is None and adapter.projector() is None


def test_qwen2vl_tower_excludes_merger(adapters):
    adapter = adapters["tiny-qwen2vl"]
    visual = adapter.model.model.visual
    assert adapter.projector() is visual.merger
    tower_params = {id(p) for p in adapter.vision_tower().parameters()}
    merger_params = {id(p) for p in visual.merger.parameters()}
    assert tower_params | merger_params == {id(p) for p in visual.parameters()}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_chat_prompt_text(adapters, name):
    adapter = adapters[name]
    prompt = adapter.chat_prompt("What is 2+2?")
    assert prompt.endswith("What is 2+2?" + TEMPLATE_SUFFIX[name])
    with_system = adapter.chat_prompt("What is 2+2?", system="Be terse.")
    assert "Be terse." in with_system and with_system.index("Be terse.") < with_system.index("What is 2+2?")
    if not adapter.is_vlm:
        with pytest.raises(ValueError, match="text model"):
            adapter.chat_prompt("x", image=True)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tiny-llava", "USER: <image>\nWhat is this? ASSISTANT:"),
        ("tiny-paligemma", "<image>What is this?"),
        (
            "tiny-qwen2vl",
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?" + CHATML_SUFFIX,
        ),
    ],
)
def test_chat_prompt_image_placeholder(adapters, name, expected):
    assert adapters[name].chat_prompt("What is this?", image=True).endswith(expected)


@pytest.mark.parametrize("name, with_images", CASES)
def test_encode_is_left_padded(adapters, name, with_images):
    adapter = adapters[name]
    padding_side = adapter.tokenizer.padding_side
    batch = adapter.encode(PROMPTS, images=images() if with_images else None)
    assert adapter.tokenizer.padding_side == padding_side  # shared tokenizer state untouched
    assert "labels" not in batch
    mask = batch["attention_mask"]
    assert mask[0].all() and not mask[1].all()
    n_pad = int((mask[1] == 0).sum())
    assert not mask[1, :n_pad].any() and mask[1, n_pad:].all()  # zeros on the left only
    assert (batch["input_ids"][1, :n_pad] == adapter.pad_token_id).all()
    with torch.no_grad():
        assert adapter.model(**batch).logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("name, with_images", CASES)
def test_residual_stream_matches_hidden_states(adapters, name, with_images):
    adapter = adapters[name]
    batch = adapter.encode(PROMPTS, images=images() if with_images else None)
    stream = adapter.residual_stream(batch)
    assert stream.shape == (adapter.n_layers + 1, 2, batch["input_ids"].shape[1], adapter.d_model)
    with torch.no_grad():
        hidden = adapter.model(**batch, output_hidden_states=True).hidden_states
    for layer in range(adapter.n_layers):  # entry 0 = embeddings (Gemma's scaling included)
        torch.testing.assert_close(stream[layer], hidden[layer])
    # HF's last hidden state has the final norm applied; ours is taken before it.
    torch.testing.assert_close(adapter.final_norm()(stream[-1]), hidden[-1])
    positions = adapter.post_instruction_positions()
    subset = adapter.residual_stream(batch, layers=[1, 0], positions=positions)
    torch.testing.assert_close(subset, stream[[1, 0]][:, :, positions])


def test_residual_stream_stops_early(adapters):
    adapter = adapters["tiny-llama"]
    ran = []
    handle = adapter.decoder_layers()[1].register_forward_hook(lambda *_: ran.append(1))
    try:
        adapter.residual_stream(adapter.encode(["hi"]), layers=[1])
    finally:
        handle.remove()
    assert ran == []  # stopped at the input of layer 1


@pytest.mark.parametrize("name", VLMS)
def test_image_token_mask(adapters, name):
    adapter = adapters[name]
    assert not adapter.image_token_mask(adapter.encode(PROMPTS)).any()
    batch = adapter.encode(PROMPTS, images=images())
    mask = adapter.image_token_mask(batch)
    assert mask.shape == batch["input_ids"].shape and mask.dtype == torch.bool
    tokens = adapter.tokenizer
    for row in range(2):
        where = mask[row].nonzero().flatten()
        assert len(where) == expected_image_tokens(adapter, batch, row)
        assert (where == torch.arange(where[0], where[-1] + 1)).all()  # one contiguous block
        before, after = batch["input_ids"][row, where[0] - 1], batch["input_ids"][row, where[-1] + 1]
        if name == "tiny-llava":  # 'USER: <image>\n...'
            assert tokens.decode(after) == "\n"
        elif name == "tiny-qwen2vl":  # '<|vision_start|><|image_pad|>...<|vision_end|>'
            assert tokens.convert_ids_to_tokens([before, after]) == ["<|vision_start|>", "<|vision_end|>"]
        else:  # PaliGemma: image tokens first (after left padding), then bos
            first_real = int(batch["attention_mask"][row].argmax())
            assert where[0] == first_real and after == tokens.bos_token_id


@pytest.mark.parametrize("name", TINY_MODELS)
def test_post_instruction_positions_decode_to_template_suffix(adapters, name):
    adapter = adapters[name]
    positions = adapter.post_instruction_positions()
    assert positions == list(range(-len(positions), 0))
    batches = [adapter.encode(["x", "How do I bake bread?"])]
    if adapter.is_vlm:
        batches.append(adapter.encode(["x", "How do I bake bread?"], images=images()))
    for batch in batches:
        for row in batch["input_ids"]:
            assert adapter.tokenizer.decode(row[positions]) == SUFFIX[name]
            assert adapter.tokenizer.decode(row[positions[0] - 1]).endswith(("x", "?"))  # instruction's end


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llava", "tiny-qwen2vl"])
def test_generate_batched_equals_alone(adapters, name):
    adapter = adapters[name]
    runs = [(None, [None, None])]
    if adapter.is_vlm:
        pictures = images()
        runs.append((pictures, [[image] for image in pictures]))
    for batch_images, alone_images in runs:
        together = adapter.generate(adapter.encode(PROMPTS, images=batch_images), max_new_tokens=5)
        alone = [
            adapter.generate(adapter.encode([prompt], images=image), max_new_tokens=5)[0]
            for prompt, image in zip(PROMPTS, alone_images, strict=True)
        ]
        assert all(isinstance(text, str) and text for text in together)
        assert together == alone


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logits_next_batched_equals_alone(adapters, name):
    adapter = adapters[name]
    together = adapter.logits_next(adapter.encode(PROMPTS))
    assert together.shape == (2, adapter.lm_head().weight.shape[0])
    alone = torch.cat([adapter.logits_next(adapter.encode([prompt])) for prompt in PROMPTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_generate_with_image_on_paligemma(adapters):
    adapter = adapters["tiny-paligemma"]
    assert all(
        isinstance(text, str) for text in adapter.generate(adapter.encode(PROMPTS, images=images()), 3)
    )


def check_writers_and_hooks(adapter: ModelAdapter) -> None:
    """residual_writers are that layer's o_proj / down_proj, a forward hook on them fires, and the
    layer hooks see (and can replace) the residual stream; all hooks are gone afterwards."""
    batch = adapter.encode(PROMPTS)
    modules = [*adapter.decoder_layers(), adapter.final_norm()]
    hook_counts = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]  # HF installs its own
    for layer in range(adapter.n_layers):
        writers = adapter.residual_writers(layer)
        assert (
            writers["attn"]
            is adapter.attention(layer).o_proj
            is adapter.decoder_layers()[layer].self_attn.o_proj
        )
        assert writers["mlp"] is adapter.mlp(layer).down_proj
        assert all(isinstance(module, nn.Linear) for module in writers.values())
    fired = []
    handles = [
        module.register_forward_hook(lambda m, i, o: fired.append(o.shape)) for module in writers.values()
    ]
    try:
        stream = adapter.residual_stream(batch)
    finally:
        for handle in handles:
            handle.remove()
    assert fired == [(2, batch["input_ids"].shape[1], adapter.d_model)] * 2
    assert stream.shape[0] == adapter.n_layers + 1 and torch.isfinite(stream).all()
    seen = []
    with adapter.hook_layer_output(0, lambda hidden: seen.append(hidden.clone())):
        adapter.logits_next(batch)
    torch.testing.assert_close(seen[0], stream[1])
    with adapter.hook_layer_input(1, torch.zeros_like):  # replacing the stream changes what follows
        zeroed = adapter.residual_stream(batch, layers=[2])
    assert not torch.allclose(zeroed[0], stream[2])
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hook_counts


@pytest.mark.parametrize("name", TINY_MODELS)
def test_residual_writers_and_hooks(adapters, name):
    check_writers_and_hooks(adapters[name])


def test_hooks_removed_on_error(adapters):
    adapter = adapters["tiny-llama"]
    before = len(adapter.decoder_layers()[0]._forward_pre_hooks)
    with pytest.raises(RuntimeError), adapter.hook_layer_input(0, lambda hidden: None):
        raise RuntimeError("boom")
    assert len(adapter.decoder_layers()[0]._forward_pre_hooks) == before


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    model, tokenizer, _ = build_tiny("tiny-llama")
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("quantisation", ["nf4", "int8"])
def test_hooks_on_bitsandbytes_copy(tiny_llama_dir, quantisation):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    settings = (
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
        if quantisation == "nf4"
        else {"load_in_8bit": True}
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
    )
    adapter = get_adapter(
        LoadedModel("tiny-llama", "llama", model.eval(), AutoTokenizer.from_pretrained(tiny_llama_dir))
    )
    expected_class = "Linear4bit" if quantisation == "nf4" else "Linear8bitLt"
    assert type(adapter.residual_writers(0)["mlp"]).__name__ == expected_class
    check_writers_and_hooks(adapter)


def test_unknown_family():
    model, tokenizer, _ = build_tiny("tiny-llama")
    with pytest.raises(Exception, match="no adapter for family 'gpt2'"):
        get_adapter(LoadedModel("x", "gpt2", model, tokenizer))
