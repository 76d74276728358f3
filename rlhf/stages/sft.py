"""Step 1: supervised fine-tuning.

Causal-LM loss on prompt + chosen of the step-1 share of every preference source, plus the
sft_only data whole (optionally on the answer tokens only). Evaluated by perplexity on the eval
split and, on the demo task, by the share of held-out answers (greedy and sampled) that pass the rule.

Steps:
  1. start the run (ranks, seed, tracking);
  2. data: step-1 share, tokenised (cached), seeded distributed loaders;
  3. model: tokenizer, causal LM (dropout, gradient checkpointing, LoRA), DeepSpeed engine;
  4. train with the shared loop, perplexity each epoch (and before training);
  5. save the HF model (LoRA merged), score the demo rule, write summary.json.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist

from rlhf.algos.logprobs import perplexity
from rlhf.eval.rules import heldout_rule_rates
from rlhf.stages import build, common


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.data.blend import build_step_data
    from rlhf.data.collate import SFTCollator
    from rlhf.data.tokenize import tokenize_sft
    from rlhf.engine.trainer import fit

    sec = cfg.sft
    # 1. start
    ctx = common.start(cfg, "sft", run_dir)
    # 2. data
    path = build.model_path(ctx, sec.init_from)
    tokenizer = build.load_tokenizer(ctx, path)
    data_cache = cfg.data.cache_dir or str(ctx.cache_dir / "data")
    data_stats: Dict[str, int] = {}
    train_rows, eval_rows = build_step_data(cfg.data, 1, ctx.cache_dir, int(cfg.seed), data_stats)
    train_ds, train_stats = tokenize_sft(train_rows, tokenizer, sec.max_seq_len, sec.mask_prompt, data_cache,
                                         reload=cfg.data.reload, key="sft.max_seq_len")
    eval_ds, _ = tokenize_sft(eval_rows, tokenizer, sec.max_seq_len, sec.mask_prompt, data_cache,
                              reload=cfg.data.reload)
    collate = SFTCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    loader, eval_loader, spec, n_steps = build.loaders(ctx, sec, "sft", train_ds, eval_ds, collate)
    # 3. model and engine
    model = build.load_policy(ctx, path, disable_dropout=sec.disable_dropout,
                               gradient_checkpointing=sec.gradient_checkpointing)
    engine, n_params, n_trainable = build.train_engine(ctx, model, sec, n_steps)

    def step_fn(batch):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    @torch.no_grad()
    def evaluate() -> Dict[str, float]:
        was = engine.module.training
        engine.eval()
        nll = torch.zeros(2, dtype=torch.float64)
        for batch in eval_loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += torch.tensor([float(out.loss) * n, n], dtype=torch.float64)
        if dist.is_initialized() and ctx.world > 1:
            dist.all_reduce(nll)
        engine.train(was)
        mean = float(nll[0] / max(nll[1], 1))
        return {"loss": mean, "ppl": perplexity(mean)}

    shard = build.shard_fraction(engine.module)
    # 4. train
    ckpt, meta = common.checkpointing(ctx, {"model": engine}, lambda: {"initial_ppl": initial["ppl"]})
    if meta is None:
        initial = evaluate()
        ctx.tracker.log({"eval/ppl_initial": initial["ppl"]}, step=0)
    else:
        initial = {"ppl": meta["extra"]["initial_ppl"]}
    metrics = fit(engine, loader, step_fn, evaluate, spec, ctx.tracker, ckpt, meta and meta["loop"])
    # 5. save, score, summarise
    model_dir = build.export_hf(ctx, engine.module, tokenizer, ctx.run_dir / "model")
    rules = heldout_rule_rates(engine.module, tokenizer, ctx.cfg.data, seed=int(ctx.cfg.seed), device=ctx.device)
    return common.finish(ctx, {
        "stage": "sft", "model_dir": str(model_dir),
        "eval_ppl": metrics["ppl"], "eval_loss": metrics["loss"], "eval_ppl_initial": initial["ppl"],
        "final_train_loss": metrics["final_train_loss"], **rules,
        "steps": metrics["steps"], "samples_per_s": metrics["samples_per_s"],
        "tokens_per_s": metrics["tokens_per_s"], "train_time_s": metrics["train_time_s"],
        "skipped_nonfinite": metrics["skipped_nonfinite"],
        "params": n_params, "trainable_params": n_trainable, "param_shard_fraction": shard,
        "train_rows": len(train_ds), "bad_rows": data_stats["bad_rows"],
        "dropped_rows": train_stats.get("dropped", 0) + data_stats["bad_rows"],
        "objective": rules["rule_rate_sampled"] if rules["rule_rate_sampled"] is not None else -metrics["ppl"],
    })
