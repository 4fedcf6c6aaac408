"""The AIRD analysis: a compression that removes exactly the write along r at one layer is repaired back to
the base model; edits are undone afterwards (also on bitsandbytes modules); the CLI runs every method."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from vlmsafe_cli.analysis import merged_settings
from vlmsafe_cli.analysis.aird import dense_weight, edited, run, writer
from vlmsafe_cli.analysis.refusal_direction import (
    Extracted,
    Selection,
    candidate_directions,
    memo_key,
    prompt_splits,
)
from vlmsafe_cli.config import CompressConfig, ModelConfig, VlmsafeConfig
from vlmsafe_cli.interventions import unit
from vlmsafe_cli.job import Workspace
from vlmsafe_cli.models import LoadedModel, load_model
from vlmsafe_cli.models.adapter import get_adapter

CPU = torch.device("cpu")
SMALL = {"n_train": 16, "n_val": 8, "n_test": 16, "max_new_tokens": 24, "batch_size": 16}


def job_config(model: str, family: str, source: str):
    cfg = OmegaConf.structured(VlmsafeConfig)
    cfg.model = OmegaConf.structured(ModelConfig(name=model, family=family, source=source))
    cfg.compress = OmegaConf.structured(
        CompressConfig(name="write-removed", method="magnitude", ppl_samples=0)
    )
    return cfg


def write_removed_workspace(tmp_path, model: str, family: str, source: str, layer: int, settings):
    """A workspace whose "compressed" model is the base model with layer `layer`'s MLP write along r
    removed (W <- W - r r^T W): the one thing AIRD's restore_write puts back. r is the base model's
    harmful-minus-harmless mean entering layer `layer` at the last prompt position, given to the analysis as
    the base direction (the property holds for any r, so the test skips the selection search)."""
    cfg = job_config(model, family, source)
    base = load_model(cfg.model, CPU, seed=0)
    compressed = LoadedModel(base.name, base.family, copy.deepcopy(base.model), base.processor)
    workspace = Workspace(cfg=cfg, job_dir=tmp_path, device=CPU, compressed=compressed, _base=base)
    base_adapter = get_adapter(base)
    splits = prompt_splits(cfg, settings, base_adapter)
    positions = base_adapter.post_instruction_positions()
    mean_diffs = candidate_directions(
        base_adapter, splits["harmful_train"], splits["harmless_train"], positions, settings.batch_size
    )
    direction = mean_diffs[layer, -1]
    selection = Selection(layer, positions[-1], direction, False, float("nan"), float("nan"), float("nan"), 0)
    workspace.memo[memo_key("base", settings)] = Extracted(mean_diffs, positions, selection)
    r = unit(direction)
    down = writer(get_adapter(compressed), layer, "mlp")
    with torch.no_grad():
        down.weight -= torch.outer(r, r @ down.weight)
    return workspace, r


def values(table: pd.DataFrame, variant: str) -> dict:
    rows = table[(table.variant == variant) & table.metric.isin(["refusal_rate", "asr", "over_refusal_rate"])]
    return dict(zip(rows.metric, rows.value, strict=True))


@pytest.mark.parametrize("method", ["restore_write", "mask_preserving"])
def test_a_removed_write_along_r_is_restored_exactly_on_a_tiny_model(tmp_path, method):
    settings = merged_settings("aird", {**SMALL, "method": method, "layer": 1, "max_new_tokens": 4})
    workspace, r = write_removed_workspace(tmp_path, "tiny-llama", "llama", "tiny", 1, settings)
    base, compressed = get_adapter(workspace.base()), get_adapter(workspace.compressed)
    removed = dense_weight(writer(compressed, 1, "mlp"))
    table = pd.DataFrame(run(workspace, settings))
    assert values(table, "repaired") == values(table, "base")
    assert table[table.metric == "aird_layer"].value.tolist() == [1]
    # the edit is undone afterwards, and inside it the weight is the base model's (restore_write exactly;
    # mask_preserving on a dense matrix too, since every weight is "kept")
    assert torch.equal(dense_weight(writer(compressed, 1, "mlp")), removed)
    from vlmsafe_cli.analysis.aird import repaired_weight

    splits = prompt_splits(workspace.cfg, settings, compressed)
    weight = repaired_weight(method, base, compressed, 1, r, splits, settings)
    torch.testing.assert_close(weight, dense_weight(writer(base, 1, "mlp")), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_removed_write_along_r_in_the_organism_is_repaired_to_the_base_refusal_rate(tmp_path):
    settings = merged_settings("aird", {**SMALL, "layer": 10})
    workspace, _ = write_removed_workspace(tmp_path, "smollm2-aligned", "llama", "organism", 10, settings)
    table = pd.DataFrame(run(workspace, settings))
    assert values(table, "repaired") == values(table, "base")
    assert values(table, "base")["refusal_rate"] >= 0.75  # the organism refuses these (its training prompts)


def test_edit_of_a_bitsandbytes_matrix_is_dense_inside_and_undone_after():
    from vlmsafe_cli.compress import run_method

    cfg = job_config("tiny-llama", "llama", "tiny")
    loaded = load_model(cfg.model, CPU, seed=0)
    nf4 = OmegaConf.structured(CompressConfig(name="nf4", method="bnb", bits=4, quant_type="nf4"))
    run_method(loaded, nf4)
    adapter = get_adapter(loaded)
    original = writer(adapter, 0, "mlp")
    weight = dense_weight(original) + 0.5
    batch = adapter.encode(["Name a colour."])
    with edited(adapter, 0, "mlp", weight) as dense:
        assert type(dense) is torch.nn.Linear and torch.equal(dense.weight, weight)
        assert writer(adapter, 0, "mlp") is dense
        inside = adapter.logits_next(batch)
    assert writer(adapter, 0, "mlp") is original
    assert not torch.allclose(adapter.logits_next(batch), inside)


@pytest.mark.parametrize("method", ["restore_write", "ridge_readout", "mask_preserving"])
def test_aird_runs_every_method_through_the_cli(cli, tmp_path, method):
    job = tmp_path / "job"
    overrides = [
        "model=tiny-llama",
        "compress=wanda50",
        "analysis=aird",
        f"analysis.aird.method={method}",
        "analysis.aird.layer=scan",
        "analysis.aird.n_train=8",
        "analysis.aird.n_val=4",
        "analysis.aird.n_test=4",
        "analysis.aird.max_new_tokens=4",
        "compress.calibration.n_samples=4",
        "compress.calibration.seq_len=32",
        "compress.ppl_samples=1",
        f"hydra.run.dir={job}",
    ]
    code, _, err = cli("run", *overrides)
    assert code == 0, err
    table = pd.read_parquet(job / "results.parquet")
    table = table[table.analysis == "aird"]
    assert len(table[table.metric == "scan_refusal_score"]) == 2  # tiny-llama's two layers
    assert len(table[table.metric == "write_gap"]) == 2
    for metric in ("refusal_rate", "asr", "over_refusal_rate", "ppl", "cos_at_base_source"):
        assert {"compressed", "repaired"} <= set(table[table.metric == metric].variant), metric
    density = table[table.metric == "aird_density_added"].value.item()
    assert density == 0.0 if method == "mask_preserving" else density > 0.3  # wanda50 left half the weights


def test_aird_on_an_uncompressed_model_records_nothing(cli, tmp_path):
    job = tmp_path / "job"
    code, _, err = cli(
        "run", "model=tiny-llama", "analysis=aird", "compress.ppl_samples=0", f"hydra.run.dir={job}"
    )
    assert code == 0, err
    assert "aird" not in set(pd.read_parquet(job / "results.parquet").analysis)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("compress=wanda50", "analysis.aird.method=magic"), "analysis.aird.method='magic' is not valid"),
        (("compress=wanda50", "analysis.aird.layer=middle"), "analysis.aird.layer='middle' is not valid"),
        (("compress=wanda50", "analysis.aird.matrix=qkv"), "choose mlp or attn"),
    ],
)
def test_aird_bad_settings_are_one_line_user_errors(cli, tmp_path, overrides, message):
    code, _, err = cli("run", "model=tiny-llama", "analysis=aird", *overrides, f"out_root={tmp_path}")
    assert code == 2 and message in err, err
