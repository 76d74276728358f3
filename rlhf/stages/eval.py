"""Benchmark evaluation (C-Eval, MMLU, CLUE) of one or more models, zero/one/few-shot, by lm-eval.

``python run.py stage=eval model.path=<dir> eval.suites=[ceval] eval.shots=[5]`` scores the model;
``eval.models=[<conf/model name or dir>, ...]`` adds more rows to the same table
(``sweep=eval_models``). Every suite reads ``eval.data_dir`` (official layouts) or the hub.

Steps:
  1. start the run (tracking; nothing is trained);
  2. for each model: load tokenizer and causal LM, run every suite at every shot count (lm-eval);
  3. write results.json, table.md / table.csv in the published layouts, log to the tracker.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

from omegaconf import OmegaConf

from rlhf.stages import common
from rlhf.tracking import atomic_write_json

log = logging.getLogger(__name__)
CONF_MODELS = Path(__file__).resolve().parents[2] / "conf" / "model"


def model_entries(cfg) -> List[Tuple[str, Any]]:
    """[(row name, model config)]: ``model`` first, then each ``eval.models`` entry (a conf/model
    option name, or a model directory / hub id loaded with ``model``'s settings)."""
    from rlhf.config import ModelConfig
    from rlhf.models.families import family_for_model_type

    out = [(cfg.model.name, cfg.model)]
    for entry in cfg.eval.models:
        entry = str(entry)
        option = CONF_MODELS / f"{entry}.yaml"
        if option.exists():
            m = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(option))
        else:
            m = copy.deepcopy(cfg.model)
            p = Path(entry)  # a step output <run>/<step>/model is named by its step
            m.path, m.init, m.name = entry, "pretrained", (p.parent.name if p.name == "model" else p.name) or entry
            config = Path(entry) / "config.json"
            if config.exists():
                m.family = family_for_model_type(json.loads(config.read_text()).get("model_type", "")).name
        out.append((m.name, m))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.models: two models share a row name ({names}); use distinct directories")
    return out


def evaluate_model(cfg, model_cfg, path: str = None) -> Dict[str, Any]:
    """Every ``eval.suites`` suite at every ``eval.shots`` on one model, in this process
    (``path`` default: the model config's own)."""
    from rlhf.engine.setup import device_for, dtype_for
    from rlhf.eval.harness import evaluate
    from rlhf.models.load import config_key, load_causal_lm, load_tokenizer, resolve_family, resolve_path

    ev = cfg.eval
    path = path or resolve_path(model_cfg, cfg.cache_dir)
    tokenizer = load_tokenizer(path, resolve_family(model_cfg, path), trust_remote_code=model_cfg.trust_remote_code,
                               key=config_key(model_cfg))
    dtype = dtype_for(cfg.hardware.precision, model_cfg.dtype)
    model = load_causal_lm(model_cfg, path, dtype=dtype).to(device_for(cfg.hardware))
    try:
        return evaluate(model, tokenizer, list(ev.suites), list(ev.shots), data_dir=ev.data_dir,
                        limit=ev.limit, batch_size=ev.batch_size, seed=int(cfg.seed))
    finally:
        del model
        gc.collect()


def write_outputs(cfg, out_dir: Path, results: Dict[str, Dict[str, Any]]) -> str:
    """results.json and the tables (table.md, table.csv, table_<suite>.csv) in ``out_dir``."""
    from rlhf.eval.harness import headers
    from rlhf.eval.table import write

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", {
        "suites": list(cfg.eval.suites), "shots": list(cfg.eval.shots), "data_dir": cfg.eval.data_dir,
        "models": {n: {"tables": r["tables"],
                       "tasks": {s: {str(k): v for k, v in by.items()} for s, by in r["tasks"].items()}}
                   for n, r in results.items()}})
    return write(out_dir, results, headers(list(cfg.eval.suites), list(cfg.eval.shots)))


def after_step(cfg, step_dir: Path, suites: List[str]) -> Dict[str, float]:
    """``pipeline.eval``: score a finished step's model (``<step_dir>/model``) on ``suites`` with the
    ``eval.*`` settings, on rank 0; results and tables in ``<step_dir>/eval``. Returns the cells."""
    import torch.distributed as dist

    from rlhf.engine.setup import barrier

    out: Dict[str, float] = {}
    if not dist.is_initialized() or dist.get_rank() == 0:
        sub = copy.deepcopy(cfg)
        sub.eval.suites = list(suites)
        res = evaluate_model(sub, sub.model, str(step_dir / "model"))
        write_outputs(sub, step_dir / "eval", {sub.model.name: res})
        out = flatten(res)
    barrier()
    return out


def flatten(res: Dict[str, Any]) -> Dict[str, float]:
    """One model's table cells as ``<suite>/<column>[/<k>shot]`` -> value."""
    flat = {}
    for suite, rows in res["tables"].items():
        for row in rows:
            tail = f"/{row['shots']}shot" if "shots" in row else ""
            flat.update({f"{suite}/{c}{tail}": v for c, v in row.items() if c != "shots" and v is not None})
    return flat


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.eval.harness import check_suites

    check_suites(list(cfg.eval.suites))
    if any(int(k) < 0 for k in cfg.eval.shots) or not cfg.eval.shots:
        raise ValueError(f"eval.shots must be a non-empty list of counts >= 0, got {list(cfg.eval.shots)}")
    # 1. start
    ctx = common.start(cfg, "eval", run_dir)
    # 2. every model
    results: Dict[str, Dict[str, Any]] = {}
    for i, (name, model_cfg) in enumerate(model_entries(cfg)):
        log.info("eval: %s (%s)", name, model_cfg.path)
        results[name] = evaluate_model(cfg, model_cfg)
        ctx.tracker.log({f"eval/{k}": v for k, v in flatten(results[name]).items()}, step=i)
    # 3. results.json, tables
    if ctx.is_main:
        print(write_outputs(cfg, ctx.run_dir, results))
    return common.finish(ctx, {
        "stage": "eval", "models": list(results), "results": str(ctx.run_dir / "results.json"),
        "table": str(ctx.run_dir / "table.md"),
        "metrics": {n: flatten(r) for n, r in results.items()},
    })
