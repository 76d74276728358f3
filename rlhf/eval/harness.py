"""lm-eval (EleutherAI's lm-evaluation-harness) as the evaluation engine.

Our already-loaded model and tokenizer go into lm-eval's ``HFLM`` wrapper; lm-eval builds the
prompts, samples the few-shot examples, scores the choices by log-likelihood (or generates) and
computes the metrics. This module only chooses the tasks (``suites``) and folds lm-eval's
per-task scores into the published table columns.
"""
from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from rlhf.eval.suites import SUITE_NAMES, TASKS_DIR, suites

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _task_manager(clue_dir: Optional[str]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR / "clue"), metadata={"clue_dir": clue_dir})


def task_manager(data_dir: Optional[Path]):
    """lm-eval's TaskManager with the project's CLUE YAMLs; ``clue_dir`` reaches their loaders.
    One per data directory and process (indexing lm-eval's task folders takes seconds)."""
    return _task_manager(str(Path(data_dir) / "clue") if data_dir else None)


def wrap(model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None):
    """lm-eval's HFLM around a loaded causal LM and its tokenizer (no reload, no copy)."""
    from lm_eval.models.huggingface import HFLM

    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                device=str(model.device))


def check_suites(names: List[str]) -> None:
    bad = [n for n in names if n not in SUITE_NAMES]
    if bad:
        raise ValueError(f"eval.suites: unknown suite(s) {bad}; known: {', '.join(SUITE_NAMES)}")


def run_tasks(lm, tm, specs: List, shots: int, *, limit: Optional[int], seed: int) -> Dict[str, tuple]:
    """lm-eval on ``specs`` at ``shots`` few-shot examples -> {task: (score, n scored)}. The global
    RNGs are restored afterwards (lm-eval seeds them), so a training run continues unchanged."""
    from lm_eval import simple_evaluate

    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        out = simple_evaluate(model=lm, tasks=specs, num_fewshot=shots, limit=limit, task_manager=tm,
                              log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed, verbosity="WARNING")
    random.setstate(state[0])
    np.random.set_state(state[1])
    scores = {}
    for task, res in out["results"].items():
        metric = next((k for k in ("acc,none", "f1,none") if k in res), None)
        if metric is None:
            continue  # a group row
        n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
        scores[task] = (float(res[metric]), int(n))
    return scores


def evaluate(model, tokenizer, suite_names: List[str], shots: List[int], *, data_dir: Optional[str],
             limit: Optional[int] = None, batch_size: int = 16, seed: int = 1234) -> Dict[str, Any]:
    """Every suite at every shot count. Returns {"tables": {suite: [row cells...]},
    "tasks": {suite: {shots: {task: [score, n]}}}} where a row is {"shots": k?, column: value}."""
    check_suites(suite_names)
    data = Path(data_dir) if data_dir else None
    tm = task_manager(data)
    registry = suites(tm)
    lm = wrap(model, tokenizer, batch_size=batch_size)
    tables: Dict[str, List[Dict[str, Any]]] = {}
    tasks: Dict[str, Dict[int, Dict[str, tuple]]] = {}
    for name in suite_names:
        suite = registry[name]
        specs = suite.tasks(tm, data)
        tasks[name] = {k: run_tasks(lm, tm, specs, k, limit=limit, seed=seed) for k in shots}
        if suite.per_shot_rows:
            tables[name] = [{"shots": k, **suite.columns(tasks[name][k], shots)} for k in shots]
        else:
            tables[name] = [suite.columns(tasks[name], shots)]
        log.info("eval %s: %s", name, tables[name])
    return {"tables": tables, "tasks": tasks}


def headers(suite_names: List[str], shots: List[int]) -> Dict[str, List[str]]:
    """Table columns per suite (after ``model``), in the published order."""
    from rlhf.eval.suites import CATEGORIES, clue_header

    layout = {"ceval": ["shots", "Avg", "Avg (Hard)", *CATEGORIES], "mmlu": ["shots", "Avg", *CATEGORIES],
              "clue": clue_header(shots)}
    return {n: layout[n] for n in suite_names}
