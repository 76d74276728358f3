"""Step 2: reward model.

A base transformer with a scalar value head trained with the pairwise ranking loss
``-log sigmoid(r_chosen - r_rejected)`` on the step-2 share of the preference data: over the
tokens where the two answers diverge (DeepSpeed-Chat, ``rm.loss_mode=divergent``) or on the final
scores only (``last``). Scores are read at the last real token of each sequence.

Steps:
  1. start the run (ranks, seed, tracking);
  2. data: step-2 share of pairs, tokenised (identical pairs dropped and counted), loaders;
  3. model: reward model (dropout, gradient checkpointing, LoRA on the base), DeepSpeed engine;
  4. train with the shared loop; accuracy / chosen / rejected / margin on the eval pairs;
  5. save base + value head, write summary.json.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from rlhf.stages import build, common


def pair_scores(model, batch, loss_mode: str):
    """Loss and per-sequence end scores for a [2B, T] chosen-then-rejected batch (right padded)."""
    from rlhf.algos.ranking import divergent_pairwise_loss, pairwise_loss

    ids, mask = batch["input_ids"], batch["attention_mask"]
    values = model(input_ids=ids, attention_mask=mask)  # [2B, T]
    b = ids.shape[0] // 2
    if loss_mode == "divergent":
        # Padding marked by a sentinel id, so a pad id shared with eos/unk cannot end a sequence early.
        marked = ids.masked_fill(mask == 0, -1)
        loss, chosen, rejected = divergent_pairwise_loss(values[:b], values[b:], marked[:b], marked[b:],
                                                         pad_id=-1, prompt_len=batch.get("prompt_len"))
        return loss, chosen, rejected
    if loss_mode != "last":
        raise ValueError(f"rm.loss_mode must be 'divergent' or 'last', got '{loss_mode}'")
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)  # last real token, right padding
    scores = values.gather(1, last.unsqueeze(1)).squeeze(1)
    return pairwise_loss(scores[:b], scores[b:]), scores[:b], scores[b:]


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.algos.ranking import ranking_metrics
    from rlhf.data.blend import build_step_data
    from rlhf.data.collate import PairCollator
    from rlhf.data.tokenize import tokenize_pairs
    from rlhf.engine.setup import all_gather_cat
    from rlhf.engine.trainer import fit
    from rlhf.models.build import load_trainable
    from rlhf.models.reward import save_reward_model

    sec = cfg.rm
    # 1. start
    ctx = common.start(cfg, "rm", run_dir)
    # 2. data
    path = build.model_path(ctx, sec.init_from)
    tokenizer = build.load_tokenizer(ctx, path)
    data_cache = cfg.data.cache_dir or str(ctx.cache_dir / "data")
    data_stats: dict = {}
    train_rows, eval_rows = build_step_data(cfg.data, 2, ctx.cache_dir, int(cfg.seed), data_stats)
    train_ds, train_stats = tokenize_pairs(train_rows, tokenizer, sec.max_seq_len, data_cache, reload=cfg.data.reload,
                                           key="rm.max_seq_len")
    eval_ds, _ = tokenize_pairs(eval_rows, tokenizer, sec.max_seq_len, data_cache, reload=cfg.data.reload)
    # Pairs are right-padded whatever the family pads with: chosen and rejected then share their
    # prompt positions (the divergent loss compares them token by token), and in a causal model
    # padding after the last real token cannot change the score read there.
    collate = PairCollator(tokenizer.pad_token_id, "right")
    loader, eval_loader, spec, n_steps = build.loaders(ctx, sec, "rm", train_ds, eval_ds, collate, rows_per_sample=2)
    # 3. model and engine
    model = load_trainable(cfg.model, path, kind="reward", dtype=ctx.dtype, disable_dropout=sec.disable_dropout,
                           gradient_checkpointing=sec.gradient_checkpointing, lora=cfg.lora)
    engine, n_params, n_trainable = build.train_engine(ctx, model, sec, n_steps)

    def step_fn(batch):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        loss, chosen, rejected = pair_scores(engine, batch, sec.loss_mode)
        return loss, {"acc": float((chosen > rejected).float().mean())}

    @torch.no_grad()
    def evaluate() -> Dict[str, float]:
        was = engine.module.training
        engine.eval()
        chosen, rejected = [], []
        for batch in eval_loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            _, c, r = pair_scores(engine, batch, sec.loss_mode)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        engine.train(was)
        c, r = torch.cat(chosen), torch.cat(rejected)
        c, r = all_gather_cat(c, ctx.device), all_gather_cat(r, ctx.device)
        return {k: float(v) for k, v in ranking_metrics(c, r).items()}

    # 4. train
    ckpt, meta = common.checkpointing(ctx, {"model": engine}, lambda: {"initial_acc": initial["acc"]})
    if meta is None:
        initial = evaluate()
        ctx.tracker.log({f"eval/{k}_initial": v for k, v in initial.items()}, step=0)
    else:
        initial = {"acc": meta["extra"]["initial_acc"]}
    metrics = fit(engine, loader, step_fn, evaluate, spec, ctx.tracker, ckpt, meta and meta["loop"])
    # 5. save and summarise
    model_dir = build.export_hf(ctx, engine.module, tokenizer, ctx.run_dir / "model", save=save_reward_model)
    return common.finish(ctx, {
        "stage": "rm", "model_dir": str(model_dir),
        "acc": metrics["acc"], "chosen_mean": metrics["chosen_mean"], "rejected_mean": metrics["rejected_mean"],
        "margin_mean": metrics["margin_mean"], "acc_initial": initial["acc"],
        **build.loop_summary(metrics, n_params, n_trainable), "train_pairs": len(train_ds),
        "dropped_pairs": train_stats.get("dropped", 0) + data_stats["bad_rows"], "bad_rows": data_stats["bad_rows"], "objective": metrics["acc"],
    })
