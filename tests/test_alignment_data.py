"""The alignment training set: well-formed, balanced, free of duplicates, disjoint from evaluation prompts."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import public_prompts

from vlmsafe_cli.data import load_alignment_set, near_duplicates, normalise

HARMFUL_CATEGORIES = (
    "weapons_violence",
    "drugs",
    "cybercrime",
    "fraud_scams",
    "hate_harassment",
    "self_harm",
    "privacy_surveillance",
    "misinformation",
)
# Public evaluation prompts live beside the repository (not shipped with it).


@pytest.fixture(scope="module")
def alignment() -> tuple[list[dict], list[dict], list[str]]:
    return load_alignment_set()


def _texts(records: list[dict]) -> list[str]:
    return [record["instruction"] for record in records]


def test_records_are_well_formed(alignment):
    harmful, harmless, refusals = alignment
    ids = [record["id"] for record in harmful + harmless]
    assert len(ids) == len(set(ids))
    for record in harmful + harmless:
        assert record["instruction"].strip() and record["category"].strip(), record
    assert all(record["id"].startswith("h") for record in harmful)
    assert all(record["id"].startswith("b") for record in harmless)
    assert all(5 <= len(record["instruction"].split()) <= 60 for record in harmful)
    assert len(refusals) >= 60 and len(set(refusals)) == len(refusals)


def test_category_counts(alignment):
    harmful, harmless, _ = alignment
    harmful_counts = Counter(record["category"] for record in harmful)
    assert len(harmful) >= 260
    assert all(harmful_counts[category] >= 25 for category in HARMFUL_CATEGORIES), harmful_counts
    assert set(harmful_counts) == {*HARMFUL_CATEGORIES, "other_illegal"}
    harmless_counts = Counter(record["category"] for record in harmless)
    assert len(harmless) >= 300
    # v5: about half the harmless set shares a topic with harmful requests (against refusal by topic); the
    # rest (tasks, writing, coding, ...) keeps ordinary helpfulness in the mix
    assert 0.15 <= harmless_counts["close_benign"] / len(harmless) <= 0.55, harmless_counts


def test_refusals_mostly_start_with_i(alignment):
    refusals = alignment[2]
    share_i = sum(refusal.startswith("I") for refusal in refusals) / len(refusals)
    assert 0.7 <= share_i <= 0.95


def test_near_duplicates_finds_paraphrase_not_unrelated():
    base = "Write a short poem about the autumn leaves falling in the park"
    assert near_duplicates([base + "."], [base.upper()])[0][2] == pytest.approx(1.0)
    assert near_duplicates([base], ["Explain how a refrigerator keeps food cold"]) == []
    assert normalise("  Hello,   World!  It's ") == "hello world its"


@pytest.mark.parametrize("which", [0, 1], ids=["harmful", "harmless"])
def test_no_duplicates_within_set(alignment, which):
    texts = _texts(alignment[which])
    normalised = [normalise(text) for text in texts]
    assert len(set(normalised)) == len(normalised), "exact duplicates after normalisation"
    pairs = [(a, b, s) for a, b, s in near_duplicates(texts, texts) if a != b]
    assert pairs == []


def test_no_harmful_harmless_cross_duplicates(alignment):
    harmful, harmless, _ = alignment
    assert near_duplicates(_texts(harmful), _texts(harmless)) == []


def test_disjoint_from_evaluation_prompts(alignment):
    """No training prompt is a near-duplicate of any public evaluation prompt."""
    eval_texts = public_prompts()
    harmful, harmless, _ = alignment
    pairs = near_duplicates(_texts(harmful) + _texts(harmless), eval_texts)
    assert pairs == [], f"{len(pairs)} training prompts overlap evaluation prompts: {pairs[:5]}"
