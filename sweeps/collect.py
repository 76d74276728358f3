"""Collect a multirun into the benchmark table it reproduces: table.md, table.csv, table.png.

    python sweeps/collect.py <multirun dir> [--table auto|zero_offload|lora_rank|dschat_e2e|largest_model|generic]

Also runs by itself at the end of every multirun (``CollectTables``, the Hydra callback registered
under ``hydra.callbacks.collect`` in conf/config.yaml). Every job directory under the sweep dir holds
Hydra's ``.hydra/overrides.yaml``, the resolved ``config.yaml`` and the stage's ``summary.json``; a
job that failed has ``{"status": "OOM" | "failed", "error": ...}`` there (launchers.local) and
becomes a row saying so. Column layouts follow the published tables (shared/reference.md, and
sweeps/expected/ for the numbers they reported):

- ``zero_offload``: DeepSpeed settings -> hours/epoch, s/sample, host memory, GPU memory or OOM;
- ``lora_rank``: LoRA rank (and ZeRO setting) -> trainable params, batch, GPU memory, s/sample,
  minutes/epoch;
- ``dschat_e2e``: one row per model and hardware, hours for steps 1, 2, 3 and the total;
- ``largest_model``: one row per hardware profile, the largest actor the planner fits (``stage=plan`` jobs);
- ``robustness``: one row per pipeline run (algo, seed, threads) with the held-out rule rates of
  the SFT start and the final model, greedy and sampled, and their changes; then per algo the
  median and the min over its runs;
- ``generic`` (hyperparameter searches, ad-hoc ``-m`` runs): the swept overrides -> status,
  objective, throughput, memory.

``jobs.csv`` always lists every job with all its fields. When jobs report an ``objective``
(Optuna searches), ``best.json`` and ``best_config.yaml`` name the best job and hold its config.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

try:  # Hydra is only needed for the callback; the CLI works without it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

EPOCH_SIZE_KEYS = ("train_rows", "train_pairs", "prompts", "train_prompts")  # summary.json: samples per epoch
def _step_of_stage() -> Dict[str, int]:
    """DeepSpeed-Chat step of each training stage (dschat_e2e), from the stage registry."""
    from rlhf.stages import STAGES

    return {name: st.step for name, st in STAGES.items() if st.step is not None}


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    """One job directory of a multirun."""

    dir: Path
    num: int
    overrides: List[str]
    cfg: Dict[str, Any]
    summary: Optional[Dict[str, Any]]

    @property
    def status(self) -> str:
        if self.summary is None:
            return "missing"  # never wrote a summary (killed, or still running)
        return str(self.summary.get("status", "ok"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def error(self) -> str:
        return str((self.summary or {}).get("error", ""))

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def metric(self, key: str) -> Optional[float]:
        return _num(self.summary, key)

    @property
    def section(self) -> Dict[str, Any]:
        """The settings section of the job's stage (cfg.sft for stage=sft, ...)."""
        sec = self.cfg.get(str(self.get("stage.name", "")), {})
        return sec if isinstance(sec, dict) else {}

    def override(self, key: str) -> Optional[str]:
        return next((v for k, _, v in (o.partition("=") for o in self.overrides) if k == key), None)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def find_jobs(sweep_dir: Path) -> List[Job]:
    """Every job under ``sweep_dir`` (a directory holding ``.hydra/overrides.yaml``), in job order."""
    jobs = []
    for ov in sorted(Path(sweep_dir).rglob(".hydra/overrides.yaml")):
        d = ov.parent.parent
        hydra_cfg = _load_yaml(d / ".hydra" / "hydra.yaml") or {}
        num = (hydra_cfg.get("hydra", {}).get("job", {}) or {}).get("num", len(jobs))
        cfg = _load_yaml(d / "config.yaml") or _load_yaml(d / ".hydra" / "config.yaml") or {}
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        jobs.append(Job(d, int(num) if isinstance(num, int) else len(jobs), list(_load_yaml(ov) or []), cfg, summary))
    jobs.sort(key=lambda j: (j.num, str(j.dir)))
    return jobs


def varying_keys(jobs: Sequence[Job]) -> List[str]:
    """Override keys whose value differs between jobs (what the sweep swept)."""
    keys = sorted({o.partition("=")[0] for j in jobs for o in j.overrides})
    return [k for k in keys if len({j.override(k) for j in jobs}) > 1]


# ---------------------------------------------------------------- derived values


def s_per_sample(job: Job) -> Optional[float]:
    sps = job.metric("samples_per_s")
    return 1.0 / sps if sps else None


def _num(d: Optional[Dict[str, Any]], key: str) -> Optional[float]:
    v = (d or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def epoch_hours(job: Job, summary: Optional[Dict[str, Any]] = None, stage: Optional[str] = None) -> Optional[float]:
    """Hours for the stage's configured epochs at the measured throughput (few-step runs extrapolate).

    ``summary``/``stage``: one step of a pipeline job (default: the job's own summary and stage).
    """
    summary = job.summary if summary is None else summary
    sec = job.section if stage is None else (job.cfg.get(stage) or {})
    sps = _num(summary, "samples_per_s")
    rows = next((_num(summary, k) for k in EPOCH_SIZE_KEYS if _num(summary, k) is not None), None)
    if sps and rows:
        return rows * (sec.get("epochs", 1) or 1) / sps / 3600.0
    wall = _num(summary, "wall_time_s")
    return wall / 3600.0 if wall is not None else None


def step_summaries(job: Job) -> Dict[int, Tuple[str, Optional[Dict[str, Any]]]]:
    """DeepSpeed-Chat step -> (stage, summary) of a job; a pipeline job holds one per step it ran."""
    steps = (job.summary or {}).get("steps")
    if isinstance(steps, dict):
        return {_step_of_stage()[name]: (name, sub) for name, sub in steps.items() if name in _step_of_stage()}
    stage = str(job.get("stage.name"))
    if stage in _step_of_stage():
        return {_step_of_stage()[stage]: (stage, job.summary)}
    if stage == "pipeline":  # failed before any step reported: every step it was to run
        from types import SimpleNamespace

        from rlhf.config import pipeline_steps

        pipe = SimpleNamespace(algo=job.get("pipeline.algo", "ppo"), compare=job.get("pipeline.compare", []),
                               steps=job.get("pipeline.steps", [1, 2, 3]))
        out: Dict[int, Tuple[str, Optional[Dict[str, Any]]]] = {}
        for n, name in pipeline_steps(pipe):  # step 3: pipeline.algo (its compare runs are extra)
            out.setdefault(n, (name, None))
        return out
    return {}


def zero_setting(job: Job) -> str:
    """The zero group option this job ran ("2-offload", "3", "3 +optimizer offload", ...)."""
    stage = job.get("zero.stage")
    opt, par = job.get("zero.offload_optimizer"), job.get("zero.offload_param")
    if opt and par:
        return f"{stage}-offload"
    if opt:
        return f"{stage}-offload" if stage == 2 else f"{stage} +optimizer offload"
    return str(stage)


def gpus(job: Job) -> Optional[int]:
    n, p = job.get("hardware.nodes"), job.get("hardware.procs_per_node")
    return n * p if isinstance(n, int) and isinstance(p, int) else None


def precision(job: Job) -> str:
    dtype = job.get("model.dtype", "auto")
    return str(job.get("hardware.precision") if dtype == "auto" else dtype)


def batch_size(job: Job) -> Any:
    sec = job.section
    return sec.get("micro_batch_size", sec.get("train_batch_size"))


def grad_checkpointing(job: Job) -> Any:
    sec = job.section
    return sec.get("gradient_checkpointing", sec.get("actor_gradient_checkpointing"))


def status_cell(job: Job) -> str:
    return "ok" if job.ok else (f"{job.status}: {job.error}" if job.error else job.status)


def _metric_or_status(fn: Callable[[Job], Optional[float]]) -> Callable[[Job], Any]:
    """A metric cell that reads OOM / failed when the job did not finish."""
    return lambda job: fn(job) if job.ok else job.status


# ---------------------------------------------------------------- tables

Column = Tuple[str, Callable[[Job], Any]]


def _cfg(key: str, default: Any = "") -> Callable[[Job], Any]:
    return lambda job: job.get(key, default)


def _metric(key: str) -> Callable[[Job], Optional[float]]:
    return lambda job: job.metric(key)


def epoch_minutes(job: Job) -> Optional[float]:
    hours = epoch_hours(job)
    return hours * 60 if hours is not None else None


ZERO_OFFLOAD: List[Column] = [
    ("model", _cfg("model.name")),
    ("GPUs", gpus),
    ("ZeRO stage", _cfg("zero.stage")),
    ("offload optimizer", _cfg("zero.offload_optimizer")),
    ("offload params", _cfg("zero.offload_param")),
    ("pin memory", _cfg("zero.pin_memory")),
    ("overlap comm", _cfg("zero.overlap_comm")),
    ("allgather bucket size", _cfg("zero.allgather_bucket_size")),
    ("stage-3 max live params", _cfg("zero.stage3_max_live_parameters")),
    ("batch size", batch_size),
    ("grad accumulation", lambda j: j.section.get("grad_accum", "")),
    ("gradient checkpointing", grad_checkpointing),
    ("precision", precision),
    ("hours/epoch", _metric_or_status(epoch_hours)),
    ("s/sample", _metric_or_status(s_per_sample)),
    ("host mem GB", _metric_or_status(_metric("peak_host_mem_gb"))),
    ("GPU mem GB", _metric_or_status(_metric("peak_gpu_mem_gb"))),
    ("status", status_cell),
]

LORA_RANK: List[Column] = [
    ("model", _cfg("model.name")),
    ("LoRA rank", lambda j: j.get("lora.rank") or "none"),
    ("only LoRA trained", lambda j: j.get("lora.only_optimize_lora") if j.get("lora.rank") else ""),
    ("ZeRO", zero_setting),
    ("GPUs", gpus),
    ("trainable params", lambda j: (j.summary or {}).get("trainable_params", "")),
    ("params", lambda j: (j.summary or {}).get("params", "")),
    ("batch size", batch_size),
    ("GPU mem GB", _metric_or_status(_metric("peak_gpu_mem_gb"))),
    ("host mem GB", _metric_or_status(_metric("peak_host_mem_gb"))),
    ("s/sample", _metric_or_status(s_per_sample)),
    ("minutes/epoch", _metric_or_status(epoch_minutes)),
    ("status", status_cell),
]


def generic_columns(jobs: Sequence[Job]) -> List[Column]:
    keys = varying_keys(jobs) or ["(overrides)"]

    def override(key: str) -> Callable[[Job], Any]:
        if key == "(overrides)":
            return lambda j: ",".join(j.overrides)
        return lambda j: j.override(key) or ""

    return [("job", lambda j: j.num), *[(k, override(k)) for k in keys], ("status", status_cell),
            ("objective", lambda j: (j.summary or {}).get("objective")),
            ("s/sample", _metric_or_status(s_per_sample)),
            ("wall time s", _metric("wall_time_s")),
            ("host mem GB", _metric_or_status(_metric("peak_host_mem_gb"))),
            ("GPU mem GB", _metric_or_status(_metric("peak_gpu_mem_gb")))]


def dschat_e2e_rows(jobs: Sequence[Job]) -> Tuple[List[str], List[List[Any]]]:
    """DeepSpeed-Chat's end-to-end table: one row per (actor, reward model, hardware), hours per step."""
    header = ["setup", "GPUs", "step 1 h", "step 2 h", "step 3 h", "total h"]
    rows: Dict[Tuple, Dict[int, Any]] = {}
    for job in jobs:
        pipeline = job.get("stage.name") == "pipeline"
        actor = job.get("actor.name") if pipeline else job.get("model.name")
        reward = job.get("reward.name") if pipeline else job.get("model.name")
        key = (actor, reward, job.get("hardware.name"), gpus(job))
        cells = rows.setdefault(key, {})
        for step, (stage, summary) in step_summaries(job).items():
            cells[step] = epoch_hours(job, summary, stage) if job.ok and summary else job.status
    out = []
    for (actor, reward, hw, n), steps in rows.items():
        cells = [steps.get(s, "not run") for s in (1, 2, 3)]
        ran = [c for c in cells if c != "not run"]
        total = sum(ran) if ran and all(isinstance(c, float) for c in ran) else ""
        setup = f"{actor} on {hw}" if actor == reward else f"{actor} + {reward} RM on {hw}"
        out.append([setup, n, *cells, total])
    return header, out


def largest_model_rows(jobs: Sequence[Job]) -> Tuple[List[str], List[List[Any]]]:
    """DeepSpeed-Chat's largest-actor table from ``stage=plan`` jobs (one per hardware x model): per hardware
    profile, the largest actor whose plan fits under some setting without parameter offload (the table's
    rule), and the setting that does it."""
    header = ["hardware", "GPUs", "GPU GB", "largest actor", "params B", "setting", "largest that does not fit"]
    best: Dict[str, Dict[str, Any]] = {}
    for job in jobs:
        hw, summary = job.get("hardware.name"), job.summary or {}
        params = ((summary.get("models") or {}).get("actor") or {}).get("params", 0)
        rows = [r for r in summary.get("rows", []) if r.get("fits") and "offload_param" not in r["setting"]
                and r["setting"] != "zero=3-offload"]
        cell = best.setdefault(hw, {"gpus": gpus(job), "gb": job.get("hardware.gpu_memory_gb"), "fit": None,
                                    "miss": None})
        if rows and (cell["fit"] is None or params > cell["fit"][1]):
            cell["fit"] = (job.get("actor.name"), params, rows[0]["setting"])
        if not rows and job.ok and (cell["miss"] is None or params < cell["miss"][1]):
            cell["miss"] = (job.get("actor.name"), params)
    out = []
    for hw, c in sorted(best.items(), key=lambda kv: ((kv[1]["gpus"] or 0), kv[1]["gb"] or 0)):
        name, params, setting = c["fit"] or ("none", 0, "")
        out.append([hw, c["gpus"], c["gb"], name, round(params / 1e9, 2), setting, (c["miss"] or ("",))[0]])
    return header, out


ROBUSTNESS_RATES = (("greedy", "rule_rate"), ("sampled", "rule_rate_sampled"))


def _algo_results(job: Job) -> List[Tuple[str, Dict[str, Any]]]:
    """(algo, {rule_rate_sft, rule_rate_final, ...}) per step-3 algorithm of a pipeline job:
    ``pipeline.algo`` and each of ``pipeline.compare`` (summary ``by_algo``); a job that wrote no
    summary gives one empty row per algorithm it was to run."""
    by_algo = (job.summary or {}).get("by_algo")
    if isinstance(by_algo, dict) and by_algo:
        return list(by_algo.items())
    algos = [str(job.get("pipeline.algo")), *map(str, job.get("pipeline.compare", None) or [])]
    return [(a, {k: job.metric(k) for k in ("rule_rate_sft", "rule_rate_final", "rule_rate_sampled_sft",
                                            "rule_rate_sampled_final")} if a == algos[0] else {})
            for a in dict.fromkeys(algos)]


def robustness_rows(jobs: Sequence[Job]) -> Tuple[List[str], List[List[Any]]]:
    """Per pipeline run and step-3 algorithm: SFT -> final rule rates (greedy, sampled), their
    change, and the change of the trained model before ``ppo/dpo.delta_scale`` (the exported
    final model is start + delta_scale x (trained - start)); per algo the median and the min of
    every number over its ok runs."""
    import statistics

    header = ["algo", "seed", "threads"]
    for label, _ in ROBUSTNESS_RATES:
        header += [f"{label} before", f"{label} after", f"{label} change", f"{label} change, trained"]
    header.append("status")
    per_algo: Dict[str, List[List[Any]]] = {}
    for job in sorted(jobs, key=lambda j: (j.get("seed", 0), j.get("hardware.threads", 0))):
        for algo, res in _algo_results(job):
            row: List[Any] = [algo, job.get("seed"), job.get("hardware.threads")]
            for _, key in ROBUSTNESS_RATES:
                before, after = res.get(f"{key}_sft"), res.get(f"{key}_final")
                trained = res.get(f"{key}_trained", after)
                row += [before, after, *(x - before if before is not None and x is not None else None
                                         for x in (after, trained))]
            status = status_cell(job) if res or not job.ok else "not run"
            per_algo.setdefault(algo, []).append(row + [status])
    out: List[List[Any]] = []
    for algo, rows in sorted(per_algo.items()):
        out += rows
        for name, agg in (("median", statistics.median), ("min", min)):
            cells = []
            for i in range(3, len(header) - 1):
                vals = [r[i] for r in rows if r[-1] == "ok" and isinstance(r[i], float)]
                cells.append(agg(vals) if vals else None)
            out.append([algo, name, f"{sum(r[-1] == 'ok' for r in rows)} runs", *cells, ""])
    return header, out


TABLES: Dict[str, Optional[List[Column]]] = {
    "zero_offload": ZERO_OFFLOAD,
    "lora_rank": LORA_RANK,
    "dschat_e2e": None,  # a pivot (rows per setup), not one row per job
    "largest_model": None,  # a pivot (rows per hardware) of stage=plan jobs
    "robustness": None,  # rows per run plus median/min rows per algo
    "generic": None,  # columns depend on what was swept
}


def table_rows(name: str, jobs: Sequence[Job]) -> Tuple[List[str], List[List[Any]]]:
    if name == "dschat_e2e":
        return dschat_e2e_rows(jobs)
    if name == "largest_model":
        return largest_model_rows(jobs)
    if name == "robustness":
        return robustness_rows(jobs)
    columns = TABLES.get(name) or generic_columns(jobs)
    return [h for h, _ in columns], [[fn(j) for _, fn in columns] for j in jobs]


# ---------------------------------------------------------------- writers


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"
    return str(v)


def write_markdown(path: Path, title: str, header: List[str], rows: List[List[Any]], notes: List[str]) -> None:
    esc = lambda s: fmt(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    lines += ["", *notes] if notes else []
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, header: List[str], rows: List[List[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[fmt(c) for c in row] for row in rows])


def write_jobs_csv(path: Path, jobs: Sequence[Job]) -> None:
    keys = sorted({k for j in jobs for k, v in (j.summary or {}).items() if not isinstance(v, (dict, list))})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "dir", "overrides", "status", *keys])
        for j in jobs:
            w.writerow([j.num, j.dir.name, " ".join(j.overrides), j.status,
                        *[fmt((j.summary or {}).get(k)) for k in keys]])


def write_plot(path: Path, title: str, header: List[str], rows: List[List[Any]], name: str) -> None:
    """Bars of the table's time and memory columns; failed / OOM rows are marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name == "dschat_e2e":
        panels = [("hours per step", [h for h in header if h.startswith("step")])]
        labels = [str(r[0]) for r in rows]
    elif name == "largest_model":
        panels = [("largest actor (B params)", ["params B"])]
        labels = [str(r[0]) for r in rows]
    elif name == "robustness":
        panels = [("sampled rule rate change (held-out)", ["sampled change"]),
                  ("greedy rule rate change (held-out)", ["greedy change"])]
        labels = [f"{r[0]} seed={r[1]} threads={r[2]}" if isinstance(r[1], int) else f"{r[0]} {r[1]}" for r in rows]
    else:
        wanted = ["s/sample", "GPU mem GB", "host mem GB", "objective", "trainable params"]
        present = [h for h in wanted if h in header and any(isinstance(r[header.index(h)], (int, float))
                                                           and not isinstance(r[header.index(h)], bool)
                                                           for r in rows)]
        panels = [(h, [h]) for h in present[:2]] or [("s/sample", ["s/sample"])]
        labels = _row_labels(header, rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.45 * max(len(rows), 3) + 1.5),
                             squeeze=False)
    for ax, (ptitle, cols) in zip(axes[0], panels):
        left = [0.0] * len(rows)
        for col in cols:
            vals = [r[header.index(col)] for r in rows]
            nums = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0 for v in vals]
            ax.barh(range(len(rows)), nums, left=left, label=col)
            left = [a + b for a, b in zip(left, nums)]
        for i, r in enumerate(rows):
            failed = [r[header.index(c)] for c in cols if isinstance(r[header.index(c)], str)
                      and r[header.index(c)] not in ("", "not run")]
            if failed:
                ax.text(0, i, f" {failed[0]}", va="center", color="red", fontweight="bold")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(ptitle)
        if len(cols) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RESULT_COLUMNS = {"status", "s/sample", "hours/epoch", "minutes/epoch", "GPU mem GB", "host mem GB", "objective",
                  "wall time s", "trainable params", "params", "job"}


def _row_labels(header: List[str], rows: List[List[Any]]) -> List[str]:
    """Each row named by the settings that differ between rows ("ZeRO stage=3 batch size=8")."""
    cols = [i for i, h in enumerate(header) if h not in RESULT_COLUMNS and len({fmt(r[i]) for r in rows}) > 1]
    labels = []
    for n, r in enumerate(rows):
        text = " ".join(f"{header[i]}={fmt(r[i])}" for i in cols) or f"job {n}"
        labels.append(text if len(text) <= 60 else text[:57] + "...")
    return labels


# ---------------------------------------------------------------- entry points


def sweep_hydra(sweep_dir: Path) -> Dict[str, Any]:
    """The multirun's ``hydra`` config: multirun.yaml (basic sweeper), else a job's .hydra/hydra.yaml (Optuna)."""
    multirun = _load_yaml(Path(sweep_dir) / "multirun.yaml")
    if not multirun:
        first = next(iter(sorted(Path(sweep_dir).rglob(".hydra/hydra.yaml"))), None)
        multirun = _load_yaml(first) if first else None
    return (multirun or {}).get("hydra", {}) or {}


def sweep_name(sweep_dir: Path) -> Optional[str]:
    """The sweep or search this multirun ran (``sweep=zero_offload`` -> zero_offload)."""
    choices = (sweep_hydra(sweep_dir).get("runtime", {}) or {}).get("choices", {}) or {}
    return choices.get("sweep") or choices.get("hparams_search")


def infer_table(sweep_dir: Path) -> str:
    """The sweep's own layout when it has one, else generic."""
    name = sweep_name(sweep_dir)
    return name if name in TABLES else "generic"


def write_best(sweep_dir: Path, jobs: Sequence[Job]) -> Optional[Dict[str, Any]]:
    """best.json and best_config.yaml: the job with the best numeric objective (the sweeper's direction)."""
    scored = [j for j in jobs if j.ok and isinstance((j.summary or {}).get("objective"), (int, float))]
    if not scored:
        return None
    direction = str((sweep_hydra(sweep_dir).get("sweeper", {}) or {}).get("direction", "maximize"))
    pick = min if "min" in direction else max
    best = pick(scored, key=lambda j: float(j.summary["objective"]))
    out = {"objective": best.summary["objective"], "direction": direction, "job": best.num,
           "dir": str(best.dir), "overrides": best.overrides}
    (Path(sweep_dir) / "best.json").write_text(json.dumps(out, indent=2) + "\n")
    if (best.dir / "config.yaml").is_file():
        shutil.copyfile(best.dir / "config.yaml", Path(sweep_dir) / "best_config.yaml")
    return out


def collect(sweep_dir: str | Path, table: str = "auto", out_dir: str | Path | None = None) -> Dict[str, Any]:
    """Write table.md, table.csv, table.png and jobs.csv for the multirun in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job directories (with .hydra/overrides.yaml) found")
    name = infer_table(sweep_dir) if table == "auto" else table
    if name not in TABLES:
        raise ValueError(f"table must be auto or one of {', '.join(TABLES)}; got {name!r}")
    header, rows = table_rows(name, jobs)
    failed = [j for j in jobs if not j.ok]
    notes = [f"{len(jobs)} jobs, {len(jobs) - len(failed)} ok, {len(failed)} not ok. "
             "hours/epoch = the stage's epoch size / measured samples/s (few-step runs extrapolate); "
             "memory is the peak of the job's process (GPU: torch's max allocated)."]
    expected = [p for p in sorted((Path(__file__).parent / "expected").glob(f"{sweep_name(sweep_dir) or name}.*"))]
    if expected:
        notes.append("Published numbers for comparison: " + ", ".join(f"sweeps/expected/{p.name}" for p in expected))
    if name == "robustness":
        notes[0] = (f"{len(jobs)} runs, {len(jobs) - len(failed)} ok. Held-out demo rule rates: before = the SFT "
                    "model, after = each step-3 algorithm's exported model (pipeline.algo and pipeline.compare, all "
                    "from the same SFT model of a run: start + ppo/dpo.delta_scale x (trained - start)); 'change, "
                    "trained' = the trained model's change before delta_scale; greedy = one answer per prompt, "
                    "sampled = data.heldout_samples answers per prompt at temperature 1.")
    if name == "dschat_e2e":
        notes.append("Each step's hours = its epoch size x epochs / its measured samples/s; "
                     "'not run' = a step the job did not run (pipeline.steps).")
    title = f"{sweep_name(sweep_dir) or name} — {sweep_dir.name}"
    write_markdown(out / "table.md", title, header, rows, notes)
    write_csv(out / "table.csv", header, rows)
    write_jobs_csv(out / "jobs.csv", jobs)
    write_plot(out / "table.png", title, header, rows, name)
    best = write_best(sweep_dir, jobs)
    log.info("collected %d jobs of %s into %s (table %s)", len(jobs), sweep_dir, out, name)
    return {"table": name, "jobs": len(jobs), "failed": len(failed), "header": header, "rows": rows,
            "best": best}


class CollectTables(Callback):
    """Hydra callback: collect the sweep's table when a multirun ends (any sweeper, any launcher)."""

    def __init__(self, table: str = "auto") -> None:
        self.table = table

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            result = collect(sweep_dir, self.table)
            log.info("sweep table: %s (%d jobs, %d not ok)", sweep_dir / "table.md", result["jobs"], result["failed"])
        except Exception:  # a finished sweep must not fail because its table could not be written
            log.exception("could not collect the sweep table of %s", sweep_dir)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--table", default="auto", choices=["auto", *TABLES])
    parser.add_argument("--out", default=None, help="where to write (default: the sweep dir)")
    args = parser.parse_args(argv)
    collect(args.sweep_dir, args.table, args.out)
    print((Path(args.out or args.sweep_dir) / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
