"""Qwen2-VL and Qwen2.5-VL: ViT (`model.visual`) whose last module, the patch merger, projects 2x2 patch
groups into the Qwen2 decoder; M-RoPE positions come from the image grid.

The processor writes '<|vision_start|><|image_pad|>...<|vision_end|>' with one `<|image_pad|>` per merged
patch group (grid t*h*w / 4); only the `<|image_pad|>` tokens count as image tokens.
"""

from __future__ import annotations

from torch import nn

from vlmsafe_cli.models.adapter import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    """ChatML prompt with the vision block first in the user turn."""

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_tower(self) -> nn.Module:
        """The ViT without its merger: a ModuleDict sharing (not copying) the modules; not callable."""
        visual = self.model.model.visual
        return nn.ModuleDict({name: module for name, module in visual.named_children() if name != "merger"})

    def projector(self) -> nn.Module:
        return self.model.model.visual.merger
