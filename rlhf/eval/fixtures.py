"""Tiny benchmark data in the official release layouts of C-Eval, MMLU and CLUE, written offline.

``write_fixtures(out_dir)`` makes a directory ``stage=eval eval.data_dir=<out_dir>`` reads exactly
as it reads the real releases (the same file names, columns and JSON fields), with a few
subjects per C-Eval/MMLU category and every CLUE task. The items are arithmetic facts of the demo
task (``a + b``) so a tiny model can learn them; answers are balanced over the choices, so a model
that always picks the same letter scores exactly chance. Deterministic in ``seed``.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Dict, List

CEVAL_SUBJECTS = {"high_school_mathematics": "STEM", "college_economics": "Social Science", "law": "Humanities",
                  "accountant": "Other"}
MMLU_SUBJECTS = {"abstract_algebra": "STEM", "econometrics": "Social Science", "philosophy": "Humanities",
                 "global_facts": "Other"}
LETTERS = "ABCD"


def _sum_item(rng: random.Random, i: int, k: int = 4) -> tuple:
    """(a, b, choices, gold index): a + b among k distinct values, the gold index i % k."""
    a, b = rng.randrange(10), rng.randrange(10)
    wrong = rng.sample([v for v in range(19) if v != a + b], k - 1)
    gold = i % k
    return a, b, [str(v) for v in wrong[:gold] + [a + b] + wrong[gold:]], gold


def _mc_rows(rng: random.Random, n: int, zh: bool) -> List[dict]:
    rows = []
    for i in range(n):
        a, b, ch, gold = _sum_item(rng, i)
        q = f"{a}加{b}等于多少？" if zh else f"What is {a} plus {b}?"
        rows.append({"id": i, "question": q, "A": ch[0], "B": ch[1], "C": ch[2], "D": ch[3], "answer": LETTERS[gold]})
    return rows


def _write_csv(path: Path, rows: List[dict], header: bool, extra: Dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        cols = list(rows[0]) + list(extra or {})
        if header:
            w.writerow(cols)
        for r in rows:
            w.writerow([{**r, **(extra or {})}[c] for c in cols])


def _jsonl(path: Path, rows: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _clue(root: Path, rng: random.Random, n_train: int, n_dev: int) -> None:
    def pair(i):
        a, b = rng.randrange(10), rng.randrange(10)
        same = i % 2 == 0
        return a, b, same, a + b if same else a + b + 1 + rng.randrange(3)

    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            a, b, same, s = pair(i)
            rows.append({"sentence1": f"{a}加{b}等于{a + b}。", "sentence2": f"{b}加{a}等于{s}。", "label": str(int(same))})
        _jsonl(root / "afqmc" / f"{split}.json", rows)
        nli = ["entailment", "neutral", "contradiction"]
        for task in ("ocnli", "cmnli"):
            rows = [{"sentence1": f"{i}加1等于{i + 1}。", "sentence2": ["结果是一个数。", "结果很大。", f"结果是{i}。"][i % 3],
                     "label": nli[i % 3], "genre": "demo", "id": i} for i in range(n)]
            _jsonl(root / task / (f"{split}.json" if not (task == "ocnli" and split == "train") else "train.50k.json"), rows)
        _jsonl(root / "csl" / f"{split}.json", [{"id": i, "abst": f"本文研究{i}加{i}的计算。", "keyword": ["加法", "计算" if i % 2 else "天气"],
                                                 "label": str(i % 2)} for i in range(n)])
        _jsonl(root / "cluewsc2020" / f"{split}.json", [
            {"target": {"span1_index": 0, "span1_text": "小明", "span2_index": 6, "span2_text": "他"},
             "idx": i, "label": ["true", "false"][i % 2], "text": f"小明算出{i}加{i}，他很高兴。"} for i in range(n)])
        tnews = ["100", "101", "102", "103", "104", "106", "107", "108", "109", "110", "112", "113", "114", "115", "116"]
        _jsonl(root / "tnews" / f"{split}.json", [{"label": tnews[i % 15], "label_desc": f"news_{i % 15}",
                                                   "sentence": f"第{i}条新闻", "keywords": ""} for i in range(n)])
        _jsonl(root / "iflytek" / f"{split}.json", [{"label": str(i % 4), "label_des": ["打车", "地图导航", "免费WIFI", "租车"][i % 4],
                                                     "sentence": f"第{i}个应用"} for i in range(n)])
        c3 = [[[f"{i}加{i}等于{2 * i}。"], [{"question": f"{i}加{i}等于多少？", "choice": [str(2 * i), str(2 * i + 1)],
                                           "answer": str(2 * i)}], f"{split}-{i}"] for i in range(n)]
        (root / "c3").mkdir(parents=True, exist_ok=True)
        (root / "c3" / f"d-{split}.json").write_text(json.dumps(c3, ensure_ascii=False), encoding="utf-8")
        (root / "c3" / f"m-{split}.json").write_text("[]", encoding="utf-8")
        idioms = ["一心一意", "三心二意", "四面八方", "五湖四海"]
        chid, answers = [], {}
        for i in range(n):
            tag = f"#idiom{split == 'dev':d}{i:05d}#"
            chid.append({"candidates": idioms, "content": [f"他做事{tag}，很专心。"]})
            answers[tag] = 0
        _jsonl(root / "chid" / f"{split}.json", chid)
        (root / "chid" / f"{split}_answer.json").write_text(json.dumps(answers), encoding="utf-8")
        squad = {"version": "v1.0", "data": [{"id": f"{split}-{i}", "title": "加法", "paragraphs": [{
            "id": f"{split}-{i}", "context": f"{i}加{i}等于{2 * i}。",
            "qas": [{"question": f"{i}加{i}等于多少？", "id": f"{split}-{i}-q",
                     "answers": [{"text": str(2 * i), "answer_start": 4 + len(str(i)) * 2}]}]}]} for i in range(n)]}
        (root / "cmrc2018").mkdir(parents=True, exist_ok=True)
        (root / "cmrc2018" / f"{split}.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")


def write_fixtures(out_dir: str | Path, *, n_eval: int = 8, n_dev: int = 5, seed: int = 0) -> Path:
    """Write ``ceval/``, ``mmlu/`` and ``clue/`` under ``out_dir`` (official layouts); returns it.

    C-Eval: ``{dev,val}/<subject>_{dev,val}.csv`` with a header, dev rows with an explanation.
    MMLU: ``{dev,test}/<subject>_{dev,test}.csv`` without a header. CLUE: ``<task>/`` files as
    ``clue_utils`` documents. ``n_eval`` scored items per subject/task, ``n_dev`` few-shot ones.
    """
    root = Path(out_dir)
    rng = random.Random(seed)
    for s in CEVAL_SUBJECTS:
        _write_csv(root / "ceval" / "dev" / f"{s}_dev.csv", _mc_rows(rng, n_dev, True), True, {"explanation": "算一算。"})
        _write_csv(root / "ceval" / "val" / f"{s}_val.csv", _mc_rows(rng, n_eval, True), True)
    for s in MMLU_SUBJECTS:
        _write_csv(root / "mmlu" / "dev" / f"{s}_dev.csv", [{k: v for k, v in r.items() if k != "id"}
                                                              for r in _mc_rows(rng, n_dev, False)], False)
        _write_csv(root / "mmlu" / "test" / f"{s}_test.csv", [{k: v for k, v in r.items() if k != "id"}
                                                                for r in _mc_rows(rng, n_eval, False)], False)
    _clue(root / "clue", rng, max(n_dev, 2), n_eval)
    return root


if __name__ == "__main__":  # python -m rlhf.eval.fixtures <dir>: a tiny benchmark copy to try stage=eval offline
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m rlhf.eval.fixtures <out dir>")
    print(write_fixtures(sys.argv[1]))
