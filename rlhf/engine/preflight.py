"""Checks the launching process runs once, before any rank starts: the accelerator, the critic, the fit.

Each raises ``PreflightError`` (or the planner's ``DoesNotFit``) with one line naming the key or the
change that fixes it; ``launchers.local.launch`` prints that line and exits non-zero, so a run that
cannot work stops in seconds instead of starting N ranks that each fail the same way.

1. critic: PPO (and a pipeline that does not train its reward model first) needs a trained reward
   model: a directory with the value head a ``stage=rm`` run saves. A bare LM or a hub id would score
   answers with a randomly initialised head. ``ppo.allow_untrained_critic=true`` accepts it; tiny
   models (the embedded demo) are exempt;
2. accelerator: a CUDA profile needs CUDA on this machine and at least ``hardware.procs_per_node``
   devices (single-node launches; Slurm and multi-node ranks run elsewhere);
3. fit: the memory planner's check (``rlhf.engine.memory.check_fits``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class PreflightError(RuntimeError):
    """A run that cannot work on this machine or with this config; the message is one line."""


def accelerator_problem(hardware) -> Optional[str]:
    """Why this machine cannot run the profile's ranks, or None."""
    if hardware.accelerator != "cuda" or hardware.launcher == "slurm" or int(hardware.nodes) > 1:
        return None
    import torch

    if not torch.cuda.is_available():
        return (f"hardware={hardware.name} needs CUDA GPUs but this machine has none (torch.cuda.is_available() "
                "is False): use hardware=cpu or hardware=cpu2 here, launch.dry_run=true to see the command, "
                "or stage=plan to see the memory plan")
    have, want = torch.cuda.device_count(), int(hardware.procs_per_node)
    if have < want:
        return (f"hardware={hardware.name} starts {want} ranks per node but this machine has {have} GPU(s): "
                f"set hardware.procs_per_node={have} (or use a profile for this machine)")
    return None


def _needs_trained_critic(cfg) -> bool:
    """Does step 3 load a step-2 model that this run does not train itself?"""
    from rlhf.config import loads_step2_model, pipeline_steps

    stage = cfg.stage.name
    if stage == "ppo":
        return loads_step2_model(cfg.ppo)
    if stage == "pipeline":
        names = [name for _, name in pipeline_steps(cfg.pipeline, cfg.ppo)]
        return "rm" not in names and any(loads_step2_model(cfg.ppo, n) for n in names if n in ("ppo", "grpo"))
    return False


def is_trained_reward_dir(path: str) -> bool:
    """A directory a reward-model run wrote: HF weights plus the value head."""
    from rlhf.models.reward import VALUE_HEAD_FILE

    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / VALUE_HEAD_FILE).is_file()


def critic_problem(cfg) -> Optional[str]:
    """Why step 3's critic/reward model is not a trained reward model, or None."""
    if not _needs_trained_critic(cfg) or cfg.ppo.allow_untrained_critic or cfg.reward.init == "tiny":
        return None
    source = cfg.critic.path or cfg.reward.path
    if is_trained_reward_dir(source):
        return None
    key = "critic.path" if cfg.critic.path else "reward.path"
    msg = (f"stage={cfg.stage.name}: the critic/reward model ({key}={source}) is not a trained reward model "
           "(no value_head.safetensors): PPO would score answers with a randomly initialised value head. "
           "Set critic.path=<a stage=rm output dir>, run stage=pipeline (it trains the reward model first), "
           "or set ppo.allow_untrained_critic=true")
    if cfg.reward.name == cfg.actor.name and not cfg.critic.path:
        size = f" ({cfg.reward.params_b:g}B)" if cfg.reward.params_b else ""
        msg += (f". Note the reward/critic follows model= (here {cfg.reward.name}{size}); DeepSpeed-Chat pairs its "
                "OPT actors with a small critic: add reward=opt-350m (experiment=dschat/opt-13b-dgx8 is its "
                "OPT-13B setup)")
    return msg


def preflight(cfg, accelerator: bool = True) -> None:
    """Run the checks of the module docstring in order; raise on the first problem."""
    if cfg.stage.name == "plan":
        return
    problem = critic_problem(cfg) or (accelerator_problem(cfg.hardware) if accelerator else None)
    if problem:
        raise PreflightError(problem)
    from rlhf.engine.memory import check_fits

    check_fits(cfg)
