"""stage=pretrain: raw text packed into blocks (no padding), held-out perplexity falls, kill -9
and resume gives the same run."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rlhf.data.demo import default_root, make_demo
from rlhf.data.text import PackedCollator, load_documents, pack, split_documents
from rlhf.models.load import resolve_path
from tests.conftest import compose_cfg, shared_cache

QUICK = ("logger=none", "logger.progress=false", "data.demo_size=400", "data.heldout_prompts=8")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path(compose_cfg("model=tiny-opt").model, shared_cache()))


def test_demo_corpus_packs_into_full_blocks_without_padding(tokenizer):
    corpus = make_demo(default_root(shared_cache(), 400), size=400)["pretrain"]
    docs = load_documents(str(corpus))
    assert len(docs) == 400  # one document per line of the demo's raw-text corpus
    blocks, stats = pack(docs, tokenizer, block_size=48)
    ids = [b["input_ids"] for b in blocks]
    assert all(len(b) == 48 for b in ids)
    assert tokenizer.pad_token_id not in {t for b in ids for t in b}
    # the blocks are exactly the documents, each followed by EOS, back to back (tail dropped)
    stream = [t for x in tokenizer(list(docs["text"]), add_special_tokens=False)["input_ids"] for t in x + [tokenizer.eos_token_id]]
    assert [t for b in ids for t in b] == stream[: len(ids) * 48]
    assert stats["tokens"] == len(stream) == stats["blocks"] * 48 + stats["dropped_tokens"]
    assert stats["dropped_tokens"] < 48
    batch = PackedCollator()([blocks[0], blocks[1]])
    assert batch["attention_mask"].all() and torch.equal(batch["labels"], batch["input_ids"])


def test_sources_and_errors(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"content": "one two"}\n{"content": "three"}\n{"content": "four five"}\n')
    docs = load_documents(str(tmp_path / "a.jsonl"), text_field="content")
    assert list(docs["text"]) == ["one two", "three", "four five"]
    with pytest.raises(KeyError, match="pretrain.text_field='text'"):
        load_documents(str(tmp_path / "a.jsonl"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("alpha\n\nbeta\n")
    assert list(load_documents(str(tmp_path / "dir"))["text"]) == ["alpha", "beta"]
    train, held = split_documents(docs, 0.34, seed=1)
    assert len(train) == 2 and len(held) == 1 and set(train["text"]) | set(held["text"]) == set(docs["text"])
    with pytest.raises(ValueError, match="pretrain.block_size"):
        pack(docs, tokenizer, block_size=10_000)


@pytest.mark.slow
def test_pretrain_lowers_heldout_perplexity(tmp_path):
    from rlhf.stages import pretrain

    s = pretrain.run(compose_cfg("stage=pretrain", *QUICK, "pretrain.max_steps=10", run_dir=tmp_path))
    # observed on tiny-opt: ~350 before, ~30 after 10 steps
    assert s["eval_ppl"] < 0.3 * s["eval_ppl_initial"]
    assert s["steps"] == 10 and s["tokens_per_s"] > 0 and s["train_blocks"] > 0
    assert s["train_tokens"] == s["train_blocks"] * s["block_size"] + s["dropped_tail_tokens"]
    assert (tmp_path / "model" / "model.safetensors").exists()


# kill -9 and resume: tests/test_resume.py (STAGES['pretrain']), the same check as every trained stage.
