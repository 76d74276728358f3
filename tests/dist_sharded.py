"""Rank worker for tests/test_sharded.py: ``torchrun --nproc_per_node=2 tests/dist_sharded.py MODE OUT CACHE``.

MODE ``rss-plain`` | ``rss-sharded``: build a random-init OPT-125M-shaped model (fp32, ~0.5 GB) plainly or
inside ``sharded_loading`` (ZeRO-3, deepspeed.zero.Init) and report the rise of this rank's peak RSS.
MODE ``pretrained``: load the tiny model from disk sharded; gathered weights must equal the file's, and
a ZeRO-3 engine must train on it. MODE ``zeropp``: one training step per ZeRO++ switch under ZeRO-3,
recording what DeepSpeed refuses on CPU ranks.
"""
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf.config import HardwareConfig, ModelConfig, ZeroConfig
from rlhf.engine.setup import OptimSpec, build_train_engine, gathered, init_distributed, sharded_loading
from rlhf.models.load import load_causal_lm, resolve_path

OPT_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, vocab_size=50272,
                max_position_embeddings=2048)
SPEC = OptimSpec(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8, scheduler="constant", warmup_steps=0,
                 total_steps=10, micro_batch_size=2, grad_accum=1, grad_clip=1.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def rss_mb() -> float:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def rss(sharded: bool, hw, zero, path) -> dict:
    cfg = ModelConfig(name="opt-125m", family="opt", path="facebook/opt-125m", init="random", arch=OPT_125M)
    with sharded_loading(zero, hw, dist.get_world_size(), stage=3 if sharded else 0):
        load_causal_lm(ModelConfig(name="tiny-opt", family="opt", path=path, init="random"), path)  # warm-up
    dist.barrier()
    before, kept_before = peak_rss_mb(), rss_mb()
    with sharded_loading(zero, hw, dist.get_world_size(), stage=3 if sharded else 0):
        model = load_causal_lm(cfg, cfg.path)
    kept = rss_mb() - kept_before
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
    return {"peak_rss_rise_mb": peak_rss_mb() - before, "kept_rss_rise_mb": kept, "local_fraction": local / full,
            "params": full}


def train_steps(model, zero, hw, n: int) -> list:
    """``n`` optimizer steps of a ZeRO engine on a fixed batch; the losses."""
    engine = build_train_engine(model, [{"params": list(model.parameters())}], SPEC, zero, hw, dist.get_world_size())
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(n):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def pretrained(path, hw, zero) -> dict:
    from safetensors.torch import load_file

    cfg = ModelConfig(name="tiny-opt", family="opt", path=path, init="pretrained")
    with sharded_loading(zero, hw, dist.get_world_size()):
        model = load_causal_lm(cfg, path)
    sharded = all(hasattr(p, "ds_id") for p in model.parameters())
    files = {}
    for f in Path(path).glob("*.safetensors"):
        files.update(load_file(str(f)))
    with gathered(model.parameters()):
        equal = all(torch.equal(p.detach().cpu(), files[n]) for n, p in model.named_parameters() if n in files)
        checked = sum(1 for n, _ in model.named_parameters() if n in files)
    return {"sharded": sharded, "weights_equal": equal, "checked": checked, "losses": train_steps(model, zero, hw, 3)}


def scale(path, hw, zero) -> dict:
    """ppo/dpo.delta_scale on two ranks: three steps, then the engine's module moved halfway back to
    the checkpoint it was loaded from. Under ZeRO-3 rank 0 computes inside one gather; with
    replicated weights (ZeRO 0-2) rank 0 computes and broadcasts. Every rank reports how far its
    weights are from start + 0.5 x (trained - start) (ZeRO-3: the gathered ones, on rank 0)."""
    from rlhf.engine.setup import full_state_dict
    from rlhf.stages.build import scale_from_start

    cfg = ModelConfig(name="tiny-opt", family="opt", path=path, init="pretrained")
    with sharded_loading(zero, hw, dist.get_world_size()):
        model = load_causal_lm(cfg, path)
    z3 = all(hasattr(p, "ds_id") for p in model.parameters())

    def state():
        return full_state_dict(model) if z3 else {k: v.detach().clone() for k, v in model.state_dict().items()}

    train_steps(model, zero, hw, 3)
    trained = state()
    scale_from_start(model, cfg, path, 0.5, "ppo.delta_scale")
    scaled = state()
    local = (sum(p.ds_tensor.numel() for p in model.parameters()) / sum(p.ds_numel for p in model.parameters())
             if z3 else 1.0)
    if trained is None:  # ZeRO-3, rank 1: the partitions it holds, nothing to compare
        return {"local_fraction": local}
    start = load_causal_lm(cfg, path).state_dict()
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    err = max(float((scaled[k] - (start[k] + 0.5 * (trained[k] - start[k]))).abs().max()) for k in start)
    return {"local_fraction": local, "checked": len(start), "moved": moved, "max_err": err}


def zeropp(path, hw) -> dict:
    out = {}
    cfg = ModelConfig(name="tiny-opt", family="opt", path=path, init="pretrained")
    for name, changes in [("hpz", dict(zero_hpz_partition_size=2)), ("quantized_weights", dict(zero_quantized_weights=True)),
                          ("quantized_gradients", dict(zero_quantized_gradients=True)),
                          ("quantized_nontrainable", dict(zero_quantized_nontrainable_weights=True))]:
        zero = ZeroConfig(stage=3, stage3_param_persistence_threshold=0, **changes)
        try:
            with sharded_loading(zero, hw, dist.get_world_size()):
                model = load_causal_lm(cfg, path)
            out[name] = {"ok": True, "losses": train_steps(model, zero, hw, 2)}
        except Exception as err:  # what DeepSpeed cannot do on CPU ranks, reported by the test
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
        dist.barrier()
    return out


def main(mode: str, out_path: str, cache: str):
    hw = HardwareConfig(name="cpu2", procs_per_node=2)
    init_distributed(hw)
    zero = ZeroConfig(stage=3, stage3_param_persistence_threshold=0)
    path = resolve_path(ModelConfig(name="tiny-opt", family="opt", path="tiny-opt", init="tiny"), Path(cache))
    if mode.startswith("rss"):
        result = rss(mode == "rss-sharded", hw, zero, path)
    elif mode == "pretrained":
        result = pretrained(path, hw, zero)
    elif mode.startswith("scale"):  # scale: ZeRO-3; scale-z2: ZeRO-2 (replicated weights)
        result = scale(path, hw, zero if mode == "scale" else ZeroConfig(stage=2))
    else:
        result = zeropp(path, hw)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()  # the process group's threads joined before the interpreter exits


if __name__ == "__main__":
    main(*sys.argv[1:4])
