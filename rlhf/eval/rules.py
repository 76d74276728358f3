"""The demo task's rule scored on held-out prompts: the number every demo stage reports."""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from rlhf.models.generate import generate

log = logging.getLogger(__name__)


def uses_demo(data) -> bool:
    """True when a ``data`` group (cfg.data) reads the embedded demo."""
    return any(s.name.startswith("demo") for s in data.sources)


def heldout_rule_rates(module, tokenizer, data, *, seed: int, device, max_new_tokens: int = 16) -> Dict[str, Optional[float]]:
    """The demo task rule on ``data.heldout_prompts`` held-out prompts (both None off the demo):

    - ``rule_rate``: share of prompts whose greedy answer passes (the model's single likeliest
      answer), and ``rule_rate_<task>`` the same per demo task;
    - ``rule_rate_sampled``: share of ``data.heldout_samples`` answers per prompt sampled at
      temperature 1 that pass (the answer distribution RLHF reshapes). Seeded by ``seed`` and run
      under a forked RNG, so it is repeatable and leaves the training RNG untouched.
    """
    if not uses_demo(data):
        return {"rule_rate": None, "rule_rate_sampled": None}
    from rlhf.data.demo import heldout_prompts, rule_rate, task_of

    prompts = heldout_prompts(int(data.heldout_prompts), seed=seed)
    greedy = generate(module, tokenizer, prompts, max_new_tokens=max_new_tokens, device=device)
    out: Dict[str, Optional[float]] = {"rule_rate": float(rule_rate(prompts, greedy)), "rule_rate_sampled": None}
    for task in sorted({task_of(p) for p in prompts}):
        mine = [(p, a) for p, a in zip(prompts, greedy) if task_of(p) == task]
        out[f"rule_rate_{task}"] = float(rule_rate(*zip(*mine)))
    k = int(data.heldout_samples)
    if k > 0:
        repeated = [p for p in prompts for _ in range(k)]
        devices = [device] if torch.device(device).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                sampled = generate(module, tokenizer, repeated, max_new_tokens=max_new_tokens, device=device,
                                   do_sample=True, temperature=1.0)
        except RuntimeError as e:  # non-finite weights (a diverged run): no distribution to sample from
            log.warning("held-out rule rate: sampling failed (%s); rule_rate_sampled left empty", e)
        else:
            out["rule_rate_sampled"] = float(rule_rate(repeated, sampled))
    return out
