"""DPO: direct preference optimisation, in place of steps 2 + 3 (no reward model, no PPO).

The policy (``cfg.actor``, usually a step-1 output: ``actor.path=<sft run>/model``) is trained on
the step-2 share of the preference pairs, the share a reward model would have been trained on
(data_split 2,4,4: DPO replaces the reward model's step and learns from the same pairs). The loss
(``dpo.loss``: a key of ``DPO_LOSSES``) compares summed answer-token log-probs of chosen and
rejected under the policy and under a frozen reference, the starting policy, which is:

- ``precomputed``: ``dpo.precompute_ref=true``: its log-probs over the train and eval pairs are
  computed once before training, kept as dataset columns; no reference model in memory;
- ``adapters-disabled``: with LoRA (``lora.rank>0``), the policy itself under
  ``disable_adapter()``; the base weights are frozen (only adapters train), so no second copy;
- ``copy``: otherwise a frozen copy of the starting policy (sharded under ZeRO-3).

Steps:
  1. start the run (ranks, seed, tracking);
  2. data: step-2 share of pairs, tokenised, a row index per pair, loaders;
  3. model: policy (dropout, gradient checkpointing, LoRA), DeepSpeed engine; the reference;
  4. train with the shared loop; loss / rewards / margin / accuracies on the eval pairs;
  5. save the HF policy (LoRA merged), demo rule rate before/after, write summary.json.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict

import torch
import torch.distributed as dist

from rlhf.algos.logprobs import answer_mask, sequence_logprobs
from rlhf.data.collate import PairCollator
from rlhf.engine.setup import all_gather_cat
from rlhf.stages import build, common

log = logging.getLogger(__name__)


class DPOCollator(PairCollator):
    """PairCollator batches plus ``idx`` [B] (row ids) and, once precomputed, the reference
    log-probs ``ref_chosen`` / ``ref_rejected`` [B] of each pair (they travel with their row)."""

    def __call__(self, rows):
        out = super().__call__(rows)
        out["idx"] = torch.as_tensor([int(r["idx"]) for r in rows], dtype=torch.long)
        for key in ("ref_chosen", "ref_rejected"):
            if key in rows[0]:
                out[key] = torch.as_tensor([r[key] for r in rows], dtype=torch.float32)
        return out


def answer_logprobs(model, batch) -> torch.Tensor:
    """Summed log-probs [2B] of the answer tokens (chosen rows first) of a [2B, T] pair batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    return sequence_logprobs(logits, ids, answer_mask(mask, batch["prompt_len"].repeat(2)))


# ---------------------------------------------------------------- the reference policy


class FrozenCopy:
    """A frozen copy of the starting policy (sharded like the policy under ZeRO-3)."""

    name = "copy"

    def __init__(self, engine, params: int):
        self.engine, self.params = engine, params

    @torch.no_grad()
    def logprobs(self, batch) -> torch.Tensor:
        return answer_logprobs(self.engine, batch)


class AdaptersDisabled:
    """With LoRA the policy's frozen base is the reference: the policy itself with its adapters
    switched off (no second copy). Only adapters may train, or the reference would move."""

    name, params = "adapters-disabled", 0

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def freeze_base(model, only_optimize_lora: bool) -> None:
        if not only_optimize_lora:
            log.warning("dpo with LoRA trains the adapters only (the adapters-disabled model is the reference)")
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)

    @torch.no_grad()
    def logprobs(self, batch) -> torch.Tensor:
        was = self.engine.module.training
        self.engine.eval()
        with self.engine.module.disable_adapter():
            out = answer_logprobs(self.engine, batch)
        self.engine.train(was)
        return out


class Precomputed:
    """The starting policy's log-probs of every pair, computed once before training and kept as
    dataset columns (``ref_chosen``, ``ref_rejected``) that travel with their rows: no reference model."""

    name, params = "precomputed", 0

    def prepare(self, datasets, loader_of, engine, ctx) -> None:
        was = engine.module.training
        engine.eval()
        for split, ds in datasets.items():
            ref = _by_row(loader_of(ds, shuffle=False), lambda batch: answer_logprobs(engine, batch), len(ds), ctx)
            datasets[split] = ds.add_column("ref_chosen", ref[:, 0].tolist()).add_column("ref_rejected",
                                                                                        ref[:, 1].tolist())
        engine.train(was)

    def logprobs(self, batch) -> torch.Tensor:
        return torch.cat([batch["ref_chosen"], batch["ref_rejected"]])


def reference_mode(sec, lora) -> str:
    return "precomputed" if sec.precompute_ref else "adapters-disabled" if lora.rank > 0 else "copy"


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.algos.dpo import chosen_nll, dpo_loss
    from rlhf.data.blend import build_step_data
    from rlhf.data.tokenize import tokenize_pairs
    from rlhf.engine.setup import build_eval_engine
    from rlhf.engine.trainer import LoopSpec, fit, make_loader, total_steps
    from rlhf.models.load import count_params

    sec, actor = cfg.dpo, cfg.actor
    # 1. start
    ctx = common.start(cfg, "dpo", run_dir)
    # 2. data (step 2's share: the pairs the reward model would have used), a row index per pair
    path = build.model_path(ctx, sec.init_from, model_cfg=actor)
    tokenizer = build.load_tokenizer(ctx, path, model_cfg=actor)
    data_cache = cfg.data.cache_dir or str(ctx.cache_dir / "data")
    data_stats: dict = {}
    train_rows, eval_rows = build_step_data(cfg.data, 2, ctx.cache_dir, int(cfg.seed), data_stats)
    train_ds, train_stats = tokenize_pairs(train_rows, tokenizer, sec.max_seq_len, data_cache, reload=cfg.data.reload,
                                           key="dpo.max_seq_len")
    eval_ds, _ = tokenize_pairs(eval_rows, tokenizer, sec.max_seq_len, data_cache, reload=cfg.data.reload)
    datasets = {split: ds.add_column("idx", list(range(len(ds)))) for split, ds in (("train", train_ds),
                                                                                  ("eval", eval_ds))}
    collate = DPOCollator(tokenizer.pad_token_id, tokenizer.padding_side)

    def loader_of(ds, shuffle=True):
        size = sec.micro_batch_size if shuffle else sec.eval_batch_size
        return make_loader(ds, size, collate, ctx.rank, ctx.world, int(cfg.seed), shuffle=shuffle)

    spec = LoopSpec(sec.epochs, sec.max_steps, sec.eval_every, sec.log_every, sec.skip_nonfinite, sec.grad_accum,
                    rows_per_sample=2)  # samples/s counts pairs
    n_steps = total_steps(len(loader_of(datasets["train"])), spec)
    # 3. policy, engine and the reference
    mode = reference_mode(sec, cfg.lora)
    model = build.load_policy(ctx, path, disable_dropout=sec.disable_dropout,
                               gradient_checkpointing=sec.gradient_checkpointing, model_cfg=actor)
    if mode == "adapters-disabled":
        AdaptersDisabled.freeze_base(model, cfg.lora.only_optimize_lora)
    engine, n_params, n_trainable = build.train_engine(ctx, model, sec, n_steps)
    if mode == "copy":
        ref_model = build.load_policy(ctx, path, disable_dropout=True, gradient_checkpointing=False, lora=False,
                                       model_cfg=actor)
        reference = FrozenCopy(build_eval_engine(ref_model, cfg.zero, cfg.hardware, ctx.world, stage=cfg.zero.stage,
                                                 offload=cfg.zero.offload_param, micro_batch_size=sec.micro_batch_size),
                               count_params(ref_model)[0])
    elif mode == "adapters-disabled":
        reference = AdaptersDisabled(engine)
    else:
        reference = Precomputed()
        reference.prepare(datasets, loader_of, engine, ctx)
    loader, eval_loader = loader_of(datasets["train"]), loader_of(datasets["eval"], shuffle=False)

    def step_fn(batch):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        b = batch["prompt_len"].shape[0]
        logp, ref = answer_logprobs(engine, batch), reference.logprobs(batch)
        loss, stats = dpo_loss(sec.loss, logp[:b], logp[b:], ref[:b], ref[b:], sec.beta, sec.label_smoothing)
        if sec.sft_weight:  # RPO: keep the chosen answers likely
            tokens = answer_mask(batch["attention_mask"][:b], batch["prompt_len"])[:, 1:].sum(1)
            nll = chosen_nll(logp[:b], tokens)
            loss, stats["chosen_nll"] = loss + sec.sft_weight * nll, nll.detach()
        return loss, {k: float(v) for k, v in stats.items()}

    @torch.no_grad()
    def evaluate() -> Dict[str, float]:
        was = engine.module.training
        engine.eval()
        n = len(datasets["eval"])
        logp = _by_row(eval_loader, lambda batch: answer_logprobs(engine, batch), n, ctx)  # [N, 2]
        ref = _by_row(eval_loader, reference.logprobs, n, ctx)
        engine.train(was)
        loss, stats = dpo_loss(sec.loss, logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], sec.beta, sec.label_smoothing)
        # the policy's own preference (logp chosen > rejected): unlike the implicit-reward accuracy
        # (0 at the start, where policy == reference) it is also defined for the starting model
        return {"loss": float(loss), **{k: float(v) for k, v in stats.items()},
                "logp_accuracy": float((logp[:, 0] > logp[:, 1]).float().mean())}

    # 4. train (a resumed run restores the engine here, after the reference was taken from the start)
    ckpt, meta = common.checkpointing(ctx, {"model": engine}, lambda: {"initial": initial})
    if meta is None:
        initial = {**evaluate(), **build.heldout_rates(ctx, engine.module, tokenizer)}
        ctx.tracker.log({f"eval/{k}_initial": v for k, v in initial.items() if v is not None}, step=0)
    else:
        initial = meta["extra"]["initial"]
    engine.train()  # from_pretrained returns eval mode: without this, dropout (if kept) never acts
    metrics = fit(engine, loader, step_fn, evaluate, spec, ctx.tracker, ckpt, meta and meta["loop"])
    # 5. the exported model (dpo.delta_scale of the trained change): save, score, summarise
    trained = build.heldout_rates(ctx, engine.module, tokenizer) if sec.delta_scale != 1.0 else None
    build.scale_from_start(engine.module, actor, path, sec.delta_scale, "dpo.delta_scale")
    model_dir = build.export_hf(ctx, engine.module, tokenizer, ctx.run_dir / "model")
    rules = build.heldout_rates(ctx, engine.module, tokenizer)
    trained = trained or rules
    return common.finish(ctx, {
        "stage": "dpo", "model_dir": str(model_dir), "reference": reference.name, "reference_params": reference.params,
        "loss": metrics["loss"], "acc": metrics["accuracy"], "chosen_reward": metrics["chosen_reward"],
        "rejected_reward": metrics["rejected_reward"], "margin": metrics["margin"],
        "logp_accuracy": metrics["logp_accuracy"], "logp_accuracy_initial": initial["logp_accuracy"],
        **rules, "rule_rate_initial": initial["rule_rate"], "delta_scale": sec.delta_scale,
        "rule_rate_trained": trained["rule_rate"], "rule_rate_sampled_trained": trained["rule_rate_sampled"],
        "rule_rate_sampled_initial": initial.get("rule_rate_sampled"),
        **build.loop_summary(metrics, n_params, n_trainable), "train_pairs": len(datasets["train"]),
        "dropped_pairs": train_stats.get("dropped", 0) + data_stats["bad_rows"], "bad_rows": data_stats["bad_rows"],
        "objective": rules["rule_rate_sampled"] if rules["rule_rate_sampled"] is not None else metrics["accuracy"],
    })


@torch.no_grad()
def _by_row(loader, score: Callable, n: int, ctx) -> torch.Tensor:
    """[n, 2] (chosen, rejected) of ``score(batch) -> [2B]`` over a sharded, unshuffled loader of n
    rows: every rank scores its shard, the results are gathered and put in row order by ``idx``
    (a row the sampler repeats to even out the shards counts once)."""
    idx, vals = [], []
    for batch in loader:
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        idx.append(batch["idx"].cpu())
        vals.append(score(batch).view(2, -1).T.float().cpu())
    idx, vals = torch.cat(idx), torch.cat(vals)
    if dist.is_initialized() and ctx.world > 1:
        idx, vals = all_gather_cat(idx, ctx.device), all_gather_cat(vals, ctx.device)
    table = torch.full((n, 2), float("nan"))
    table[idx] = vals
    if torch.isnan(table).any():
        raise RuntimeError("some pairs were not scored: the loader must cover every row")
    return table
