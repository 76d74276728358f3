"""The one training loop shared by the supervised-style stages (sft, rm, dpo, pretrain), and the
pieces step 3 drives its own loop with (``PromptCursor``, ``Stopwatch``, Ctrl-C handling).

A stage supplies a ``step_fn(batch) -> (loss, metrics)`` and an ``eval_fn() -> metrics``; this loop
does the rest: epochs over a seeded sampler, DeepSpeed backward/step (accumulation and clipping are
DeepSpeed's), non-finite loss handling, periodic eval, metrics, progress, resumable checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from rlhf.engine.setup import all_reduce_mean

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(SystemExit):
    """Ctrl-C: the loop stopped at an optimizer-step boundary (after a checkpoint when checkpointing
    is on). Exits with status 130 after one line on stderr."""

    def __init__(self, line: str):
        super().__init__(130)
        self.line = line


@contextlib.contextmanager
def stop_requests():
    """The first Ctrl-C (SIGINT) asks the loop to stop at the next optimizer step; a second one
    interrupts at once. Yields a dict whose ``"stop"`` turns True on the first one."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("interrupted: stopping after this optimizer step (press Ctrl-C again to stop at once)")

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _interrupt(step: int, checkpointer, loop_state) -> None:
    cfg = getattr(checkpointer, "cfg", None)
    on = cfg is not None and (cfg.every_n_steps > 0 or cfg.every_minutes > 0)
    path = checkpointer.save(step, loop_state) if on and checkpointer.last_step != step else None
    if on and path is None:
        path = checkpointer.root / f"step-{step:08d}"
    line = (f"interrupted at optimizer step {step}: checkpoint {path} written; resume with resume=auto" if on else
            f"interrupted at optimizer step {step}: no checkpoint (checkpoint.every_n_steps=0); nothing to resume")
    print(line, file=sys.stderr, flush=True)
    raise Interrupted(line)


@dataclass
class LoopSpec:
    epochs: int
    max_steps: int  # optimizer steps; 0 = all epochs
    eval_every: int  # optimizer steps; 0 = once per epoch
    log_every: int
    skip_nonfinite: bool
    grad_accum: int
    rows_per_sample: int = 1  # batch rows per counted sample: 2 for preference pairs (samples/s counts pairs)


def make_loader(dataset, batch_size: int, collate, rank: int, world: int, seed: int, shuffle: bool = True):
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=shuffle)
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run
    # (which starts iterating mid-epoch) would see different dropout masks than an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=shuffle, generator=torch.Generator().manual_seed(seed))


class PromptCursor:
    """Batches of a seeded loader without end, epoch after epoch (step 3 draws prompt batches from it).

    ``epoch`` is the epoch being read and ``consumed`` how many of its batches were handed out; a
    cursor started at a saved (epoch, consumed) skips those batches (the sampler's order depends only
    on its seed and the epoch), so a resumed run gets exactly the batches not yet consumed.
    """

    def __init__(self, loader: DataLoader, epoch: int = 0, consumed: int = 0):
        self.loader, self.epoch, self.consumed = loader, epoch, consumed
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._batches is None:
                self.loader.sampler.set_epoch(self.epoch)
                self._batches = iter(self.loader)
                for _ in range(self.consumed):  # resumed mid-epoch: these were already trained on
                    next(self._batches)
            batch = next(self._batches, None)
            if batch is not None:
                self.consumed += 1
                return batch
            if self.consumed == 0:
                raise ValueError("the prompt loader yields no batch (fewer prompts than one batch per rank)")
            self.epoch, self.consumed, self._batches = self.epoch + 1, 0, None

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}


class Stopwatch:
    """Wall seconds per named part of a loop: ``with watch("generation"): ...`` adds the block's time.

    On a CUDA device both ends of a block wait for queued kernels, so time is booked to the part
    that launched the work (not to whichever later call happens to wait for it).
    """

    def __init__(self, parts: Iterable[str], device: Optional[torch.device] = None):
        self.seconds: Dict[str, float] = dict.fromkeys(parts, 0.0)
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, part: str):
        if part not in self.seconds:
            raise KeyError(f"Stopwatch part {part!r}: expected one of {', '.join(self.seconds)}")
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[part] += time.perf_counter() - t0

    def split(self, wall_s: float) -> Dict[str, float]:
        """``<part>_s`` and ``<part>_share`` of ``wall_s`` for every part, plus ``other_s``/``other_share``
        (the rest of ``wall_s``, never below 0) and ``wall_s``: the seconds sum to ``wall_s`` (when the
        parts do not exceed it) and the shares to 1."""
        return time_split(self.seconds, wall_s)


def time_split(seconds: Dict[str, float], wall_s: float) -> Dict[str, float]:
    """Seconds per part -> ``<part>_s``, ``<part>_share`` and the remainder ``other``. E.g.
    {"a": 3, "b": 1} of wall 5 -> a_s 3, b_s 1, other_s 1, a_share 0.6, b_share 0.2, other_share 0.2."""
    parts = {**seconds, "other": max(wall_s - sum(seconds.values()), 0.0)}
    total = max(sum(parts.values()), 1e-12)
    return {"wall_s": wall_s, **{f"{k}_s": v for k, v in parts.items()},
            **{f"{k}_share": v / total for k, v in parts.items()}}


def total_steps(n_batches: int, spec: LoopSpec, section: str = "train") -> int:
    for key in ("grad_accum", "epochs"):
        if getattr(spec, key) < 1:
            raise ValueError(f"{section}.{key}={getattr(spec, key)}: must be >= 1"
                             + (" (max_steps caps the run at fewer steps)" if key == "epochs" else ""))
    for key in ("max_steps", "eval_every"):
        if getattr(spec, key) < 0:
            raise ValueError(f"{section}.{key}={getattr(spec, key)}: must be >= 0 (0 = off)")
    if spec.log_every < 1:
        raise ValueError(f"{section}.log_every={spec.log_every}: must be >= 1")
    if n_batches == 0:
        raise ValueError(f"{section}: the training data makes no full micro-batch (fewer rows than "
                         f"{section}.micro_batch_size x ranks): add data or lower {section}.micro_batch_size")
    per_epoch = n_batches // spec.grad_accum
    if per_epoch == 0:
        raise ValueError(f"{section}.grad_accum={spec.grad_accum} is more than the {n_batches} micro-batches of an "
                         f"epoch: no optimizer step would run (lower grad_accum or micro_batch_size, or add data)")
    steps = per_epoch * spec.epochs
    return min(steps, spec.max_steps) if spec.max_steps > 0 else steps


def fit(
    engine,
    loader: DataLoader,
    step_fn: Callable[[Dict[str, torch.Tensor]], Tuple[torch.Tensor, Dict[str, float]]],
    eval_fn: Callable[[], Dict[str, float]],
    spec: LoopSpec,
    tracker,
    checkpointer=None,
    state: Optional[Dict] = None,
) -> Dict[str, float]:
    """Train ``engine`` and return the last eval metrics plus throughput.

    Steps:
      1. work out the schedule (optimizer steps, where a resumed run restarts);
      2. for each epoch and micro-batch: forward + loss (``step_fn``), stop or skip on a
         non-finite loss, DeepSpeed backward and step;
      3. at each optimizer-step boundary: log, eval when due, checkpoint when due; after a
         Ctrl-C, checkpoint (when checkpointing is on) and stop with one line (``Interrupted``);
      4. final eval; return metrics.
    """
    # 1. schedule
    n_total = total_steps(len(loader), spec)
    state = state or {"epoch": 0, "batch": 0, "skipped": 0}
    t0 = time.perf_counter()
    bar = tracker.progress(total=n_total, initial=engine.global_steps, desc="train")
    engine.train()  # from_pretrained returns eval mode: dropout (when not disabled) must be on here
    counters = {"samples": 0, "tokens": 0}
    with stop_requests() as interrupt:  # Ctrl-C: checkpoint at the next step boundary, then stop
        step = _train(engine, loader, step_fn, eval_fn, spec, tracker, checkpointer, state, n_total, bar,
                      interrupt, counters, t0)
    samples, tokens = counters["samples"], counters["tokens"]
    bar.close()
    # 4. final eval
    elapsed = time.perf_counter() - t0
    eval_metrics = eval_fn()
    tracker.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=step)
    world = engine.world_size
    return {
        **eval_metrics,
        "steps": step,
        "skipped_nonfinite": state["skipped"],
        "train_time_s": elapsed,
        # throughput of this process's steps; None when it ran none (a run resumed at its last step)
        "samples_per_s": samples * world / max(elapsed, 1e-9) if samples else None,
        "tokens_per_s": tokens * world / max(elapsed, 1e-9) if samples else None,
        "final_train_loss": _last_loss(tracker),
    }


def _train(engine, loader, step_fn, eval_fn, spec, tracker, checkpointer, state, n_total, bar, interrupt,
           counters, t0) -> int:
    """Steps 2 and 3 of ``fit``; returns the last optimizer step."""
    step = engine.global_steps
    done = step >= n_total
    epoch, start_batch = state["epoch"], state["batch"]
    window: Dict[str, float] = {}
    n_window = 0
    samples = tokens = 0
    while not done and epoch < spec.epochs:
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < start_batch:
                continue  # resumed mid-epoch: these micro-batches are already in the weights
            # 2. forward, loss, backward, step
            boundary = engine.is_gradient_accumulation_boundary()
            loss, metrics = step_fn(batch)
            if not torch.isfinite(loss.detach()).all():
                if not spec.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"loss is {loss.item()} at optimizer step {step} (epoch {epoch}, batch {i}); "
                        "the last good checkpoint is kept. Set <stage>.skip_nonfinite=true to skip such steps."
                    )
                state["skipped"] += 1
                log.warning("skipping non-finite loss at step %d (%d skipped)", step, state["skipped"])
                loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
            engine.backward(loss)
            engine.step()
            samples += int(batch["input_ids"].shape[0]) // spec.rows_per_sample
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                window[k] = window.get(k, 0.0) + float(v)
            n_window += 1
            if not boundary:
                continue
            # 3. an optimizer step is done: log, eval, checkpoint when due
            step = engine.global_steps
            bar.update(1)
            if step % spec.log_every == 0 or step == n_total:
                means = all_reduce_mean({k: v / n_window for k, v in window.items()})
                elapsed = time.perf_counter() - t0
                means.update(lr=engine.get_lr()[0], epoch=epoch + (i + 1) / len(loader),
                             samples_per_s=samples * engine.world_size / max(elapsed, 1e-9))
                tracker.log({f"train/{k}": v for k, v in means.items()}, step=step)
                bar.set_postfix(loss=f"{means['loss']:.4f}", sps=f"{means['samples_per_s']:.1f}", refresh=False)
                window, n_window = {}, 0
            if spec.eval_every and step % spec.eval_every == 0 and step < n_total:
                eval_metrics = eval_fn()
                tracker.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=step)
            loop_state = {"epoch": epoch, "batch": i + 1, "skipped": state["skipped"]}
            if checkpointer is not None:
                checkpointer.maybe_save(step, loop_state)
            if step < n_total and _any_rank(interrupt["stop"]):
                _interrupt(step, checkpointer, loop_state)
            if step >= n_total:
                done = True
                break
        if done:
            break
        epoch, start_batch = epoch + 1, 0
        if not spec.eval_every and epoch < spec.epochs:
            eval_metrics = eval_fn()
            tracker.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=step)
    counters.update(samples=samples, tokens=tokens)
    return step


def _last_loss(tracker) -> float:
    v = tracker.last.get("train/loss")
    return float(v) if v is not None else math.nan
