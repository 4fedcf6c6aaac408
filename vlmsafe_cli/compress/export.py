"""`compress.save=true`: the compressed model as a Hugging Face checkpoint any tool can `from_pretrained`.

Pruned and fake-quantised weights are saved dense (dequantised values); a bitsandbytes model is saved in
bitsandbytes' own serialisation (its quantization_config is in config.json). The processor or tokenizer
goes beside the weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from vlmsafe_cli.models import LoadedModel


def export_checkpoint(loaded: LoadedModel, directory: Path) -> None:
    """Write config, safetensors and processor into `directory`, built in a temporary sibling and renamed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.processor.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
