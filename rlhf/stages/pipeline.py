"""All steps in one run: SFT -> RM -> PPO (``pipeline.algo=ppo``), SFT -> RM -> GRPO (``grpo``:
the PPO stage with ``ppo.advantage=grpo``, no critic) or SFT -> DPO (``dpo``). ``pipeline.compare``
adds more step-3 algorithms, each run from the same SFT (and RM) models: a paired comparison.

The actor (``actor=...``, default the ``model`` choice) is fine-tuned in step 1 and optimised in
step 3; the reward model (``reward=...``) is trained in step 2 and becomes critic and reward.
Each step writes into its own subdirectory of the run (``sft/``, ``rm/``, ``ppo/`` or ``dpo/``)
with its HF model directory and summary.json; the pipeline writes its own summary.json (with
``by_algo``: each step-3 algorithm's rule rates before and after) and prints a table.
``pipeline.steps=[3]`` reruns a later step on the outputs already in the run directory.

Steps:
  1. plan which steps run and where their inputs come from;
  2. run each step with the previous step's model directory wired in;
  3. write the pipeline summary and print the table.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List

from rlhf.config import loads_step2_model, pipeline_steps
from rlhf.stages import STAGES, get_stage
from rlhf.tracking import atomic_write_json

log = logging.getLogger(__name__)



def _input_dir(run_dir: Path, step: str, produced: bool, given, key: str, needed_by: str) -> str:
    """The model a later step starts from: this run's ``<step>/model``, or an existing dir the
    user named (``key``); a clear error when neither exists."""
    path = run_dir / step / "model"
    if produced or (path / "config.json").exists():
        return str(path)
    if given and Path(str(given)).is_dir():
        return str(given)
    raise FileNotFoundError(
        f"step {needed_by} needs the {step} step's model: {path} is missing and {key} is not an existing "
        f"directory. Add the {step} step to pipeline.steps, set run_dir to a pipeline run that has it, "
        f"or set {key}=<model dir>")


def plan(cfg, run_dir: Path) -> List[tuple]:
    """[(name, sub-config), ...] for the steps to run, each wired to its inputs (the algorithms
    and steps were checked by rlhf.config.validate)."""
    steps = list(cfg.pipeline.steps)
    out = []
    for _, name in pipeline_steps(cfg.pipeline, cfg.ppo):
        sub = copy.deepcopy(cfg)
        sub.stage.name = name
        if name == "sft":
            sub.model = copy.deepcopy(cfg.actor)
        elif name == "rm":
            sub.model = copy.deepcopy(cfg.reward)
        else:
            sub.model = copy.deepcopy(cfg.actor)
            sub.actor.path = _input_dir(run_dir, "sft", 1 in steps, cfg.actor.path, "actor.path", name)
            if loads_step2_model(cfg.ppo, name):
                sub.critic.path = _input_dir(run_dir, "rm", 2 in steps, cfg.critic.path, "critic.path", name)
        out.append((name, sub))
    return out


def run(cfg, run_dir=None) -> Dict[str, Any]:
    # 1. plan
    run_dir = Path(run_dir or cfg.run_dir)
    steps = plan(cfg, run_dir)
    if 2 in cfg.pipeline.steps and "rm" not in dict(steps):
        log.info("pipeline: no reward model to train (step 2): step 3 (%s) loads none",
                 ", ".join(name for name, _ in steps if STAGES[name].step == 3))
    # 2. run the steps in order
    results: Dict[str, Dict[str, Any]] = {}
    for name, sub in steps:
        log.info("pipeline: step %s -> %s", name, run_dir / name)
        results[name] = get_stage(name)(sub, run_dir=run_dir / name)
        if cfg.pipeline.eval and name != "rm":  # benchmark skill after the step (the reward model is no LM)
            from rlhf.stages.eval import after_step
            results[name]["eval"] = after_step(sub, run_dir / name, list(cfg.pipeline.eval))
    # 3. summary and table
    summary = {"stage": "pipeline", "algo": cfg.pipeline.algo, "steps": results}
    sft = results.get("sft", {})
    by_algo = {name: _before_after(sft, r) for name, r in results.items() if STAGES[name].step == 3}
    final = by_algo.get(cfg.pipeline.algo, {})
    summary.update(rule_rate_sft=sft.get("rule_rate"), rule_rate_final=final.get("rule_rate_final"),
                   rule_rate_sampled_sft=sft.get("rule_rate_sampled"),
                   rule_rate_sampled_final=final.get("rule_rate_sampled_final"), by_algo=by_algo,
                   wall_time_s=sum(r.get("wall_time_s", 0.0) for r in results.values()),
                   objective=results.get(cfg.pipeline.algo, {}).get("objective"))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_json(run_dir / "summary.json", summary)
        print(table(results))
    return summary


def _before_after(sft: Dict[str, Any], r: Dict[str, Any]) -> Dict[str, Any]:
    """A step-3 result's held-out rule rates: its start (the SFT model; the step's own start score
    when step 1 did not run here), its end (the exported model) and, for greedy and sampled, the
    trained model's before ``delta_scale`` (the same as the end at 1.0)."""
    out = {}
    for key in ("rule_rate", "rule_rate_sampled", "rule_rate_add"):
        start = r.get(f"{key}_start", r.get(f"{key}_initial"))
        out[f"{key}_sft"] = sft.get(key, start) if sft else start
        out[f"{key}_final"] = r.get(key)
        if key != "rule_rate_add":
            out[f"{key}_trained"] = r.get(f"{key}_trained", r.get(key))
    return out


def _rule_cell(r: Dict[str, Any], key: str) -> str:
    """'0.812' or, for a step that starts from another model (ppo, dpo), 'start -> end'."""
    end = r.get(key)
    if end is None:
        return "-"
    start = r.get(f"{key}_start", r.get(f"{key}_initial"))
    return f"{end:.3f}" if start is None else f"{start:.3f} -> {end:.3f}"


def table(results: Dict[str, Dict[str, Any]]) -> str:
    """Markdown table: per step the key metric, wall time and the demo rule rates on held-out
    prompts (greedy answers; sampled answers, temperature 1)."""
    lines = ["| step | key metric | value | wall time (s) | rule rate, greedy (held-out) | rule rate, sampled (held-out) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        key = STAGES[name].key_metric
        value = r.get(key)
        value_s = "-" if value is None else f"{value:.4g}"
        lines.append(f"| {name} | {key} | {value_s} | {r.get('wall_time_s', 0.0):.1f} | "
                     f"{_rule_cell(r, 'rule_rate')} | {_rule_cell(r, 'rule_rate_sampled')} |")
    from rlhf.stages.ppo import time_line

    lines += ["", *(f"{name}: {time_line(r['time_split'])}" for name, r in results.items() if r.get("time_split"))]
    return "\n".join(lines).rstrip()
