"""Pieces of the step-3 loop in rlhf/engine/trainer.py: the resumable prompt cursor and the time split."""
from __future__ import annotations

import time

import pytest
import torch

from rlhf.engine.trainer import PromptCursor, Stopwatch, make_loader, time_split


def _loader():
    rows = [{"x": i} for i in range(10)]  # 10 rows, batches of 3 (drop_last): 3 batches per epoch
    return make_loader(rows, 3, lambda b: torch.tensor([r["x"] for r in b]), rank=0, world=1, seed=5)


def _take(cursor, n):
    return [next(cursor).tolist() for _ in range(n)]


def test_prompt_cursor_runs_epoch_after_epoch_in_a_new_order():
    cursor = PromptCursor(_loader())
    got = _take(cursor, 7)
    first, second = got[:3], got[3:6]
    assert first != second  # the sampler reshuffles each epoch
    assert len({x for b in first for x in b}) == len({x for b in second for x in b}) == 9  # distinct rows
    assert cursor.state() == {"epoch": 2, "consumed": 1}


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4, 5])
def test_resumed_cursor_yields_exactly_the_batches_not_yet_consumed(stop_after):
    whole = _take(PromptCursor(_loader()), 8)
    first = PromptCursor(_loader())
    done = _take(first, stop_after)
    state = first.state()
    resumed = PromptCursor(_loader(), **state)  # a fresh loader, as after a restart
    assert done + _take(resumed, 8 - stop_after) == whole


def test_cursor_over_no_batch_fails_instead_of_spinning():
    empty = make_loader([{"x": 1}], 3, lambda b: b, rank=0, world=1, seed=0)
    with pytest.raises(ValueError, match="no batch"):
        next(PromptCursor(empty))


def test_time_split_by_hand():
    got = time_split({"a": 3.0, "b": 1.0}, 5.0)
    assert got == pytest.approx({"wall_s": 5.0, "a_s": 3.0, "b_s": 1.0, "other_s": 1.0,
                                 "a_share": 0.6, "b_share": 0.2, "other_share": 0.2})
    over = time_split({"a": 3.0}, 2.0)  # parts longer than the wall (clock skew): no negative rest
    assert over["other_s"] == 0.0 and over["a_share"] == 1.0


def test_stopwatch_books_each_block_to_its_part():
    watch = Stopwatch(("gen", "train"))
    t0 = time.perf_counter()
    with watch("gen"):
        time.sleep(0.02)
    with watch("train"):
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    split = watch.split(wall)
    assert split["gen_s"] >= 0.02 and split["train_s"] >= 0.01
    assert split["gen_s"] + split["train_s"] + split["other_s"] == pytest.approx(wall)
    assert sum(v for k, v in split.items() if k.endswith("_share")) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="'eval'.*gen, train"):
        with watch("eval"):
            pass
