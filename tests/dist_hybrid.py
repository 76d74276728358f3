"""Rank worker for tests/test_hybrid.py: ``torchrun --nproc_per_node=2 tests/dist_hybrid.py OUT CACHE``.

Checks the hybrid engine under ZeRO-3 across two ranks and writes what it measured to OUT (JSON):
greedy tokens of each generation path vs a plain un-sharded model, whether a training step after a
rollout equals one without, and generation time of the replica (gather once) vs per-layer paths.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf.config import HardwareConfig, LoraConfig, ModelConfig, ZeroConfig
from rlhf.engine.hybrid import HybridEngine
from rlhf.engine.setup import OptimSpec, build_train_engine, gathered, init_distributed
from rlhf.models.families import get_family
from rlhf.models.load import load_causal_lm, load_tokenizer, resolve_path
from rlhf.models.lora import apply_lora, lora_param_groups

PROMPTS = ["Human: What is 3 plus 4?\n Assistant:", "Human: Is 12 even or odd?\n Assistant:",
           "Human: What number comes after 41?\n Assistant:", "Human: What is 9 plus 9?\n Assistant:"]


def build(path, zero, hw, lora_cfg, family):
    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(name="tiny-opt", family="opt", path=path, init="pretrained"), path)
    if lora_cfg.rank:
        model = apply_lora(model, lora_cfg, family)
    spec = OptimSpec(lr=1e-2, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, scheduler="constant", warmup_steps=0,
                     total_steps=10, micro_batch_size=4, grad_accum=1, grad_clip=1.0)
    return build_train_engine(model, lora_param_groups(model, lora_cfg, 1e-2, 0.0), spec, zero, hw, dist.get_world_size())


def full_params(engine):
    with gathered(engine.module.parameters()):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def train_step(engine, batch):
    loss = engine(**batch, labels=batch["input_ids"]).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def main(out_path: str, cache: str):
    hw = HardwareConfig(name="cpu2", procs_per_node=2)
    init_distributed(hw)
    rank = dist.get_rank()
    family = get_family("opt")
    path = resolve_path(ModelConfig(name="tiny-opt", family="opt", path="tiny-opt", init="tiny"), Path(cache))
    tok = load_tokenizer(path, family)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = tok(["Human: What is 2 plus 3?\n Assistant: The answer is 5."] * 4, return_tensors="pt")
    gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    result = {}

    # plain, un-sharded reference with the same weights
    plain = load_causal_lm(ModelConfig(name="t", family="opt", path=path, init="pretrained"), path).eval()
    expected = plain.generate(**enc, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    zero3 = ZeroConfig(stage=3, stage3_param_persistence_threshold=0)
    for gather in ("once", "per_layer"):
        engine = build(path, zero3, hw, LoraConfig(), family)
        hybrid = HybridEngine(engine, tok, gather=gather)
        hybrid.generate_sequences(enc["input_ids"], enc["attention_mask"], **gen)  # warm-up
        t0 = time.perf_counter()
        rounds = 3
        for _ in range(rounds):
            seq = hybrid.generate_sequences(enc["input_ids"], enc["attention_mask"], **gen)
        result[f"{hybrid.path}_s_per_rollout"] = (time.perf_counter() - t0) / rounds
        result[f"{hybrid.path}_tokens_equal"] = bool(torch.equal(seq, expected))
        result[f"{hybrid.path}_shard_fraction"] = sum(p.ds_tensor.numel() for p in engine.module.parameters()) / \
            sum(p.ds_numel for p in engine.module.parameters())
        # a training step after the rollout equals one on an engine that never generated
        after = (train_step(engine, batch), full_params(engine))
        fresh = build(path, zero3, hw, LoraConfig(), family)
        before = (train_step(fresh, batch), full_params(fresh))
        result[f"{hybrid.path}_step_loss_equal"] = after[0] == before[0]
        result[f"{hybrid.path}_step_params_equal"] = all(torch.equal(after[1][k], before[1][k]) for k in after[1])
        del engine, fresh, hybrid

    # LoRA actor under ZeRO-3: adapters fused into the replica
    lora = LoraConfig(name="r8", rank=8, alpha=16)
    engine = build(path, zero3, hw, lora, family)
    train_step(engine, batch)  # move the adapters away from zero
    hybrid = HybridEngine(engine, tok, gather="once", lora=True)
    seq = hybrid.generate_sequences(enc["input_ids"], enc["attention_mask"], **gen)
    with gathered(engine.module.parameters()):
        engine.module.eval()
        lora_expected = engine.module.generate(**enc, **gen, pad_token_id=tok.pad_token_id,
                                               eos_token_id=tok.eos_token_id)
    result["lora_replica_path"] = hybrid.path
    result["lora_tokens_equal"] = bool(torch.equal(seq, lora_expected))
    if rank == 0:
        Path(out_path).write_text(json.dumps(result, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
