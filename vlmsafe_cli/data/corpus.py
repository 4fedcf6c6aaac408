"""Offline text for calibration and perplexity, split so the two never share a document.

`builtin`: the documentation topics bundled with CPython (`pydoc_data.topics`, PSF licence, about 465k
characters of English prose and code), split by topic: even-numbered topics (sorted by name) for
calibration, odd-numbered ones for evaluation. A path instead names a local `.txt` file (whole file) or
`.jsonl` file (its `text` field), for users with their own corpus; the same file serves both splits
only if the user says so by naming it twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmsafe_cli.errors import UserError

SPLITS = ("calibration", "evaluation")


def builtin_text(split: str) -> str:
    """One of the two disjoint halves of CPython's bundled documentation topics."""
    from pydoc_data.topics import topics

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    names = sorted(topics)[SPLITS.index(split) :: 2]
    return "\n\n".join(topics[name] for name in names)


def load_text(dataset: str, split: str) -> str:
    """The text of `dataset` (`builtin` or a local .txt/.jsonl path) for `split`."""
    if dataset == "builtin":
        return builtin_text(split)
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise UserError(f"calibration dataset {dataset!r} is not `builtin` nor an existing .txt/.jsonl file")
    if path.suffix == ".jsonl":
        return "\n\n".join(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
    return path.read_text()


def token_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` token ids at seeded random offsets in `text` (n_samples, seq_len)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.numel() <= seq_len:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=generator)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])
