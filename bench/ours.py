"""Our side: the real stage ``run()`` functions, in-process, with command-line overrides.

Timing is the stage's own: SFT/RM/DPO report the shared training loop (``rlhf.engine.trainer.fit``:
first micro-batch to last optimizer step, no eval, no model loading or tokenisation); step 3 the
PPO loop (generation, experience, updates) from its first to its last iteration, without the
held-out scoring before and after. Generation tokens/s: answer tokens (through the first EOS)
over the time inside generate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from bench import workload as W

COMMON = ["logger=none", "logger.progress=false", f"seed={W.SEED}", f"hardware.threads={W.THREADS}",
          "data.heldout_prompts=4", "data.heldout_samples=0"]


def _section(name: str, steps: int) -> List[str]:
    hp = W.HP[name]
    b = list(hp["betas"])
    return [f"{name}.max_steps={steps}", f"{name}.epochs=100", f"{name}.micro_batch_size={hp['batch']}",
            f"{name}.grad_accum=1", f"{name}.lr={hp['lr']}", f"{name}.warmup_steps={hp['warmup']}",
            f"{name}.max_seq_len={hp['max_len']}", f"{name}.weight_decay=0.0", f"{name}.betas=[{b[0]},{b[1]}]",
            f"{name}.scheduler=cosine", f"{name}.grad_clip=1.0", f"{name}.eval_every=0"]


def overrides(stage: str, size: W.Size, deps: Dict[str, str], variant: str = "ppo") -> List[str]:
    if stage == "sft":
        return ["stage=sft", *_section("sft", size.sft_steps), "sft.disable_dropout=false", "sft.mask_prompt=false"]
    if stage == "rm":
        return ["stage=rm", f"model.path={deps['critic_init']}", *_section("rm", size.rm_steps),
                "rm.disable_dropout=true", "rm.loss_mode=last"]
    if stage == "dpo":
        return ["stage=dpo", f"actor.path={deps['actor']}", *_section("dpo", size.dpo_steps),
                f"dpo.beta={W.HP['dpo']['beta']}", "dpo.loss=sigmoid", "dpo.disable_dropout=true",
                "dpo.precompute_ref=false"]
    hp = W.HP["rl"]
    group = hp["group"] if variant == "rloo" else 1
    out = ["stage=ppo", f"actor.path={deps['actor']}", "ppo.reward_model=false", "reward.fn=rlhf.data.demo:reward",
           "reward.fn_weight=1.0", f"ppo.max_steps={size.rl_steps}", "ppo.epochs=100",
           f"ppo.generation_batch_size={hp['answers'] // group}", f"ppo.samples_per_prompt={group}",
           f"ppo.train_batch_size={hp['answers']}", "ppo.generation_batches=1", "ppo.ppo_epochs=1",
           f"ppo.max_answer_len={hp['max_new']}", "ppo.min_answer_len=0", "ppo.temperature=1.0", "ppo.top_k=0",
           "ppo.top_p=1.0", f"ppo.actor_lr={hp['lr']}", f"ppo.warmup_steps={hp['warmup']}", "ppo.scheduler=cosine",
           f"ppo.kl_ctl={hp['kl']}", "ppo.adaptive_kl=false", "ppo.eval_every=0", "ppo.allow_untrained_critic=true"]
    if variant == "rloo":
        out += ["ppo.advantage=rloo"]
    else:
        out += ["ppo.advantage=gae", f"critic.path={deps['critic']}"]
    return out


def run(stage: str, size: W.Size, deps: Dict[str, str], cache: Path, run_dir: Path, variant: str = "ppo") -> Dict:
    from bench.compose import compose
    from rlhf.stages import get_stage

    cfg = compose(COMMON + overrides(stage, size, deps, variant), cache, run_dir)
    summary = get_stage(cfg.stage.name)(cfg)
    out = {"train_time_s": summary["train_time_s"], "samples_per_s": summary["samples_per_s"],
           "steps": summary["steps"], "model_dir": summary["model_dir"]}
    if stage == "rl":
        loop_s = summary["steps"] * W.HP["rl"]["answers"] / max(summary["samples_per_s"], 1e-9)
        out.update(gen_tokens_per_s=summary["gen_tokens_per_s"], generation_time_s=summary["generation_time_s"],
                   update_time_s=summary["train_time_s"], train_time_s=loop_s)
    else:
        out["tokens_per_s"] = summary["tokens_per_s"]
    return out


def quality(stage: str, out: Dict, size: W.Size, cache: Path, deps: Dict[str, str]) -> Dict[str, float]:
    """Our saved model scored by bench.workload.quality (reward models through their value head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out["model_dir"])
    if stage == "rm":
        from rlhf.config import ModelConfig
        from rlhf.models.reward import load_reward_model

        rm = load_reward_model(ModelConfig(name="rm", family="opt", path=out["model_dir"], init="pretrained"),
                               out["model_dir"]).eval()
        return W.quality(stage, lambda ids: float(rm.score(ids, ids.new_ones(ids.shape))), tok, size, cache, "")
    return W.quality(stage, AutoModelForCausalLM.from_pretrained(out["model_dir"]), tok, size, cache, deps.get("actor"))
