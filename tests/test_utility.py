"""analysis=utility: lm-evaluation-harness on the in-memory model with a local task this project writes;
the accuracy it reports equals multiple-choice log-likelihood scoring done by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.tiny import build_tiny

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The colour of a clear daytime sky is", [" blue", " green", " loud"], 0),
    ("Two plus two equals", [" four", " seven"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " miles"], 0),
    ("The opposite of hot is", [" cold", " tall"], 0),
    ("A week has seven", [" days", " trees"], 0),
    ("Bees make", [" honey", " glass", " steel"], 0),
    ("The capital of France is", [" Paris", " Rome"], 0),
    ("Cats usually say", [" meow", " quack"], 0),
]


def write_task(directory: Path) -> Path:
    """A multiple-choice task in lm-eval's YAML format over a local JSONL file."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "toy.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS)
    )
    (directory / "vlmsafe_toy.yaml").write_text(
        "task: vlmsafe_toy\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    return directory


def accuracy_by_hand(loaded: LoadedModel) -> float:
    """acc as lm-eval defines it: the choice with the highest summed log-probability of its tokens."""
    tokenizer, model = loaded.processor, loaded.model
    correct = 0
    for question, choices, answer in QUESTIONS:
        scores = []
        for choice in choices:
            context = tokenizer(question, add_special_tokens=False)["input_ids"]
            whole = tokenizer(question + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context) :]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
            scores.append(logprobs.gather(1, torch.tensor(continuation).unsqueeze(1)).sum().item())
        correct += int(max(range(len(choices)), key=lambda i: scores[i]) == answer)
    return correct / len(QUESTIONS)


def test_utility_accuracy_equals_loglikelihood_scoring_by_hand(cli, tmp_path):
    task_dir = write_task(tmp_path / "tasks")
    job = tmp_path / "job"
    code, _, err = cli(
        "run",
        "model=tiny-llama",
        "compress=magnitude50",
        "analysis=utility",
        "analysis.utility.tasks=[vlmsafe_toy]",
        f"analysis.utility.task_dir={task_dir}",
        f"hydra.run.dir={job}",
    )
    assert code == 0, err
    table = pd.read_parquet(job / "results.parquet")
    accuracy = table[(table.analysis == "utility") & (table.metric == "accuracy")].set_index("variant")
    assert set(accuracy.group) == {"vlmsafe_toy"} and (accuracy.n == len(QUESTIONS)).all()
    model, tokenizer, family = build_tiny("tiny-llama")
    assert accuracy.loc["base", "value"] == pytest.approx(
        accuracy_by_hand(LoadedModel("t", family, model, tokenizer))
    )
    assert (accuracy.ci_low <= accuracy.value).all() and (accuracy.value <= accuracy.ci_high).all()
    assert {"base", "compressed"} <= set(
        table[(table.analysis == "utility") & (table.metric == "ppl")].variant
    )


def test_unknown_task_and_missing_task_dir_are_clear_errors(cli, tmp_path):
    code, _, err = cli(
        "run", "model=tiny-llama", "analysis=utility", f"analysis.utility.task_dir={tmp_path}/none"
    )
    assert code == 2 and "is not a directory" in err
    job = tmp_path / "job"
    code, _, err = cli(
        "run",
        "model=tiny-llama",
        "analysis=utility",
        "analysis.utility.tasks=[no_such_task]",
        f"hydra.run.dir={job}",
    )
    assert code == 1
    assert "knows no task" in json.loads((job / "job.json").read_text())["error"]
