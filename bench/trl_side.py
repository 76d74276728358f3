"""TRL's side: SFTTrainer, RewardTrainer, DPOTrainer and RLOOTrainer (its online trainer for step 3)
on the same rows, models, batch sizes, steps, rates and lengths as ours.

Timing: ``Trainer.train()`` from ``on_train_begin`` to ``on_train_end`` (a callback): the training
loop without the trainer's construction (tokenisation, reference copy) and without eval (none is
scheduled). Generation (RLOO): the time inside the model's ``generate`` and the answer tokens it
produced through the first EOS, counted by a wrapper, the same rule as ours.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

import torch

from bench import workload as W


def _args(cls, name: str, steps: int, out_dir: Path, **kw):
    hp = W.HP[name]
    return cls(output_dir=str(out_dir), report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10**6,
               use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=W.SEED, data_seed=W.SEED,
               max_steps=steps, per_device_train_batch_size=hp.get("batch", hp.get("answers")),
               gradient_accumulation_steps=1, learning_rate=hp["lr"], lr_scheduler_type="cosine",
               warmup_steps=hp["warmup"], adam_beta1=hp["betas"][0], adam_beta2=hp["betas"][1], weight_decay=0.0,
               max_grad_norm=1.0, bf16=False, fp16=False, **kw)  # fp32 like ours (TRL defaults to bf16)


def _timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        t0 = t1 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()

    return Timer()


def _count_generation(model, tokenizer, stats: Dict[str, float]) -> None:
    """Wrap ``model.generate``: seconds inside it and answer tokens through the first EOS."""
    inner = model.generate

    def generate(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        stats["s"] += time.perf_counter() - t0
        ids = kw.get("input_ids", a[0] if a else None)
        answer = out[:, ids.shape[1]:] if ids is not None else out
        eos = answer == tokenizer.eos_token_id
        stats["tokens"] += float(((eos.long().cumsum(1) - eos.long()) == 0).sum())
        return out

    model.generate = generate


def run(stage: str, size: W.Size, deps: Dict[str, str], cache: Path, run_dir: Path) -> Dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl

    torch.set_num_threads(W.THREADS)
    timer, gen = _timer(), {"s": 0.0, "tokens": 0.0}
    if stage == "sft":
        path = W.policy_dir(cache)
        train, _ = W.step_rows(cache, 1)
        data = Dataset.from_dict({"prompt": train["prompt"], "completion": train["answer"]})
        model = AutoModelForCausalLM.from_pretrained(path)
        args = _args(trl.SFTConfig, "sft", size.sft_steps, run_dir, max_length=W.HP["sft"]["max_len"],
                     completion_only_loss=False, packing=False)
        trainer_cls, extra = trl.SFTTrainer, {}
    elif stage == "rm":
        path = deps["critic_init"]
        train, _ = W.step_rows(cache, 2)
        data = Dataset.from_dict({k: train[k] for k in ("prompt", "chosen", "rejected")})
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        args = _args(trl.RewardConfig, "rm", size.rm_steps, run_dir, max_length=W.HP["rm"]["max_len"],
                     disable_dropout=True)
        trainer_cls, extra = trl.RewardTrainer, {}
    elif stage == "dpo":
        path = deps["actor"]
        train, _ = W.step_rows(cache, 2)
        data = Dataset.from_dict({k: train[k] for k in ("prompt", "chosen", "rejected")})
        model = AutoModelForCausalLM.from_pretrained(path)
        args = _args(trl.DPOConfig, "dpo", size.dpo_steps, run_dir, max_length=W.HP["dpo"]["max_len"],
                     beta=W.HP["dpo"]["beta"], loss_type="sigmoid", disable_dropout=True,
                     precompute_ref_log_probs=False)
        trainer_cls, extra = trl.DPOTrainer, {}
    else:
        from rlhf.data.demo import reward

        hp = W.HP["rl"]
        path = deps["actor"]
        train, _ = W.step_rows(cache, 3)
        data = Dataset.from_dict({"prompt": train["prompt"]})
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        _count_generation(model, tok, gen)

        def rule(prompts, completions, **_):
            return reward(prompts, completions)

        args = _args(trl.RLOOConfig, "rl", size.rl_steps, run_dir, num_generations=hp["group"],
                     max_completion_length=hp["max_new"], temperature=1.0, top_p=1.0, top_k=0, beta=hp["kl"],
                     num_iterations=1, disable_dropout=True)
        trainer_cls, extra = trl.RLOOTrainer, {"reward_funcs": rule}
    tok = AutoTokenizer.from_pretrained(path)
    if stage == "rm":
        model.config.pad_token_id = tok.pad_token_id
    trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer], **extra)
    trainer.train()
    elapsed = timer.t1 - timer.t0
    steps = trainer.state.global_step
    per_step = W.HP["rl"]["answers"] if stage == "rl" else W.HP[stage]["batch"]
    out = {"train_time_s": elapsed, "steps": steps, "samples_per_s": steps * per_step / max(elapsed, 1e-9)}
    if stage == "rl":
        out.update(gen_tokens_per_s=gen["tokens"] / max(gen["s"], 1e-9), generation_time_s=gen["s"])
    else:
        out["tokens_per_s"] = float(getattr(trainer, "_total_train_tokens", 0)) / max(elapsed, 1e-9) or None
    out["_trainer"] = trainer
    return out


def quality(stage: str, out: Dict, size: W.Size, cache: Path, deps: Dict[str, str]) -> Dict[str, float]:
    """TRL's trained model scored by bench.workload.quality (reward models through their score head)."""
    trainer = out.pop("_trainer")
    model, tok = trainer.model.eval(), trainer.processing_class
    if stage == "rm":
        return W.quality(stage, lambda ids: float(model(input_ids=ids).logits[0, 0]), tok, size, cache, "")
    return W.quality(stage, model, tok, size, cache, deps.get("actor"))
