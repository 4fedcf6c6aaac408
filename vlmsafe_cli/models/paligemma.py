"""PaliGemma and PaliGemma 2: SigLIP tower -> linear projector -> Gemma/Gemma2 decoder, no chat roles.

The model sees `<image>` x image_seq_length, bos, the prefix text, "\\n" (its "generation prompt"), with
bidirectional attention over that prefix (token_type_ids 0). The processor refuses text-only input, so
text-only prompts are tokenised here exactly as the processor lays out the text part.
"""

from __future__ import annotations

from typing import Any

from jinja2.exceptions import TemplateError
from torch import nn

from vlmsafe_cli.models.adapter import ModelAdapter


class PaliGemmaAdapter(ModelAdapter):
    """Prompt '<image>{instruction}'; the processor (or `_model_text`) adds bos and the closing newline."""

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def chat_prompt(self, instruction: str, image: bool = False, system: str | None = None) -> str:
        """'<image>' (when `image`) then the instruction; no roles, so a system text is prepended to it."""
        if system is not None:
            instruction = f"{system}\n\n{instruction}"
        try:  # hub mix checkpoints ship without a chat template
            return super().chat_prompt(instruction, image=image)
        except (TemplateError, ValueError):
            return self.processor.image_token * image + instruction

    def _model_text(self, prompt: str) -> str:
        return f"{self.tokenizer.bos_token}{prompt}\n"

    def _tokenizer_kwargs(self, texts: list[str]) -> dict[str, Any]:
        """As the processor calls its tokenizer: no added specials, token_type_ids (0 = prefix) returned."""
        return super()._tokenizer_kwargs(texts) | {"add_special_tokens": False, "return_token_type_ids": True}
