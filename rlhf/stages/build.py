"""What every stage builds and measures the same way: its model path and family, tokenizer,
trainable model, loaders, DeepSpeed engine, the causal-LM fit (SFT, pre-training), the exported HF
directory and the demo's held-out rule rates.

Each helper reads the run's :class:`~rlhf.stages.common.Context` and passes plain values on to
``rlhf.models``, ``rlhf.engine`` and ``rlhf.eval``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch

from rlhf.engine.setup import OptimSpec, barrier, gathered
from rlhf.models.families import Family
from rlhf.stages.common import Context

log = logging.getLogger(__name__)


def model_path(ctx: Context, init_from: Optional[str], model_cfg=None) -> str:
    """The checkpoint a stage starts from: ``<stage>.init_from`` if set, else the path of
    ``model_cfg`` (default ``cfg.model``; DPO passes ``cfg.actor``)."""
    from rlhf.models.load import resolve_path

    if init_from:
        p = Path(init_from)
        if not p.exists():
            raise FileNotFoundError(f"init_from={init_from}: no such directory")
        return str(p)
    return resolve_path(model_cfg or ctx.cfg.model, ctx.cache_dir)


def family(ctx: Context, path: str, model_cfg=None) -> Family:
    """The family of the checkpoint at ``path`` (from its config.json; see ``resolve_family``)."""
    from rlhf.models.load import resolve_family

    return resolve_family(model_cfg or ctx.cfg.model, path)


def load_tokenizer(ctx: Context, path: str, model_cfg=None):
    from rlhf.models.load import config_key
    from rlhf.models.load import load_tokenizer as _load

    model_cfg = model_cfg or ctx.cfg.model
    return _load(path, family(ctx, path, model_cfg), trust_remote_code=model_cfg.trust_remote_code,
                 key=config_key(model_cfg))


def load_policy(ctx: Context, path: str, *, disable_dropout: bool, gradient_checkpointing: bool,
                lora: bool = True, model_cfg=None):
    """A causal LM ready to train (``rlhf.models.build.load_trainable``) with the run's dtype and
    ``lora.*``. ``model_cfg`` defaults to ``cfg.model`` (DPO passes ``cfg.actor``)."""
    from rlhf.models.build import load_trainable

    return load_trainable(model_cfg or ctx.cfg.model, path, dtype=ctx.dtype, disable_dropout=disable_dropout,
                          gradient_checkpointing=gradient_checkpointing, lora=ctx.cfg.lora if lora else None)


def optim_spec(section, total_steps: int, world: int) -> OptimSpec:
    return OptimSpec(lr=section.lr, weight_decay=section.weight_decay, betas=list(section.betas),
                     eps=section.eps, scheduler=section.scheduler, warmup_steps=section.warmup_steps,
                     total_steps=total_steps, micro_batch_size=section.micro_batch_size,
                     grad_accum=section.grad_accum, grad_clip=section.grad_clip)


def param_groups(ctx: Context, model, lr: float, weight_decay: float) -> List[dict]:
    from rlhf.models.lora import lora_param_groups

    return lora_param_groups(model, ctx.cfg.lora, lr, weight_decay)


def loaders(ctx: Context, section, name: str, train_ds, eval_ds, collate, rows_per_sample: int = 1):
    """Seeded distributed loaders for a stage's train/eval data, the loop spec and its step count.
    ``rows_per_sample``: 2 for preference pairs, so samples/s counts pairs (the field's convention)."""
    from rlhf.engine.trainer import LoopSpec, make_loader, total_steps

    seed = int(ctx.cfg.seed)
    loader = make_loader(train_ds, section.micro_batch_size, collate, ctx.rank, ctx.world, seed)
    eval_loader = make_loader(eval_ds, section.eval_batch_size, collate, ctx.rank, ctx.world, seed, shuffle=False)
    spec = LoopSpec(section.epochs, section.max_steps, section.eval_every, section.log_every,
                    section.skip_nonfinite, section.grad_accum, rows_per_sample)
    return loader, eval_loader, spec, total_steps(len(loader), spec, name)


def train_engine(ctx: Context, model, section, n_steps: int):
    """DeepSpeed training engine for a stage's model with its section's optimiser settings.
    Returns (engine, total params, trainable params)."""
    from rlhf.engine.setup import build_train_engine
    from rlhf.models.load import count_params

    n_params, n_trainable = count_params(model)
    groups = param_groups(ctx, model, section.lr, section.weight_decay)
    engine = build_train_engine(model, groups, optim_spec(section, n_steps, ctx.world), ctx.cfg.zero,
                                ctx.cfg.hardware, ctx.world)
    return engine, n_params, n_trainable


def export_hf(ctx: Context, module, tokenizer, out_dir: Path, save=None) -> Path:
    """Save the full model (LoRA merged, ZeRO-3 gathered) as an HF directory on rank 0.

    ``save(module, tokenizer, out_dir)`` defaults to ``save_hf`` (causal LMs); reward models pass
    ``save_reward_model``.
    """
    from rlhf.models.load import save_hf

    with gathered(module.parameters()):
        if ctx.is_main:
            (save or save_hf)(module, tokenizer, out_dir)
    barrier()
    return out_dir


def scale_from_start(module, model_cfg, start_path: str, scale: float, key: str) -> None:
    """``module`` (the trained policy) moved in place to ``start + scale * (trained - start)``
    (``rlhf.models.load.scale_delta``), the start loaded from ``start_path`` the way the stage loaded
    it (``model_cfg``'s loader: family, key names, tied weights); with LoRA on a frozen base nothing is
    loaded (the adapters start at zero). ``key`` is the config key that set
    ``scale``; a no-op at 1.0. Rank 0 alone loads the start (on the CPU) and computes: under ZeRO-3
    inside one gather whose result is kept from rank 0, otherwise broadcast from rank 0 tensor by
    tensor. The training checkpoints keep the trained weights."""
    if scale == 1.0:
        return
    import torch.distributed as dist

    from rlhf.models.load import effective_init, load_causal_lm, scale_delta

    if effective_init(model_cfg, start_path) == "random":
        raise ValueError(f"{key}={scale} needs the start's weights, but {start_path} is built with random weights "
                         f"(init=random): leave {key}=1.0")
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = list(module.parameters())
    # LoRA on a frozen base: only the adapters moved, and their start (B = 0) needs no checkpoint
    base_trained = any(p.requires_grad and ".lora_" not in name for name, p in module.named_parameters())
    with gathered(params, modifier_rank=0):
        if rank == 0:
            start = (load_causal_lm(model_cfg, start_path, dtype=params[0].dtype, init="pretrained")
                     if base_trained else torch.nn.Module())
            n = scale_delta(module, dict(start.named_parameters()).get, scale)
            del start
            log.info("%s=%g: the model keeps %g x its trained change over %s (%d tensors)", key, scale, scale,
                     start_path, n)
    if dist.is_initialized() and dist.get_world_size() > 1 and not any(hasattr(p, "ds_id") for p in params):
        for p in params:  # replicated weights (ZeRO 0-2): every rank takes rank 0's
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def shard_fraction(module) -> float:
    """Share of the model's parameter elements this rank holds (1.0 unless ZeRO-3 partitions)."""
    local = total = 0
    for p in module.parameters():
        full = getattr(p, "ds_numel", None) or p.numel()
        total += full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
    return local / max(total, 1)


def fit_lm(ctx: Context, engine, loader, eval_loader, spec):
    """Train a causal LM on (input_ids, attention_mask, labels) batches with ``fit`` (SFT and
    incremental pre-training): the step is the model's own loss; eval is the token-weighted
    held-out NLL (labels -100 excluded) and its perplexity; the perplexity before training is
    measured once and kept across a resume. Returns (fit's metrics, the initial eval)."""
    import torch.distributed as dist

    from rlhf.algos.logprobs import perplexity
    from rlhf.engine.trainer import fit
    from rlhf.stages.common import checkpointing

    def step_fn(batch):
        return engine(**{k: v.to(ctx.device) for k, v in batch.items()}).loss, {}

    @torch.no_grad()
    def evaluate():
        was = engine.module.training
        engine.eval()
        nll = torch.zeros(2, dtype=torch.float64)
        for batch in eval_loader:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += torch.tensor([float(engine(**batch).loss) * n, n], dtype=torch.float64)
        if dist.is_initialized() and ctx.world > 1:
            dist.all_reduce(nll)
        engine.train(was)
        mean = float(nll[0] / max(nll[1], 1))
        return {"loss": mean, "ppl": perplexity(mean)}

    ckpt, meta = checkpointing(ctx, {"model": engine}, lambda: {"initial_ppl": initial["ppl"]})
    if meta is None:
        initial = evaluate()
        ctx.tracker.log({"eval/ppl_initial": initial["ppl"]}, step=0)
    else:
        initial = {"ppl": meta["extra"]["initial_ppl"]}
    return fit(engine, loader, step_fn, evaluate, spec, ctx.tracker, ckpt, meta and meta["loop"]), initial


LOOP_FIELDS = ("final_train_loss", "steps", "samples_per_s", "tokens_per_s", "train_time_s", "skipped_nonfinite")


def loop_summary(metrics, n_params: int, n_trainable: int) -> dict:
    """The summary fields every stage trained by ``rlhf.engine.trainer.fit`` reports alike: the
    loop's (``LOOP_FIELDS`` of fit's result) and the engine's parameter counts."""
    return {**{k: metrics[k] for k in LOOP_FIELDS}, "params": n_params, "trainable_params": n_trainable}


def heldout_rates(ctx: Context, module, tokenizer):
    """The demo rule on held-out prompts for the model being trained (``rlhf.eval.rules``)."""
    from rlhf.eval.rules import heldout_rule_rates

    return heldout_rule_rates(module, tokenizer, ctx.cfg.data, seed=int(ctx.cfg.seed), device=ctx.device)
