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

from rlhf.stages import build, common


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.data.blend import build_step_data
    from rlhf.data.collate import SFTCollator
    from rlhf.data.tokenize import tokenize_sft

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
    shard = build.shard_fraction(engine.module)
    # 4. train
    metrics, initial = build.fit_lm(ctx, engine, loader, eval_loader, spec)
    # 5. save, score, summarise
    model_dir = build.export_hf(ctx, engine.module, tokenizer, ctx.run_dir / "model")
    rules = build.heldout_rates(ctx, engine.module, tokenizer)
    return common.finish(ctx, {
        "stage": "sft", "model_dir": str(model_dir),
        "eval_ppl": metrics["ppl"], "eval_loss": metrics["loss"], "eval_ppl_initial": initial["ppl"],
        **rules, **build.loop_summary(metrics, n_params, n_trainable), "param_shard_fraction": shard,
        "train_rows": len(train_ds), "bad_rows": data_stats["bad_rows"],
        "dropped_rows": train_stats.get("dropped", 0) + data_stats["bad_rows"],
        "objective": rules["rule_rate_sampled"] if rules["rule_rate_sampled"] is not None else -metrics["ppl"],
    })
