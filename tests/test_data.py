"""Data layer: demo task rule, generated files, sources, step splits, tokenised cache, collators."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from rlhf.config import DataConfig, SourceConfig
from rlhf.data import demo
from rlhf.data.blend import build_step_data, load_unsupervised, split_indices, weighted
from rlhf.data.collate import PairCollator, PromptCollator, SFTCollator
from rlhf.data.sources import SOURCES, load_source, load_source_with_stats, strip_citations
from rlhf.data.tokenize import tokenize_pairs, tokenize_prompts, tokenize_sft, tokenize_text

ADD = "Human: What is {a} plus {b}?\n Assistant:"


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tok():
    """Tiny byte-level BPE tokenizer (same special tokens as rlhf.models.tiny.build_tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(demo.corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.make_demo(root, size=300, seed=7)
    return root


def _write_json(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def _pairs_file_rows(n, offset=0):
    return [
        {"prompt": f"Human: question {i}?\n Assistant:", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for i in range(offset, offset + n)
    ]


# ----------------------------------------------------------------------------------------------
# the demo task rule


def test_verify_addition_first_integer_rule():
    p = ADD.format(a=3, b=4)
    assert demo.verify(p, " The answer is 7.")
    assert demo.verify(p, "7")
    assert demo.verify(p, " 7, not 3.")
    assert not demo.verify(p, " The answer is 8.")
    assert not demo.verify(p, " The answer is 3 or 7.")  # first integer is 3: spraying fails
    assert not demo.verify(p, " The answer is 17.")
    assert not demo.verify(p, " I do not know.")
    assert not demo.verify(p, "")


def test_verify_reads_a_restated_question_at_its_value():
    p = ADD.format(a=3, b=4)
    assert demo.verify(p, " 3 plus 4 is 7.")  # the first integer after "is"
    assert not demo.verify(p, " 3 plus 4 is 8.")
    assert not demo.verify(p, " 3 plus 4 is 8 or 7.")  # spraying still fails
    assert not demo.verify(p, " 3 plus 4 is.")
    assert demo.verify("Human: What is the sum of 3 and 4?\n Assistant:", " 3 plus 4 is 7.")
    assert demo._parse("Human: What is the sum of 3 and 4?\n Assistant:") == ("add", (3, 4))
    third = "Human: What do you get when you add 3 and 4?\n Assistant:"
    assert demo._parse(third) == ("add", (3, 4)) and demo.verify(third, " 3 plus 4 is 7.")
    assert not demo.verify(third, " 3 plus 4 is 8.")
    assert demo.verify("Human: What number follows 41?\n Assistant:", " The number after 41 is 42.")
    assert not demo.verify("Human: What number follows 41?\n Assistant:", " The number after 41 is 41.")
    for task, ops in [("add", (9, 9)), ("parity", (57,)), ("next", (99,))]:
        for k in (0, 1):
            p = demo._prompt(task, k, ops)
            assert demo.verify(p, demo._correct(task, ops))
            rng = random.Random(0)
            assert not any(demo.verify(p, demo._wrong(task, ops, rng, kind)) for kind in ("value", "spray", "offformat")
                           for _ in range(20))


def test_verify_parity_exactly_one_word():
    p = "Human: Is 14 even or odd?\n Assistant:"
    assert demo.verify(p, " It is even.")
    assert demo.verify(p, " Even, 14 is even.")
    assert demo.verify("Human: Is 9 odd or even?\n Assistant:", " It is odd.")
    assert not demo.verify(p, " It is odd.")
    assert not demo.verify(p, " It is even or odd.")  # both named
    assert not demo.verify(p, " It is 14.")  # neither
    assert not demo.verify(p, " It is uneven.")  # not the word even


def test_verify_next_number():
    assert demo.verify("Human: What number comes after 41?\n Assistant:", " The answer is 42.")
    assert demo.verify("Human: What number follows 99?\n Assistant:", " It is 100.")
    assert not demo.verify("Human: What number comes after 41?\n Assistant:", " The answer is 41.")
    assert not demo.verify("Human: What number comes after 41?\n Assistant:", " 40 then 42.")


def test_verify_unknown_prompt_and_rule_rate():
    assert not demo.verify("Human: What is 3 times 4?\n Assistant:", " The answer is 12.")
    assert not demo.verify("What is 3 plus 4?", " The answer is 7.")
    assert not demo.verify(None, "7")
    p = ADD.format(a=1, b=1)
    assert demo.rule_rate([p, p, p, p], [" 2", " 3", " The answer is 2.", "two"]) == 0.5
    assert demo.rule_rate([], []) == 0.0


# ----------------------------------------------------------------------------------------------
# generated demo files


def test_make_demo_deterministic_and_idempotent(tmp_path):
    a = demo.make_demo(tmp_path / "a", size=120, seed=3)
    b = demo.make_demo(tmp_path / "b", size=120, seed=3)
    c = demo.make_demo(tmp_path / "c", size=120, seed=4)
    keys = ["pairs_train", "pairs_eval", "sft_train", "sft_eval", "pretrain"]
    for k in keys:
        assert a[k].read_bytes() == b[k].read_bytes(), k
    assert a["pairs_train"].read_bytes() != c["pairs_train"].read_bytes()
    assert len(demo.read_rows(a["pairs_train"])) == 120 and len(demo.read_rows(a["pairs_eval"])) == 12
    mtimes = {k: a[k].stat().st_mtime_ns for k in keys}
    demo.make_demo(tmp_path / "a", size=120, seed=3)  # same size/seed: nothing rewritten
    assert mtimes == {k: a[k].stat().st_mtime_ns for k in keys}
    demo.make_demo(tmp_path / "a", size=60, seed=3)  # other size: rewritten
    assert len(demo.read_rows(a["pairs_train"])) == 60
    assert not [p for p in (tmp_path / "a").rglob(".*") if p.is_file()]  # no temp files left


def test_demo_pairs_chosen_pass_rejected_fail(demo_dir):
    for split in ("train", "eval"):
        rows = demo.read_rows(demo_dir / "pairs" / f"{split}.json")
        assert rows
        for r in rows:
            assert demo.verify(r["prompt"], " " + r["chosen"]), r
            assert not demo.verify(r["prompt"], " " + r["rejected"]), r
    # rejected answers cover wrong values, sprays and off-format text
    rejected = [r["rejected"] for r in demo.read_rows(demo_dir / "pairs" / "train.json")]
    assert any(" or " in x for x in rejected) and any("know" in x or "think" in x or "a number" in x for x in rejected)


def test_demo_sft_mixed_quality(demo_dir):
    rows = demo.read_rows(demo_dir / "sft" / "train.json")
    share = demo.rule_rate([r["prompt"] for r in rows], [" " + r["answer"] for r in rows])
    assert 0.35 <= share <= 0.55  # _SFT_MIX: 45% right
    refusals = sum(" " + r["answer"] == demo.REFUSAL for r in rows) / len(rows)
    assert 0.22 <= refusals <= 0.38  # 30% refuse: the single likeliest wrong answer
    sums = sum(demo.task_of(r["prompt"]) == "add" for r in rows) / len(rows)
    assert 0.4 <= sums <= 0.6  # TASK_WEIGHTS: half the rows are sums
    lines = (demo_dir / "pretrain.txt").read_text().splitlines()
    assert len(lines) >= 300 and all(line.strip() for line in lines)


def test_heldout_prompts_never_in_training(demo_dir):
    held = demo.heldout_prompts(64)
    assert len(held) == 64 and held == demo.heldout_prompts(64) and held != demo.heldout_prompts(64, seed=1)
    assert all(demo._parse(p) is not None for p in held)
    assert len(set(held)) >= 60  # the reserved pool is large enough for the default 64
    seen = set()
    for sub in ("pairs", "sft"):
        for split in ("train", "eval"):
            seen |= {r["prompt"] for r in demo.read_rows(demo_dir / sub / f"{split}.json")}
    assert not seen & set(held)
    pretrain = (demo_dir / "pretrain.txt").read_text()
    assert not any(p.replace("\n", "") in pretrain for p in held)
    # the facts behind held-out prompts are in training: the same operands in every other phrasing
    train_pool = {demo._prompt(*c) for c in demo._train_pool()}
    pool = set(demo.heldout_prompts(1000))
    assert len(pool) == 84 and {demo.task_of(p) for p in pool} == {"add", "parity", "next"}
    for p in pool:
        (task, k, ops), = [c for c in demo._combos() if demo._prompt(*c) == p]
        others = [j for j in range(len(demo._TEMPLATES[task])) if j != k]
        assert others and all(demo._prompt(task, j, ops) in train_pool for j in others)


def test_corpus_deterministic_and_complete():
    c = demo.corpus()
    assert c == demo.corpus()
    assert set(demo.heldout_prompts(100)) <= set(c)
    assert ADD.format(a=3, b=4) + " 3 plus 4 is 7." in c
    assert "Human: What is the sum of 3 and 4?\n Assistant: 3 plus 4 is 7." in c


# ----------------------------------------------------------------------------------------------
# step shares


def test_split_indices_disjoint_cover_fractions():
    shares = split_indices(100, "2,4,4", seed=1)
    assert [len(s) for s in shares] == [20, 40, 40]
    allidx = np.concatenate(shares)
    assert sorted(allidx.tolist()) == list(range(100))  # disjoint and covering
    shares = split_indices(7, "1,1,1", seed=1)
    assert sum(len(s) for s in shares) == 7 and len(set(np.concatenate(shares).tolist())) == 7
    assert [len(s) for s in split_indices(10, "10,0,0", seed=0)] == [10, 0, 0]
    with pytest.raises(ValueError, match="data_split"):
        split_indices(10, "2,4", seed=0)


def test_split_same_seed_same_shares():
    a, b, c = split_indices(50, "2,4,4", 5), split_indices(50, "2,4,4", 5), split_indices(50, "2,4,4", 6)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))
    assert len(weighted(np.arange(10), 0.5)) == 5 and len(weighted(np.arange(10), 2.0)) == 20


def _local_cfg(tmp_path, n_train=100, n_eval=20, **kw):
    d = tmp_path / "local"
    _write_json(d / "train.json", _pairs_file_rows(n_train))
    _write_json(d / "eval.json", _pairs_file_rows(n_eval, offset=1000))
    return DataConfig(name="t", sources=[SourceConfig(name="local/jsonfile", path=str(d))], **kw)


def test_build_step_data_disjoint_steps_and_schema(tmp_path, caplog):
    cfg = _local_cfg(tmp_path)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="rlhf.data"):
        steps = {s: build_step_data(cfg, s, cache, seed=11) for s in (1, 2, 3)}
    assert "local/jsonfile keeps 20 train / 4 eval rows" in caplog.text
    assert steps[1][0].column_names == ["prompt", "answer"]
    assert steps[2][0].column_names == ["prompt", "chosen", "rejected"]
    assert [len(steps[s][0]) for s in (1, 2, 3)] == [20, 40, 40]
    assert [len(steps[s][1]) for s in (1, 2, 3)] == [4, 8, 8]
    for split in (0, 1):
        prompts = [set(steps[s][split]["prompt"]) for s in (1, 2, 3)]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    row = steps[2][0][0]
    i = int(row["prompt"].split()[2].rstrip("?"))
    assert row["chosen"] == f" good {i}" and row["rejected"] == f" bad {i}"
    # same seed -> same rows in the same order; another seed -> another share
    again = build_step_data(cfg, 2, cache, seed=11)[0]
    assert again["prompt"] == steps[2][0]["prompt"]
    assert set(build_step_data(cfg, 2, cache, seed=12)[0]["prompt"]) != set(steps[2][0]["prompt"])
    # weight scales a source's share
    cfg.sources[0].weight = 0.5
    assert len(build_step_data(cfg, 2, cache, seed=11)[0]) == 20


def test_build_step_data_demo_with_sft_only(tmp_path):
    cfg = DataConfig(
        name="demo",
        sources=[SourceConfig(name="demo")],
        sft_only=[SourceConfig(name="demo-sft")],
        demo_size=100,
    )
    train1, eval1 = build_step_data(cfg, 1, tmp_path, seed=1)
    assert (tmp_path / "demo" / "n100" / "pairs" / "train.json").exists()  # one folder per demo size
    assert train1.column_names == ["prompt", "answer"]
    assert len(train1) == 20 + 100 and len(eval1) == 2 + 10  # share of pairs + sft-only whole
    assert all(a.startswith(" ") and not a.startswith("  ") for a in train1["answer"])
    train3, _ = build_step_data(cfg, 3, tmp_path, seed=1)
    assert len(train3) == 40
    assert all(demo.verify(r["prompt"], r["chosen"]) and not demo.verify(r["prompt"], r["rejected"]) for r in _rows(train3))
    with pytest.raises(ValueError, match="sft_only"):
        build_step_data(DataConfig(name="x", sources=[SourceConfig(name="demo-sft")], demo_size=100), 2, tmp_path, 1)


def test_load_unsupervised(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("one line\n\n  \nanother line\n")
    ds = load_unsupervised(str(f), tmp_path / "cache")
    assert ds.column_names == ["text"] and ds["text"] == ["one line", "another line"]
    ds = load_unsupervised("demo", tmp_path / "cache", demo_size=50)
    assert len(ds) >= 50


# ----------------------------------------------------------------------------------------------
# named sources, each from a tiny local copy in its own schema


def _parquet(path, rows):
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))
    return path


def _mk_rm_static(d):  # hub snapshot layout: data/{train,test}-*.parquet
    row = {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "response": " Hello!", "chosen": " Hello!", "rejected": " Go away."}
    _parquet(d / "data" / "train-00000-of-00001.parquet", [row, {**row, "prompt": "\n\nHuman: Yo\n\nAssistant:"}])
    _parquet(d / "data" / "test-00000-of-00001.parquet", [row])
    return d


def _mk_full_hh(d):
    row = {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "response": " Hello!", "chosen": " Hello!", "rejected": " Go away."}
    _write_jsonl(d / "train.jsonl", [row] * 3)
    _write_jsonl(d / "test.jsonl", [row])
    return d


def _mk_synthetic(d):
    _write_json(d / "train.json", [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Car."}] * 10)
    return d


def _mk_yitingxie(d):
    row = {
        "prompt": "\n\nHuman: Hi there\n\n",
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    _write_jsonl(d / "train.jsonl", [row] * 2)
    _write_jsonl(d / "test.jsonl", [row])
    return d


def _mk_webgpt(d):
    row = {
        "question": {"id": "q1", "full_text": "Why is the sky blue?", "dataset": "eli5"},
        "quotes_0": {"title": [], "extract": []},
        "answer_0": "Rayleigh scattering [1] makes it blue [2, 3].",
        "tokens_0": [],
        "score_0": 1.0,
        "quotes_1": {"title": [], "extract": []},
        "answer_1": "Because of the ocean.",
        "tokens_1": [],
        "score_1": -1.0,
    }
    swapped = {**row, "answer_0": row["answer_1"], "answer_1": row["answer_0"], "score_0": -1.0, "score_1": 1.0}
    tie = {**row, "score_0": 0.0, "score_1": 0.0}
    _write_jsonl(d / "train.jsonl", [row, swapped] * 5 + [tie])
    return d


def _mk_shp(d):
    row = {"post_id": "x", "history": "Is tea good?", "human_ref_A": "Yes, tea is good.", "human_ref_B": "No.", "labels": 1}
    _write_jsonl(d / "train.jsonl", [row, {**row, "labels": 0}])
    _write_jsonl(d / "validation.jsonl", [row])
    return d


def _mk_local_json(d):
    _write_json(d / "train.json", [{"prompt": "Human: Hi\n Assistant:", "chosen": "Hello!", "rejected": "Go."}] * 2)
    _write_json(d / "eval.json", [{"prompt": "Human: Hi\n Assistant:", "chosen": "Hello!", "rejected": "Go."}])
    return d


def _mk_local_sft(d):
    _write_json(d / "train.json", [{"prompt": "Human: Hi\n Assistant:", "answer": "Hello!"}] * 2)
    _write_json(d / "eval.json", [{"prompt": "Human: Hi\n Assistant:", "answer": "Hello!"}])
    return d


def _mk_demo(d):
    demo.make_demo(d, size=30)
    return d


HELLO = {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}
CASES = {
    "Dahoas/rm-static": (_mk_rm_static, HELLO, (2, 1)),
    "Dahoas/full-hh-rlhf": (_mk_full_hh, HELLO, (3, 1)),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        _mk_synthetic,
        {"prompt": " Human: Name a fruit. Assistant:", "chosen": " Apple.", "rejected": " Car."},
        (9, 1),  # no eval split: 9:1 cut
    ),
    "yitingxie/rlhf-reward-datasets": (
        _mk_yitingxie,
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
        (2, 1),
    ),
    "openai/webgpt_comparisons": (
        _mk_webgpt,
        {
            "prompt": " Human: Why is the sky blue? Assistant:",
            "chosen": " Rayleigh scattering makes it blue.",
            "rejected": " Because of the ocean.",
        },
        (10, 1),  # 11 usable (a tie keeps answer_0 chosen, as DeepSpeed-Chat), 9:1 cut
    ),
    "stanfordnlp/SHP": (
        _mk_shp,
        {"prompt": " Human: Is tea good? Assistant:", "chosen": " Yes, tea is good.", "rejected": " No."},
        (2, 1),
    ),
    # DeepSpeed-Chat's LocalJsonFileDataset: " " + prompt, " " + answer
    "local/jsonfile": (_mk_local_json, {"prompt": " Human: Hi\n Assistant:", "chosen": " Hello!", "rejected": " Go."}, (2, 1)),
    "local/sftjson": (_mk_local_sft, {"prompt": " Human: Hi\n Assistant:", "answer": " Hello!"}, (2, 1)),
    "demo": (_mk_demo, None, (30, 3)),
    "demo-sft": (_mk_demo, None, (30, 3)),
}


def test_every_named_source_has_a_case():
    assert set(CASES) == set(SOURCES)


@pytest.mark.parametrize("name", list(CASES))
def test_source_maps_local_copy(tmp_path, name):
    make, expected, (n_train, n_eval) = CASES[name]
    d = make(tmp_path / "src")
    train, eval_ = load_source(SourceConfig(name=name, path=str(d)), tmp_path / "cache")
    assert (len(train), len(eval_)) == (n_train, n_eval)
    cols = ["prompt", "answer"] if SOURCES[name].kind == "sft" else ["prompt", "chosen", "rejected"]
    assert train.column_names == cols and eval_.column_names == cols
    if expected is not None:
        assert expected in _rows(train) and expected in _rows(eval_)
    if name == "openai/webgpt_comparisons":  # both orders of the scores pick the higher one
        assert all(r == expected for r in _rows(train) + _rows(eval_))
    if name == "stanfordnlp/SHP":
        assert {"prompt": expected["prompt"], "chosen": " No.", "rejected": " Yes, tea is good."} in _rows(train)
    if name == "demo":
        assert all(demo.verify(r["prompt"], r["chosen"]) for r in _rows(train))
        assert all(r["chosen"].startswith(" ") and not r["chosen"].startswith("  ") for r in _rows(train))


def test_strip_citations():
    # DeepSpeed-Chat's two regexes: any [...] or (...) group goes, with the space before it
    assert strip_citations("A [1] b [2, 3] c [4-5].") == "A b c."
    assert strip_citations("Sky (1) blue(2) and [note].") == "Sky blue and."


def test_bad_rows_skipped_and_counted(tmp_path, caplog):
    good = _pairs_file_rows(3)
    bad = [
        {"prompt": "Human: x\n Assistant:", "chosen": "", "rejected": "no"},  # empty
        {"prompt": "Human: x\n Assistant:", "rejected": "no"},  # missing
        {"prompt": "Human: x\n Assistant:", "chosen": 5, "rejected": "no"},  # not a string
        {"prompt": None, "chosen": "a", "rejected": "b"},
        {"prompt": "   ", "chosen": "a", "rejected": "b"},  # whitespace only
    ]
    d = tmp_path / "src"
    _write_json(d / "train.json", good[:2] + bad + good[2:])
    _write_json(d / "eval.json", good[:1] + bad[:1])
    with caplog.at_level(logging.INFO, logger="rlhf.data"):
        train, eval_, stats = load_source_with_stats(SourceConfig(name="local/jsonfile", path=str(d)), tmp_path / "c")
    assert (stats["train_rows"], stats["train_bad"], stats["eval_rows"], stats["eval_bad"]) == (3, 5, 1, 1)
    assert [r["chosen"] for r in _rows(train)] == [" good 0", " good 1", " good 2"]
    assert "5 bad skipped" in caplog.text


def test_source_without_usable_rows_names_it(tmp_path):
    d = tmp_path / "src"
    _write_jsonl(d / "train.jsonl", [{"history": "q", "human_ref_A": "a", "human_ref_B": "", "labels": 1}])
    with pytest.raises(ValueError, match=r"stanfordnlp/SHP.*no usable rows.*first bad row.*human_ref_B"):
        load_source(SourceConfig(name="stanfordnlp/SHP", path=str(d)), tmp_path / "c")


def test_unknown_source_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data source 'nope'.*Dahoas/rm-static.*local/jsonfile"):
        load_source(SourceConfig(name="nope"), tmp_path)
    with pytest.raises(ValueError, match="local/jsonfile.*path"):
        load_source(SourceConfig(name="local/jsonfile"), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_source(SourceConfig(name="local/jsonfile", path=str(tmp_path / "absent")), tmp_path)


def test_hub_id_code_path(tmp_path, monkeypatch):
    """path None loads the source's hub id with datasets.load_dataset (no network here: faked)."""
    import datasets

    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append(path)
        row = {"prompt": "\n\nHuman: a\n\nAssistant:", "response": " b", "chosen": " b", "rejected": " c"}
        return datasets.DatasetDict({"train": datasets.Dataset.from_list([row] * 4), "test": datasets.Dataset.from_list([row])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, eval_ = load_source(SourceConfig(name="Dahoas/full-hh-rlhf"), tmp_path)
    assert calls == ["Dahoas/full-hh-rlhf"] and (len(train), len(eval_)) == (4, 1)


def test_save_to_disk_directory(tmp_path):
    import datasets

    rows = _pairs_file_rows(4)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "saved"))
    train, eval_ = load_source(SourceConfig(name="local/jsonfile", path=str(tmp_path / "saved")), tmp_path / "c")
    assert (len(train), len(eval_)) == (4, 1) and train[0]["chosen"] == " good 0"


# ----------------------------------------------------------------------------------------------
# tokenisation and cache


def _sft_ds():
    from datasets import Dataset

    ops = [(a, b) for a in range(3) for b in range(3)]
    return Dataset.from_dict(
        {"prompt": [ADD.format(a=a, b=b) for a, b in ops], "answer": [f" The answer is {a + b}." for a, b in ops]}
    )


def test_tokenize_sft_cache_reuse_and_reload(tmp_path, tok):
    ds = _sft_ds()
    a, sa = tokenize_sft(ds, tok, 64, True, tmp_path)
    b, sb = tokenize_sft(ds, tok, 64, True, tmp_path)
    assert not sa["cached"] and sb["cached"] and sa["cache_file"] == sb["cache_file"]
    assert sa["kept"] == sb["kept"] == 9 and sa["dropped"] == sb["dropped"] == 0
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert b.cache_files and b.cache_files[0]["filename"] == sa["cache_file"]  # memory-mapped Arrow
    c, sc = tokenize_sft(ds, tok, 64, True, tmp_path, reload=True)
    assert not sc["cached"] and c["input_ids"] == a["input_ids"]
    _, sd = tokenize_sft(ds, tok, 32, True, tmp_path)  # other max length: other cache entry
    _, se = tokenize_sft(ds, tok, 64, False, tmp_path)  # other masking: other cache entry
    _, sf = tokenize_sft(ds.select(range(4)), tok, 64, True, tmp_path)  # other data
    assert len({sa["cache_file"], sd["cache_file"], se["cache_file"], sf["cache_file"]}) == 4


def test_tokenize_sft_mask_prompt_and_eos(tmp_path, tok):
    ds = _sft_ds()
    out, _ = tokenize_sft(ds, tok, 64, True, tmp_path)
    unmasked, _ = tokenize_sft(ds, tok, 64, False, tmp_path)
    for i in range(len(ds)):
        ids, labels, pl = out[i]["input_ids"], out[i]["labels"], out[i]["prompt_len"]
        assert tok.decode(ids[:pl]) == ds[i]["prompt"]
        assert tok.decode(ids[pl:]) == ds[i]["answer"] + tok.eos_token
        assert labels[:pl] == [-100] * pl and labels[pl:] == ids[pl:] and -100 not in labels[pl:]
        assert unmasked[i]["labels"] == ids


def test_tokenize_drops_long_prompts_and_identical_pairs(tmp_path, tok):
    from datasets import Dataset

    long_prompt = "Human: " + "What is 3 plus 4? " * 20 + "\n Assistant:"
    sft = Dataset.from_dict({"prompt": [ADD.format(a=1, b=2), long_prompt], "answer": [" The answer is 3."] * 2})
    out, stats = tokenize_sft(sft, tok, 24, False, tmp_path)
    assert (stats["kept"], stats["dropped"], stats["too_long"]) == (1, 1, 1)
    assert max(len(x) for x in out["input_ids"]) <= 24

    pairs = Dataset.from_dict(
        {
            "prompt": [ADD.format(a=1, b=2), ADD.format(a=2, b=2), long_prompt],
            "chosen": [" The answer is 3.", " The answer is 4.", " The answer is 7."],
            "rejected": [" The answer is 5.", " The answer is 4.", " The answer is 8."],
        }
    )
    out, stats = tokenize_pairs(pairs, tok, 24, tmp_path)
    assert (stats["kept"], stats["dropped"], stats["identical"], stats["too_long"]) == (1, 2, 1, 1)
    row = out[0]
    pl = row["prompt_len"]
    assert row["chosen_input_ids"][:pl] == row["rejected_input_ids"][:pl] != []
    assert row["chosen_input_ids"] != row["rejected_input_ids"] and row["chosen_input_ids"][-1] == tok.eos_token_id

    prompts, stats = tokenize_prompts(pairs, tok, 16, tmp_path)
    assert (stats["kept"], stats["dropped"]) == (2, 1)
    assert prompts[0]["input_ids"] == tok(pairs[0]["prompt"])["input_ids"] and prompts[0]["prompt"] == pairs[0]["prompt"]
    assert tok.eos_token_id not in prompts[0]["input_ids"]


def test_tokenize_text_blocks(tmp_path, tok):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["3 plus 4 is 7.", "", "After 41 comes 42.", "12 is even."]})
    out, stats = tokenize_text(ds, tok, 8, tmp_path)
    stream = []
    for t in ["3 plus 4 is 7.", "After 41 comes 42.", "12 is even."]:
        stream += tok(t)["input_ids"] + [tok.eos_token_id]
    assert stats["dropped"] == 1 and [x for b in out["input_ids"] for x in b] == stream
    assert all(len(b) <= 8 for b in out["input_ids"]) and out["labels"] == out["input_ids"]


# ----------------------------------------------------------------------------------------------
# collators


def test_sft_collator_pads_on_the_tokenizer_side():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = SFTCollator(pad_id=2, padding_side="right")(rows)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = SFTCollator(pad_id=0, padding_side="left")(rows)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    with pytest.raises(ValueError, match="pad_id"):
        SFTCollator(pad_id=None, padding_side="right")
    with pytest.raises(ValueError, match="padding_side"):
        SFTCollator(pad_id=0, padding_side="middle")


def test_pair_collator_layout():
    rows = [
        {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2], "prompt_len": 1},
        {"chosen_input_ids": [4], "rejected_input_ids": [4, 5, 6, 7], "prompt_len": 1},
    ]
    b = PairCollator(pad_id=9, padding_side="right")(rows)
    assert b["input_ids"].shape == (4, 4) and b["input_ids"].dtype == torch.long
    assert b["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9], [1, 2, 9, 9], [4, 5, 6, 7]]
    assert b["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert b["prompt_len"].tolist() == [1, 1]
    left = PairCollator(pad_id=9, padding_side="left")(rows)
    assert left["input_ids"][1].tolist() == [9, 9, 9, 4]


def test_prompt_collator_always_left_pads(tmp_path, tok):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": [ADD.format(a=1, b=2), "Human: What number comes after 41? Tell me quickly.\n Assistant:"]})
    prompts, _ = tokenize_prompts(ds, tok, 64, tmp_path)
    batch = PromptCollator(pad_id=tok.pad_token_id)([prompts[0], prompts[1]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lens = [len(prompts[i]["input_ids"]) for i in range(2)]
    assert ids.shape == (2, max(lens))
    for i in range(2):
        pad = max(lens) - lens[i]
        assert ids[i, :pad].tolist() == [tok.pad_token_id] * pad and ids[i, pad:].tolist() == prompts[i]["input_ids"]
        assert mask[i].tolist() == [0] * pad + [1] * lens[i]
    assert lens[0] != lens[1]
