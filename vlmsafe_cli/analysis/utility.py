"""`analysis=utility`: what compression (and an AIRD repair) costs in general ability: zero-shot accuracy
through lm-evaluation-harness's Python API on the in-memory model, plus perplexity.

lm-eval scores the model object vlmsafe holds (no reload, so pruned, fake-quantised and bitsandbytes copies
are measured as they are). Default tasks are the pruning literature's (boolq, rte, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa), which lm-eval fetches from the hub; offline, point `task_dir` at
local task YAMLs (lm-eval's format, e.g. `dataset_path: json` with local `data_files`). Accuracy CIs are
Wilson intervals over the per-document outcomes lm-eval logs. When `aird` ran earlier in the same job, the
repaired model is measured too.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

from omegaconf import DictConfig

from vlmsafe_cli.compress.perplexity import perplexity_rows
from vlmsafe_cli.errors import JobError
from vlmsafe_cli.models import LoadedModel, model_identity
from vlmsafe_cli.models.adapter import get_adapter
from vlmsafe_cli.results import row
from vlmsafe_cli.stats import proportion_ci

log = logging.getLogger("vlmsafe.utility")
ANALYSIS = "utility"


def task_manager(task_dir: Any):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir) if task_dir else None)


def evaluate_tasks(loaded: LoadedModel, settings: DictConfig, manager) -> dict[str, list[bool]]:
    """Per task, the per-document correctness (acc) of `loaded` under lm-eval."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    adapter = get_adapter(loaded)
    model = HFLM(pretrained=loaded.model, tokenizer=adapter.tokenizer, batch_size=settings.batch_size)
    try:
        output = simple_evaluate(
            model=model,
            tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=manager,
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    except (ConnectionError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise JobError(
            f"utility: lm-eval could not load the tasks {list(settings.tasks)} ({reason}); "
            "offline, give analysis.utility.task_dir=DIR with local task YAMLs"
        ) from err
    return {
        task: [bool(sample["acc"]) for sample in samples]
        for task, samples in output["samples"].items()
        if samples and "acc" in samples[0]
    }


def accuracy_rows(variant: str, outcomes: dict[str, list[bool]]) -> list[dict]:
    rows = []
    for task, correct in sorted(outcomes.items()):
        rate, low, high = proportion_ci(correct)
        rows.append(
            row(ANALYSIS, variant, "accuracy", rate, ci_low=low, ci_high=high, n=len(correct), group=task)
        )
    return rows


def run(workspace, settings: DictConfig) -> list[dict]:
    """Accuracy on the configured tasks and perplexity, for base, compressed and (after aird) repaired."""
    cfg = workspace.cfg
    manager = task_manager(settings.task_dir)
    unknown = [task for task in settings.tasks if task not in manager.all_tasks]
    if unknown:
        raise JobError(f"utility: lm-eval knows no task {unknown}; check analysis.utility.tasks / task_dir")
    variants: list[tuple[str, LoadedModel, Any]] = [("base", workspace.base(), nullcontext())]
    if cfg.compress.method != "none":
        variants.append(("compressed", workspace.compressed, nullcontext()))
        from vlmsafe_cli.analysis.aird import AIRD_EDIT, edited

        if AIRD_EDIT in workspace.memo:
            layer, matrix, weight = workspace.memo[AIRD_EDIT]
            repair = edited(get_adapter(workspace.compressed), layer, matrix, weight)
            variants.append(("repaired", workspace.compressed, repair))
    rows = []
    for variant, loaded, context in variants:
        with context:
            rows += accuracy_rows(variant, evaluate_tasks(loaded, settings, manager))
            cache_key = {"model": model_identity(cfg.model, cfg.seed)} if variant == "base" else None
            ppl = perplexity_rows(loaded, cfg.compress, variant, cfg.seed, cache_key=cache_key)
            rows += [{**entry, "analysis": ANALYSIS} for entry in ppl]
    return rows
