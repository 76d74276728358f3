"""Reward functions: Python callables that score answers beside, or instead of, a reward model.

``reward.fn=<module>:<function>`` names a callable ``fn(prompts, answers) -> scores`` (lists of
strings in, one finite number per answer out), e.g. ``rlhf.data.demo:reward`` (the demo's task
rule: 1 pass, 0 fail). In step 3 the answer's score is ``RM score (ppo.reward_model=true) +
reward.fn_weight * fn score``.

A function that raises, returns the wrong number of scores, or a non-finite score stops the run
with a :class:`RewardFunctionError` naming the function and the prompt concerned.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned unusable scores (the message names it and the prompt)."""


@dataclass(frozen=True)
class RewardFunction:
    """A loaded ``reward.fn``: ``name`` is its ``module:function`` spec, ``weight`` its factor."""

    name: str
    fn: Callable[[List[str], List[str]], Sequence[float]]
    weight: float = 1.0

    def __call__(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Scores [B] (float32) of the answers, checked: see the module docstring."""
        prompts, answers = list(prompts), list(answers)
        try:
            out = self.fn(prompts, answers)
            scores = [float(v) for v in out]
        except Exception as e:  # find the prompt it fails on, one answer at a time
            raise RewardFunctionError(f"reward.fn={self.name} failed{self._culprit(prompts, answers)}: "
                                      f"{type(e).__name__}: {e}") from e
        if len(scores) != len(prompts):
            raise RewardFunctionError(f"reward.fn={self.name} returned {len(scores)} scores for "
                                      f"{len(prompts)} answers (first prompt {prompts[0]!r} if any)")
        for p, a, v in zip(prompts, answers, scores):
            if not math.isfinite(v):
                raise RewardFunctionError(f"reward.fn={self.name} returned {v} for prompt {p!r} "
                                          f"(answer {a!r}): scores must be finite")
        return torch.tensor(scores, dtype=torch.float32)

    def _culprit(self, prompts: List[str], answers: List[str]) -> str:
        for p, a in zip(prompts, answers):
            try:
                [float(v) for v in self.fn([p], [a])]
            except Exception:
                return f" on prompt {p!r} (answer {a!r})"
        return f" on a batch of {len(prompts)} prompts (first {prompts[0]!r})" if prompts else ""


def load_reward_fn(spec: str, weight: float = 1.0) -> RewardFunction:
    """``"package.module:function"`` -> a checked :class:`RewardFunction` (errors name reward.fn)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward.fn={spec!r}: expected <module>:<function>, e.g. rlhf.data.demo:reward")
    if not math.isfinite(float(weight)):
        raise ValueError(f"reward.fn_weight={weight}: must be a finite number")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward.fn={spec}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward.fn={spec}: module {module_name!r} has no callable {attr!r}")
    return RewardFunction(spec, fn, float(weight))
