"""The benchmark suites of ``stage=eval``: which lm-eval tasks each runs and how their scores
fold into the published table columns.

- ``ceval``: lm-eval's ``ceval-valid_<subject>`` tasks (scored on val, few-shot from dev), read
  from the official release layout ``<data_dir>/ceval/{dev,val}/<subject>_{dev,val}.csv``
  (columns ``id,question,A,B,C,D,answer[,explanation]``). Columns: Avg, Avg (Hard), STEM,
  Social Science, Humanities, Other, each the mean of the subject accuracies (C-Eval's own
  averaging); Avg (Hard) over its eight hard subjects.
- ``mmlu``: lm-eval's ``mmlu_<subject>`` tasks (scored on test, few-shot from dev), read from the
  official release layout ``<data_dir>/mmlu/{dev,test}/<subject>_{dev,test}.csv`` (no header:
  question, A, B, C, D, answer letter). Columns: Avg, STEM, Social Science, Humanities, Other,
  each weighted by questions (lm-eval's and the MMLU paper's averaging).
- ``clue``: the task YAMLs in ``rlhf/eval/tasks/clue`` (``clue_<task>``), read from
  ``<data_dir>/clue/<task>/`` (see ``clue_utils``). One column per task and shot count.

With ``data_dir`` unset every suite reads the hub copy lm-eval (or ``clue/clue``) names, all subjects.
With it set, only the subjects/tasks present there run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

TASKS_DIR = Path(__file__).parent / "tasks"

CEVAL_CATEGORIES = {
    "STEM": ["computer_network", "operating_system", "computer_architecture", "college_programming",
             "college_physics", "college_chemistry", "advanced_mathematics", "probability_and_statistics",
             "discrete_mathematics", "electrical_engineer", "metrology_engineer", "high_school_mathematics",
             "high_school_physics", "high_school_chemistry", "high_school_biology", "middle_school_mathematics",
             "middle_school_biology", "middle_school_physics", "middle_school_chemistry", "veterinary_medicine"],
    "Social Science": ["college_economics", "business_administration", "marxism", "mao_zedong_thought",
                       "education_science", "teacher_qualification", "high_school_politics",
                       "high_school_geography", "middle_school_politics", "middle_school_geography"],
    "Humanities": ["modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
                   "chinese_language_and_literature", "art_studies", "professional_tour_guide",
                   "legal_professional", "high_school_chinese", "high_school_history", "middle_school_history"],
    "Other": ["civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
              "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
              "tax_accountant", "physician"],
}
CEVAL_HARD = ["advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
              "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics"]
MMLU_TAGS = {"mmlu_stem_tasks": "STEM", "mmlu_social_sciences_tasks": "Social Science",
             "mmlu_humanities_tasks": "Humanities", "mmlu_other_tasks": "Other"}
CLUE_TASKS = ["ocnli", "cmnli", "chid", "cmrc2018", "cluewsc2020", "c3", "afqmc", "csl", "iflytek", "tnews"]
CLUE_NAMES = {"ocnli": "OCNLI", "cmnli": "CMNLI", "chid": "CHID", "cmrc2018": "CMRC2018",
              "cluewsc2020": "CLUEWSC2020", "c3": "C3", "afqmc": "AFQMC", "csl": "CSL",
              "iflytek": "IFLYTEK", "tnews": "TNEWS"}
CATEGORIES = ["STEM", "Social Science", "Humanities", "Other"]


@dataclass
class Suite:
    """``tasks(task_manager, data_dir)`` -> lm-eval task specs (names or config dicts);
    ``columns(scores, shots)`` -> the suite's table cells from {task: (score, n)};
    ``header(shots)`` -> the table's columns (after ``model``)."""

    tasks: Callable[..., List]
    columns: Callable[[Dict[str, tuple], List[int]], Dict[str, Optional[float]]]
    header: Callable[[List[int]], List[str]]
    per_shot_rows: bool  # True: one row per (model, shots); False: shots side by side in one row


def _yaml(tm, name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise KeyError(f"lm-eval has no task '{name}' (lm-eval {_version()})")
    cfg = copy.deepcopy(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "include"):
        cfg.pop(key, None)
    return cfg


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _local_subjects(folder: Path, split: str, suite: str) -> List[str]:
    files = sorted((folder / split).glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"eval.data_dir: no {split}/<subject>_{split}.csv files under {folder} "
                                f"(the official {suite} release layout)")
    return [f.name[: -len(f"_{split}.csv")] for f in files]


def read_csv_splits(files: Dict[str, str], columns: Optional[List[str]] = None, **_) -> "datasets.DatasetDict":
    """lm-eval ``custom_dataset``: one split per CSV file, every cell a string (as released: an
    answer of "1" stays the text "1"). ``columns`` names the columns of header-less files (MMLU)."""
    import csv

    import datasets

    out = {}
    for split, path in files.items():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        head, body = (columns, rows) if columns else (rows[0], rows[1:])
        out[split] = datasets.Dataset.from_list([dict(zip(head, r)) for r in body if r])
    return datasets.DatasetDict(out)


# ---------------------------------------------------------------- C-Eval


def ceval_tasks(tm, data_dir: Optional[Path]) -> List:
    if data_dir is None:
        return [f"ceval-valid_{s}" for c in CEVAL_CATEGORIES.values() for s in c]
    root = data_dir / "ceval"
    specs = []
    for s in _local_subjects(root, "val", "C-Eval"):
        cfg = _yaml(tm, f"ceval-valid_{s}")
        cfg.update(dataset_path=None, dataset_name=None, custom_dataset=read_csv_splits, dataset_kwargs={
            "files": {"val": str(root / "val" / f"{s}_val.csv"), "dev": str(root / "dev" / f"{s}_dev.csv")}})
        specs.append(cfg)
    return specs


def _mean(xs: List[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def ceval_columns(scores: Dict[str, tuple], shots) -> Dict[str, Optional[float]]:
    acc = {t.split("_", 1)[1]: v[0] for t, v in scores.items()}
    out = {"Avg": _mean(list(acc.values())), "Avg (Hard)": _mean([acc[s] for s in CEVAL_HARD if s in acc])}
    for cat, subjects in CEVAL_CATEGORIES.items():
        out[cat] = _mean([acc[s] for s in subjects if s in acc])
    return out


# ---------------------------------------------------------------- MMLU


def _mmlu_names(tm) -> List[str]:
    return sorted(n for n, e in tm.task_index.items() if n.startswith("mmlu_") and e.yaml_path is not None
                  and e.yaml_path.parent.name == "default" and e.yaml_path.parent.parent.name == "mmlu")


def mmlu_tasks(tm, data_dir: Optional[Path]) -> List:
    if data_dir is None:
        return _mmlu_names(tm)
    root = data_dir / "mmlu"
    specs = []
    for s in _local_subjects(root, "test", "MMLU"):
        cfg = _yaml(tm, f"mmlu_{s}")
        cfg.update(dataset_path=None, dataset_name=None, custom_dataset=read_csv_splits, dataset_kwargs={
            "files": {"test": str(root / "test" / f"{s}_test.csv"), "dev": str(root / "dev" / f"{s}_dev.csv")},
            "columns": ["question", "A", "B", "C", "D", "answer"]},
            doc_to_text="{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
            doc_to_target="{{['A', 'B', 'C', 'D'].index(answer.strip())}}")
        specs.append(cfg)
    return specs


def mmlu_category(tm, task: str) -> str:
    from lm_eval.tasks._yaml_loader import load_yaml

    tag = load_yaml(tm.task_index[task].yaml_path, resolve_func=False, recursive=False).get("tag")
    return MMLU_TAGS.get(tag if isinstance(tag, str) else (tag or [""])[0], "Other")


def mmlu_columns_for(tm):
    def columns(scores: Dict[str, tuple], shots) -> Dict[str, Optional[float]]:
        def weighted(items):
            n = sum(v[1] for v in items)
            return sum(v[0] * v[1] for v in items) / n if n else None

        out = {"Avg": weighted(list(scores.values()))}
        for cat in CATEGORIES:
            out[cat] = weighted([v for t, v in scores.items() if mmlu_category(tm, t) == cat])
        return out
    return columns


# ---------------------------------------------------------------- CLUE


def clue_tasks(tm, data_dir: Optional[Path]) -> List:
    if data_dir is None:
        return [f"clue_{t}" for t in CLUE_TASKS]
    present = [t for t in CLUE_TASKS if (data_dir / "clue" / t).is_dir()]
    if not present:
        raise FileNotFoundError(f"eval.data_dir: no CLUE task folders ({', '.join(CLUE_TASKS)}) under {data_dir / 'clue'}")
    return [f"clue_{t}" for t in present]


def clue_header(shots: List[int]) -> List[str]:
    return [f"{CLUE_NAMES[t]} {k}-shot" for t in CLUE_TASKS for k in shots]


def clue_columns(scores_by_shot: Dict[int, Dict[str, tuple]], shots: List[int]) -> Dict[str, Optional[float]]:
    out = {}
    for t in CLUE_TASKS:
        for k in shots:
            v = scores_by_shot.get(k, {}).get(f"clue_{t}")
            out[f"{CLUE_NAMES[t]} {k}-shot"] = None if v is None else v[0]
    return out


def suites(tm) -> Dict[str, Suite]:
    """The registry of suites (it needs the TaskManager for MMLU's subject tags)."""
    return {
        "ceval": Suite(ceval_tasks, ceval_columns, lambda shots: ["Avg", "Avg (Hard)", *CATEGORIES], True),
        "mmlu": Suite(mmlu_tasks, mmlu_columns_for(tm), lambda shots: ["Avg", *CATEGORIES], True),
        "clue": Suite(clue_tasks, clue_columns, clue_header, False),
    }


SUITE_NAMES = ("ceval", "mmlu", "clue")
