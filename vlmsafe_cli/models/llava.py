"""LLaVA-1.5 and LLaVA-NeXT: CLIP tower -> MLP projector -> Llama/Mistral/Vicuna decoder.

The processor expands each `<image>` to the image's feature count (fixed 576 for LLaVA-1.5 at 336 px,
size-dependent for NeXT's any-resolution tiles); NeXT's `image_newline` is a parameter of `model.model`.
"""

from __future__ import annotations

from torch import nn

from vlmsafe_cli.models.adapter import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """Prompt 'USER: <image>\\n{instruction} ASSISTANT:' (1.5) or '[INST] <image>\\n... [/INST]' (NeXT)."""

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector
