"""Incremental pre-training: causal-LM loss on raw text packed into fixed-size blocks.

Documents (``pretrain.data``: .txt, .jsonl, a directory or a hub id; default ``data.unsupervised``,
else the demo corpus) are joined with EOS and cut into ``pretrain.block_size`` blocks, so no
token is padding. A seeded share of the documents is held out and scored by perplexity.

Steps:
  1. start the run (ranks, seed, tracking);
  2. data: documents, held-out split, packed blocks, seeded distributed loaders;
  3. model: tokenizer, causal LM (dropout, gradient checkpointing, LoRA), DeepSpeed engine;
  4. train with the shared loop, held-out perplexity before training and at each eval;
  5. save the HF model (LoRA merged), write summary.json (tokens/s among it).
"""
from __future__ import annotations

from typing import Any, Dict

from rlhf.eval.rules import uses_demo
from rlhf.stages import build, common


def corpus_path(ctx: common.Context) -> str:
    """``pretrain.data``, else ``data.unsupervised``, else the demo task's raw-text corpus."""
    from rlhf.data.demo import default_root, make_demo

    sec = ctx.cfg.pretrain
    if sec.data:
        return str(sec.data)
    if ctx.cfg.data.unsupervised:
        return str(ctx.cfg.data.unsupervised)
    if not uses_demo(ctx.cfg.data):
        raise ValueError("stage=pretrain needs text: set pretrain.data=<.txt|.jsonl|dir|hub id> (or data.unsupervised)")
    size = int(ctx.cfg.data.demo_size)
    # the demo files every stage reads (their fixed seed): one cache folder holds one version of them,
    # so runs with other seeds sharing the cache never rewrite a folder another run is reading
    return str(make_demo(default_root(ctx.cache_dir, size), size=size)["pretrain"])


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.data.text import PackedCollator, load_documents, pack, split_documents

    sec = cfg.pretrain
    # 1. start
    ctx = common.start(cfg, "pretrain", run_dir)
    # 2. data
    path = build.model_path(ctx, sec.init_from)
    tokenizer = build.load_tokenizer(ctx, path)
    source = corpus_path(ctx)
    train_docs, eval_docs = split_documents(load_documents(source, sec.text_field), sec.eval_share, int(cfg.seed))
    train_ds, train_stats = pack(train_docs, tokenizer, sec.block_size)
    eval_ds, eval_stats = pack(eval_docs, tokenizer, min(sec.block_size, _eval_block(eval_docs, tokenizer, sec.block_size)))
    loader, eval_loader, spec, n_steps = build.loaders(ctx, sec, "pretrain", train_ds, eval_ds, PackedCollator())
    # 3. model and engine
    model = build.load_policy(ctx, path, disable_dropout=sec.disable_dropout,
                               gradient_checkpointing=sec.gradient_checkpointing)
    engine, n_params, n_trainable = build.train_engine(ctx, model, sec, n_steps)

    # 4. train
    metrics, initial = build.fit_lm(ctx, engine, loader, eval_loader, spec)
    # 5. save and summarise
    model_dir = build.export_hf(ctx, engine.module, tokenizer, ctx.run_dir / "model")
    return common.finish(ctx, {
        "stage": "pretrain", "model_dir": str(model_dir), "data": source,
        "eval_ppl": metrics["ppl"], "eval_loss": metrics["loss"], "eval_ppl_initial": initial["ppl"],
        **build.loop_summary(metrics, n_params, n_trainable),
        "block_size": sec.block_size, "train_blocks": train_stats["blocks"], "train_tokens": train_stats["tokens"],
        "train_documents": train_stats["documents"], "dropped_tail_tokens": train_stats["dropped_tokens"],
        "eval_blocks": eval_stats["blocks"], "eval_documents": eval_stats["documents"],
        "objective": -metrics["ppl"],
    })


def _eval_block(docs, tokenizer, block_size: int) -> int:
    """Held-out blocks are ``block_size`` long unless the held-out text is shorter than one
    block (a tiny corpus): then one block holding all of it."""
    n = sum(len(x) + 1 for x in tokenizer(list(docs["text"]), add_special_tokens=False)["input_ids"])
    return block_size if n >= block_size else max(2, n)
