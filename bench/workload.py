"""The fixed workload both sides train on, and the framework-neutral quality functions.

Models: the embedded tiny OPT (128 hidden x 4 layers) as the policy; a 64 x 2 OPT with the same
tokenizer as the reward model / critic (built here, random weights, fixed seed). Data: the demo
task's step-1/2/3 shares (rlhf.data.blend.build_step_data, seed 1234), the same rows for both sides.
Quality is scored here, from plain transformers models, identically for both sides.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

SEED = 1234
THREADS = 1  # torch intra-op threads, both sides (on a shared 2-core machine 2 threads run ~100x slower: OpenMP waits)


@dataclass(frozen=True)
class Size:
    """Steps per stage and the held-out set; batch sizes, lengths and rates are fixed below."""

    sft_steps: int
    rm_steps: int
    dpo_steps: int
    rl_steps: int
    heldout_prompts: int
    heldout_samples: int


SIZES: Dict[str, Size] = {
    "smoke": Size(sft_steps=6, rm_steps=6, dpo_steps=4, rl_steps=2, heldout_prompts=16, heldout_samples=1),
    "medium": Size(sft_steps=200, rm_steps=200, dpo_steps=80, rl_steps=30, heldout_prompts=16, heldout_samples=1),
    # the table: 1000 steps SFT/RM, 300 DPO, 100 step-3 iterations
    "full": Size(sft_steps=1000, rm_steps=1000, dpo_steps=300, rl_steps=100, heldout_prompts=64, heldout_samples=4),
}

# Hyperparameters shared by both sides (the demo preset's rates, batch sizes of the table).
HP = {
    "sft": {"batch": 8, "lr": 3e-3, "warmup": 10, "max_len": 64, "betas": (0.9, 0.95)},
    "rm": {"batch": 8, "lr": 1e-3, "warmup": 0, "max_len": 64, "betas": (0.9, 0.95)},
    "dpo": {"batch": 8, "lr": 1e-4, "warmup": 0, "max_len": 64, "betas": (0.9, 0.95), "beta": 0.5},
    # step 3: 8 answers per iteration, answers of at most 12 tokens, one update per rollout
    "rl": {"answers": 8, "group": 4, "lr": 1e-4, "warmup": 2, "max_new": 12, "kl": 0.1, "betas": (0.9, 0.95)},
}

CRITIC_ARCH = {"hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 256, "num_hidden_layers": 2,
               "num_attention_heads": 2}


def size_dict(name: str) -> dict:
    return asdict(SIZES[name])


def policy_dir(cache: Path) -> Path:
    """The embedded tiny OPT (128 x 4), built on first use."""
    from rlhf.models.tiny import build_tiny

    return Path(build_tiny("tiny-opt", Path(cache) / "models"))


def critic_dir(cache: Path) -> Path:
    """A 64 x 2 OPT sharing the policy's tokenizer (random weights, seed SEED), built once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = policy_dir(cache)
    out = Path(cache) / "bench" / f"opt-64x2-{src.name}"  # keyed on the policy (its tokenizer's vocabulary)
    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(src)
    for k, v in CRITIC_ARCH.items():
        setattr(config, k, v)
    torch.manual_seed(SEED)
    tmp = out.with_name(out.name + ".tmp")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(out)
    return out


def step_rows(cache: Path, step: int):
    """(train, eval) rows of pipeline step ``step`` on the demo data: what our stages read."""
    from bench.compose import compose
    from rlhf.data.blend import build_step_data

    cfg = compose(["stage=sft"], cache)
    return build_step_data(cfg.data, step, cache, SEED)


# ---------------------------------------------------------------- framework-neutral quality


@torch.no_grad()
def rule_rates(model, tokenizer, n_prompts: int, samples: int, max_new: int = 16) -> Dict[str, float]:
    """Held-out demo prompts (rlhf.data.demo.heldout_prompts): share of greedy answers that pass
    the rule, and of ``samples`` sampled answers (temperature 1, seeded) per prompt."""
    from rlhf.data.demo import heldout_prompts, rule_rate

    prompts = heldout_prompts(n_prompts, seed=SEED)
    model.eval()
    out = {"rule_rate": rule_rate(prompts, _generate(model, tokenizer, prompts, max_new, False))}
    if samples:
        rep = [p for p in prompts for _ in range(samples)]
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            out["rule_rate_sampled"] = rule_rate(rep, _generate(model, tokenizer, rep, max_new, True))
    return out


def _generate(model, tokenizer, prompts: List[str], max_new: int, sample: bool) -> List[str]:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=sample, top_k=None if sample else None,
                             temperature=1.0 if sample else None, top_p=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])


@torch.no_grad()
def pair_accuracy(score: Callable[[torch.Tensor], float], tokenizer, pairs: Sequence[dict]) -> float:
    """Share of held-out pairs whose chosen text scores above the rejected one; ``score`` maps
    one unpadded [1, T] sequence (prompt + answer + eos) to a number (no padding convention involved)."""
    wins = [score(_ids(tokenizer, r["prompt"] + r["chosen"])) > score(_ids(tokenizer, r["prompt"] + r["rejected"]))
            for r in pairs]
    return sum(wins) / max(len(wins), 1)


@torch.no_grad()
def answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """Summed log-prob of the answer tokens (and eos) after ``prompt`` under a causal LM."""
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = _ids(tokenizer, prompt + answer)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    taken = logp.gather(1, ids[0, 1:, None])[:, 0]
    return float(taken[n_prompt - 1:].sum())


def dpo_quality(policy, reference, tokenizer, pairs: Sequence[dict], beta: float) -> Dict[str, float]:
    """Implicit-reward accuracy (beta * (log pi - log ref) of chosen above rejected) and the policy's
    own preference (log-prob accuracy) on held-out pairs."""
    policy.eval()
    reference.eval()
    imp = lp = 0
    for r in pairs:
        pc, pr = (answer_logprob(policy, tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected"))
        rc, rr = (answer_logprob(reference, tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected"))
        imp += beta * (pc - rc) > beta * (pr - rr)
        lp += pc > pr
    n = max(len(pairs), 1)
    return {"implicit_acc": imp / n, "logp_acc": lp / n}


def quality(stage: str, model, tokenizer, size: Size, cache: Path, start_dir: str) -> Dict[str, float]:
    """The stage's quality numbers, the same for both sides. ``model``: for RM a callable scoring one
    [1, T] sequence, else the trained causal LM; ``start_dir``: the model DPO started from (its reference)."""
    if stage == "rm":
        _, pairs = step_rows(cache, 2)
        return {"pair_acc": pair_accuracy(model, tokenizer, pairs)}
    model.eval()
    q = rule_rates(model, tokenizer, size.heldout_prompts, size.heldout_samples)
    if stage == "dpo":
        from transformers import AutoModelForCausalLM

        _, pairs = step_rows(cache, 2)
        q.update(dpo_quality(model, AutoModelForCausalLM.from_pretrained(start_dir), tokenizer, pairs, HP["dpo"]["beta"]))
    return q
