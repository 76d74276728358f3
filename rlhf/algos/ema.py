"""Exponential moving average of model weights (DeepSpeed-Chat's ``--enable_ema``).

``ema = beta * ema + (1 - beta) * param`` after every optimizer step. Parameters must be whole
tensors: under ZeRO-3 the caller gathers them first (e.g. ``deepspeed.zero.GatheredParameters``).
"""

from __future__ import annotations

from typing import Iterable

import torch

Tensor = torch.Tensor


@torch.no_grad()
def ema_update(ema_params: Iterable[Tensor], params: Iterable[Tensor], beta: float) -> None:
    """In place ``ema = beta * ema + (1 - beta) * p`` for matching pairs (any shape; ``p`` is cast
    to the ema tensor's dtype). The two iterables must have the same length."""
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"ema_update got {len(ema_params)} ema tensors for {len(params)} params")
    for ema, p in zip(ema_params, params):
        ema.mul_(beta).add_(p.detach().to(ema.dtype), alpha=1.0 - beta)


class EMA:
    """Float32 shadow copies of named parameters, keyed by name.

    ``EMA(model.named_parameters(), beta)`` copies the current weights; ``update(named_params)``
    applies ``ema_update`` to each given name (unknown name -> KeyError); ``copy_to(module)``
    writes the shadows into the module's parameters of the same names (cast to their dtype).
    """

    def __init__(self, named_params: Iterable[tuple[str, Tensor]], beta: float):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"EMA beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    def update(self, named_params: Iterable[tuple[str, Tensor]]) -> None:
        pairs = list(named_params)
        names, params = [n for n, _ in pairs], [p for _, p in pairs]
        unknown = [n for n in names if n not in self.shadow]
        if unknown:
            raise KeyError(f"EMA has no shadow for parameters {unknown}")
        ema_update([self.shadow[n] for n in names], params, self.beta)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"module has no parameters named {missing}")
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"beta": self.beta, "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.shadow = {n: t.detach().float().clone() for n, t in state["shadow"].items()}
