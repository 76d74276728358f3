"""Data loading and metrics for the CLUE task YAMLs in this folder (lm-eval ``!function`` hooks).

Every task reads the official CLUE release from ``<clue_dir>/<task>/`` (``clue_dir`` comes in as
TaskManager metadata: ``<eval.data_dir>/clue``) in its published file layout and field names, or,
when no local directory is given, the hub copy (``clue/clue``), whose rows are mapped to the same
fields. Splits: ``train`` (few-shot examples) and ``validation`` (the official dev set, scored).

Official layouts (the ``*_public.zip`` files of the CLUE benchmark):
- afqmc, cmnli, csl, tnews, iflytek, cluewsc2020: ``train.json`` / ``dev.json`` (JSON lines);
- ocnli: ``train.50k.json`` (or ``train.json``) / ``dev.json``;
- c3: ``d-train.json`` + ``m-train.json`` / ``d-dev.json`` + ``m-dev.json`` (JSON arrays of
  ``[[context sentences], [{question, choice, answer}], id]``);
- chid: ``train.json`` + ``train_answer.json`` / ``dev.json`` + ``dev_answer.json`` (lines of
  ``{candidates, content: [passages with #idiomNNNNNN# blanks]}``; answers map blank -> index);
- cmrc2018: ``train.json`` / ``dev.json`` (SQuAD format).
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any, Dict, List, Optional

import datasets

SPLITS = {"train": "train", "validation": "dev"}
# TNEWS label ids -> Chinese category names (the 15 classes of the release; 105 and 111 unused).
TNEWS_LABELS = {"100": "故事", "101": "文化", "102": "娱乐", "103": "体育", "104": "财经", "106": "房产",
                "107": "汽车", "108": "教育", "109": "科技", "110": "军事", "112": "旅游", "113": "国际",
                "114": "股票", "115": "农业", "116": "电竞"}
_BLANK = re.compile(r"#idiom\d+#")


def _lines(path: Path) -> List[dict]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def _first(folder: Path, *names: str) -> Path:
    for n in names:
        if (folder / n).exists():
            return folder / n
    raise FileNotFoundError(f"CLUE: none of {', '.join(names)} in {folder} (the official release layout)")


def _str_labels(ds: "datasets.Dataset") -> List[dict]:
    """Hub rows with ClassLabel ints turned back into the release's label strings."""
    feat = ds.features.get("label")
    rows = ds.to_list()
    if isinstance(feat, datasets.ClassLabel):
        for r in rows:
            r["label"] = feat.int2str(r["label"]) if r["label"] >= 0 else "-"
    return rows


def _hub(task: str) -> Dict[str, List[dict]]:
    dd = datasets.load_dataset("clue/clue", task)
    return {split: _str_labels(dd[split]) for split in SPLITS}


def _local_or_hub(task: str, clue_dir: Optional[str], read) -> "datasets.DatasetDict":
    if clue_dir:
        folder = Path(clue_dir) / task
        if not folder.is_dir():
            raise FileNotFoundError(f"eval.data_dir: no CLUE {task} folder at {folder}")
        raw = {split: read(folder, name) for split, name in SPLITS.items()}
    else:
        raw = _hub(task)
    return raw


def _dd(rows: Dict[str, List[dict]]) -> "datasets.DatasetDict":
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})


# ---------------------------------------------------------------- sentence(-pair) classification


def load_pairs(clue_task: str, clue_dir: Optional[str] = None, **_: Any) -> "datasets.DatasetDict":
    """afqmc, cmnli, ocnli, csl, cluewsc2020: rows as released, rows without a gold label dropped."""
    def read(folder: Path, split: str) -> List[dict]:
        names = (f"{split}.json",) if split != "train" else ("train.json", "train.50k.json")
        return _lines(_first(folder, *names))

    raw = _local_or_hub(clue_task, clue_dir, read)
    return _dd({k: [r for r in v if str(r.get("label", "-")) not in ("-", "")] for k, v in raw.items()})


def _with_label_names(rows: Dict[str, List[dict]], names: Dict[str, str]) -> Dict[str, List[dict]]:
    order = sorted(names, key=lambda x: int(x))
    choices = [names[k] for k in order]
    return {split: [dict(r, choices=choices, gold=order.index(str(r["label"]))) for r in rs
                    if str(r["label"]) in names] for split, rs in rows.items()}


def load_tnews(clue_dir: Optional[str] = None, **_: Any) -> "datasets.DatasetDict":
    raw = _local_or_hub("tnews", clue_dir, lambda f, s: _lines(_first(f, f"{s}.json")))
    return _dd(_with_label_names(raw, TNEWS_LABELS))


def load_iflytek(clue_dir: Optional[str] = None, **_: Any) -> "datasets.DatasetDict":
    """Category names from the rows' ``label_des`` (or ``labels.json``); the label id otherwise."""
    raw = _local_or_hub("iflytek", clue_dir, lambda f, s: _lines(_first(f, f"{s}.json")))
    names: Dict[str, str] = {}
    if clue_dir and (Path(clue_dir) / "iflytek" / "labels.json").exists():
        names.update({str(r["label"]): r["label_des"] for r in _lines(Path(clue_dir) / "iflytek" / "labels.json")})
    for rs in raw.values():
        for r in rs:
            names.setdefault(str(r["label"]), r.get("label_des") or str(r["label"]))
    return _dd(_with_label_names(raw, names))


# ---------------------------------------------------------------- reading: C3, CHID, CMRC2018


def load_c3(clue_dir: Optional[str] = None, **_: Any) -> "datasets.DatasetDict":
    """One row per question: context (joined), question, choices, gold."""
    if clue_dir:
        folder = Path(clue_dir) / "c3"
        raw = {}
        for split, name in SPLITS.items():
            rows = []
            for part in ("d", "m"):
                path = folder / f"{part}-{name}.json"
                for context, questions, *_rest in (json.loads(path.read_text(encoding="utf-8")) if path.exists() else []):
                    for q in questions:
                        rows.append({"context": "\n".join(context), "question": q["question"],
                                     "choices": list(q["choice"]), "gold": list(q["choice"]).index(q["answer"])})
            if not rows:
                raise FileNotFoundError(f"CLUE: no d-{name}.json or m-{name}.json in {folder}")
            raw[split] = rows
    else:
        dd = datasets.load_dataset("clue/clue", "c3")
        raw = {s: [{"context": "\n".join(r["context"]), "question": r["question"], "choices": r["choice"],
                    "gold": r["choice"].index(r["answer"])} for r in dd[s]] for s in SPLITS}
    return _dd(raw)


def _chid_rows(candidates: List[str], content: List[str], answers: Dict[str, int]) -> List[dict]:
    rows = []
    for passage in content:
        for m in _BLANK.finditer(passage):
            if m.group() not in answers:
                continue
            prefix = _BLANK.sub("____", passage[:m.start()])
            rows.append({"prefix": prefix, "choices": list(candidates), "gold": int(answers[m.group()])})
    return rows


def load_chid(clue_dir: Optional[str] = None, **_: Any) -> "datasets.DatasetDict":
    """One row per blank: the passage up to the blank (other blanks as ____), 10 candidates, gold."""
    raw: Dict[str, List[dict]] = {}
    if clue_dir:
        folder = Path(clue_dir) / "chid"
        for split, name in SPLITS.items():
            answers = json.loads(_first(folder, f"{name}_answer.json").read_text(encoding="utf-8"))
            raw[split] = [row for rec in _lines(_first(folder, f"{name}.json"))
                          for row in _chid_rows(rec["candidates"], rec["content"], answers)]
    else:
        dd = datasets.load_dataset("clue/clue", "chid")
        for split in SPLITS:
            raw[split] = []
            for r in dd[split]:
                tags = [m.group() for p in r["content"] for m in _BLANK.finditer(p)]
                answers = dict(zip(tags, r["answers"]["candidate_id"]))
                raw[split] += _chid_rows(r["candidates"], r["content"], answers)
    return _dd(raw)


def load_cmrc2018(clue_dir: Optional[str] = None, **_: Any) -> "datasets.DatasetDict":
    """One row per question: context, question, answers (list of texts)."""
    raw: Dict[str, List[dict]] = {}
    if clue_dir:
        folder = Path(clue_dir) / "cmrc2018"
        for split, name in SPLITS.items():
            squad = json.loads(_first(folder, f"{name}.json").read_text(encoding="utf-8"))
            raw[split] = [{"context": p["context"], "question": qa["question"],
                           "answers": [a["text"] for a in qa["answers"]]}
                          for art in squad["data"] for p in art["paragraphs"] for qa in p["qas"]]
    else:
        dd = datasets.load_dataset("clue/clue", "cmrc2018")
        raw = {s: [{"context": r["context"], "question": r["question"], "answers": r["answers"]["text"]}
                   for r in dd[s]] for s in SPLITS}
    return _dd(raw)


# ---------------------------------------------------------------- CMRC2018 F1 (character level)

_PUNCT = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】—…·「」『』〈〉￥％＠＃＆＊＋－＝／＼｜～")


def _chars(text: str) -> List[str]:
    """The official CMRC2018 tokenisation for F1: Chinese characters one by one, runs of
    ASCII letters/digits as one token, punctuation and spaces dropped."""
    out, word = [], ""
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            word += ch
            continue
        if word:
            out.append(word)
            word = ""
        if not ch.isspace() and ch not in _PUNCT:
            out.append(ch)
    if word:
        out.append(word)
    return out


def char_f1(prediction: str, reference: str) -> float:
    """Character-level F1 as CMRC2018's evaluation script: the longest common substring of the
    tokenised texts (see :func:`_chars`) over the prediction and reference lengths."""
    p, r = _chars(prediction), _chars(reference)
    if not p or not r:
        return float(p == r)
    # longest common substring (the official script's `find_lcs`)
    best = 0
    prev = [0] * (len(r) + 1)
    for i in range(1, len(p) + 1):
        cur = [0] * (len(r) + 1)
        for j in range(1, len(r) + 1):
            if p[i - 1] == r[j - 1]:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    if best == 0:
        return 0.0
    precision, recall = best / len(p), best / len(r)
    return 2 * precision * recall / (precision + recall)


def cmrc_process_results(doc: dict, results: List[str]) -> Dict[str, float]:
    """lm-eval ``process_results``: F1 of the generated answer against the best reference."""
    pred = results[0].strip().split("\n")[0]
    return {"f1": max(char_f1(pred, a) for a in doc["answers"])}
