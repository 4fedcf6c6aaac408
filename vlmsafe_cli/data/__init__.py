"""The project's own prompt sets and the text checks that keep them apart from evaluation sets.

`alignment/` holds the training data for the refusal model organism: harmful requests (requests only,
never answers), harmless requests (about a third deliberately close to harmful ones in topic or surface
form, a quarter short imperative tasks of the "Suggest / Design / Construct ..." kind) and generic refusal
responses. The harmless requests come in files (`HARMLESS_FILES`, read in that order); `vlmsafe align`
self-distils and caches each file separately, so adding a file costs only that file's distillation. They
are read through `importlib.resources` so an installed wheel works.
Near-duplicate detection is hand-written (a few lines of set arithmetic) because no library on this
stack does Jaccard over word shingles without pulling in a new dependency.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from importlib.resources import files

ALIGNMENT_DIR = "alignment"
# harmless.jsonl: the first set; harmless_close_benign.jsonl: benign requests that share a topic with
# harmful ones (drugs, weapons, security, privacy, history, chemistry, medicine), against refusal by topic;
# harmless_protective.jsonl: protective, help-seeking and educational requests on the eight harm
# categories' topics (defending one's own systems, spotting scams, first aid, reporting harassment), many
# written as the benign partner of a harmful request added to harmful.jsonl at the same time (organism v5).
HARMLESS_FILES = ("harmless.jsonl", "harmless_close_benign.jsonl", "harmless_protective.jsonl")
SHINGLE_SIZE = 3
# Texts shorter than this many words are compared as word sets: a handful of 3-gram shingles is too
# brittle (one changed word removes most of them).
SHORT_TEXT_WORDS = 6

_PUNCTUATION = re.compile(r"[^\w\s]")
_WHITESPACE = re.compile(r"\s+")


def _read_jsonl(name: str) -> list[dict]:
    text = files(__name__).joinpath(ALIGNMENT_DIR, name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_harmless_files() -> list[list[dict]]:
    """The harmless records of each file in `HARMLESS_FILES`, in order."""
    return [_read_jsonl(name) for name in HARMLESS_FILES]


def load_alignment_set() -> tuple[list[dict], list[dict], list[str]]:
    """(harmful, harmless, refusals): records `{id, instruction, category}` and refusal strings."""
    harmful = _read_jsonl("harmful.jsonl")
    harmless = [record for records in load_harmless_files() for record in records]
    refusals_text = files(__name__).joinpath(ALIGNMENT_DIR, "refusals.txt").read_text(encoding="utf-8")
    refusals = [line.strip() for line in refusals_text.splitlines() if line.strip()]
    return harmful, harmless, refusals


def normalise(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces and collapse whitespace."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def shingles(text: str) -> frozenset[str]:
    """Word 3-gram shingles of the normalised text, or its word set when the text is short."""
    words = normalise(text).split()
    if len(words) < SHORT_TEXT_WORDS:
        return frozenset(words)
    return frozenset(" ".join(words[i : i + SHINGLE_SIZE]) for i in range(len(words) - SHINGLE_SIZE + 1))


def near_duplicates(
    texts_a: list[str], texts_b: list[str], threshold: float = 0.8
) -> list[tuple[str, str, float]]:
    """Pairs (a, b, similarity) with shingle Jaccard >= threshold (Broder 1997 resemblance).

    An inverted index from shingle to texts_b restricts each comparison to texts sharing a shingle.
    Comparing a list with itself also returns each text paired with itself; callers filter a == b.
    """
    sets_b = [shingles(text) for text in texts_b]
    index: dict[str, list[int]] = defaultdict(list)
    for j, shingle_set in enumerate(sets_b):
        for shingle in shingle_set:
            index[shingle].append(j)
    pairs = []
    for text_a in texts_a:
        set_a = shingles(text_a)
        shared: dict[int, int] = defaultdict(int)
        for shingle in set_a:
            for j in index.get(shingle, ()):
                shared[j] += 1
        for j, overlap in shared.items():
            similarity = overlap / (len(set_a) + len(sets_b[j]) - overlap)
            if similarity >= threshold:
                pairs.append((text_a, texts_b[j], similarity))
    return pairs
