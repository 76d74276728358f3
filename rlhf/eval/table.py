"""The evaluation tables in the published column layouts, one row per model.

- C-Eval: model, shots, Avg, Avg (Hard), STEM, Social Science, Humanities, Other (accuracy, %);
- MMLU: model, shots, Avg, STEM, Social Science, Humanities, Other (accuracy, %);
- CLUE: model, then per task zero-shot and few-shot side by side (accuracy; CMRC2018: F1), as
  fractions like the published CLUE table.

``table.md`` holds the three tables; ``table.csv`` every cell in long form (suite, model, shots,
column, value); ``table_<suite>.csv`` each table as shown.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List

TITLES = {"ceval": "C-Eval (accuracy, %)", "mmlu": "MMLU (accuracy, %)",
          "clue": "CLUE (accuracy; CMRC2018 F1; zero-shot and few-shot side by side)"}
PERCENT = {"ceval", "mmlu"}


def cell(suite: str, column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "shots":
        return str(value)
    return f"{100 * value:.2f}" if suite in PERCENT else f"{value:.4f}"


def rows(results: Dict[str, Dict[str, Any]], suite: str, header: List[str]) -> List[List[str]]:
    """[[model, cells...], ...] for one suite from {model: evaluate() output}."""
    out = []
    for model, res in results.items():
        for row in res["tables"].get(suite, []):
            out.append([model] + [cell(suite, c, row.get(c)) for c in header])
    return out


def write(run_dir: Path, results: Dict[str, Dict[str, Any]], headers: Dict[str, List[str]]) -> str:
    """Write table.md, table.csv and table_<suite>.csv; return the markdown."""
    md: List[str] = []
    long_rows: List[List[Any]] = []
    for suite, header in headers.items():
        body = rows(results, suite, header)
        md += [f"### {TITLES[suite]}", "", "| model | " + " | ".join(header) + " |",
               "|" + "---|" * (len(header) + 1)]
        md += ["| " + " | ".join(r) + " |" for r in body] + [""]
        with open(run_dir / f"table_{suite}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["model", *header], *body])
        for model, res in results.items():
            for row in res["tables"].get(suite, []):
                long_rows += [[suite, model, row.get("shots", ""), c, row[c]] for c in header
                              if c != "shots" and row.get(c) is not None]
    with open(run_dir / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["suite", "model", "shots", "column", "value"], *long_rows])
    text = "\n".join(md)
    (run_dir / "table.md").write_text(text + "\n")
    return text
