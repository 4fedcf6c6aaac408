"""Chat LLMs with a `model.layers` decoder: Llama, Mistral, Qwen2, Gemma/Gemma2, SmolLM (any *ForCausalLM)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmsafe_cli.models.adapter import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Text-only: plain-string message content formatted by the tokenizer's chat template."""

    def language_model(self) -> nn.Module:
        return self.model.model

    def _template_owner(self) -> Any:
        return self.tokenizer

    def _user_content(self, instruction: str, image: bool) -> Any:
        if image:
            raise ValueError(f"{self.loaded.name} is a text model: it takes no image")
        return instruction
