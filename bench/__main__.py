"""``python -m bench [--size smoke|full] [--runs N] [--out DIR]``: ours vs TRL, alternating.

Every (stage, side, run) is its own process (``--worker``), so peak RSS is that run's alone and no
state leaks between sides; the order of the sides flips every run. DPO and step 3 start both sides
from our first SFT run's model; our PPO's critic is our first RM run's model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import workload as W

STAGES = ("sft", "rm", "dpo", "rl")
ROWS = {  # table row: (stage, our variant, counting unit)
    "SFT": ("sft", "ours", "sequences"),
    "RM": ("rm", "ours", "pairs"),
    "DPO": ("dpo", "ours", "pairs"),
    "step 3: ours PPO (GAE + critic) vs TRL RLOO": ("rl", "ours", "answers"),
    "step 3: ours RLOO vs TRL RLOO": ("rl", "ours-rloo", "answers"),
}
QUALITY = {"sft": ("rule_rate", "rule_rate_sampled"), "rm": ("pair_acc",),
           "dpo": ("implicit_acc", "logp_acc", "rule_rate_sampled"), "rl": ("rule_rate", "rule_rate_sampled")}


def worker(spec: dict) -> dict:
    """One (stage, side) run in this process; returns its numbers."""
    from bench import ours, trl_side

    stage, side, size = spec["stage"], spec["side"], W.SIZES[spec["size"]]
    cache, run_dir, deps = Path(spec["cache"]), Path(spec["run_dir"]), spec["deps"]
    if side == "trl":
        out = trl_side.run(stage, size, deps, cache, run_dir)
    else:
        out = ours.run(stage, size, deps, cache, run_dir, variant="rloo" if side == "ours-rloo" else "ppo")
    import torch

    out["torch_threads"] = torch.get_num_threads()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training, before scoring
    out["quality"] = (trl_side if side == "trl" else ours).quality(stage, out, size, cache, deps)
    out.pop("_trainer", None)
    import rlhf

    out["code"] = str(Path(rlhf.__file__).parent)
    return out


def _spawn(spec: dict, log_dir: Path, root: Path | None = None) -> dict:
    """Run one worker process (``root``: where it imports ``rlhf`` and ``bench`` from)."""
    res = log_dir / f"{spec['stage']}-{spec['side']}-{spec['run']}.json"
    root = root or Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    with open(res.with_suffix(".log"), "w") as log:
        proc = subprocess.run([sys.executable, "-m", "bench", "--worker", json.dumps(spec), "--result", str(res)],
                              env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['stage']}/{spec['side']} run {spec['run']} failed; see {res.with_suffix('.log')}")
    return json.loads(res.read_text())


def _fmt(xs, digits=1, unit=""):
    """Median and [min-max] of the runs (the median alone for one run); '-' when there is none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    med = statistics.median(xs)
    return f"{med:.{digits}f}{unit}" + (f" [{min(xs):.{digits}f}-{max(xs):.{digits}f}]" if len(xs) > 1 else "")


def summarise(results: dict) -> tuple[dict, str]:
    """Per row: medians and ranges of each side, the paired ours/TRL ratios per run."""
    rows, lines = {}, []
    head = ("| stage (counted in) | ours samples/s | TRL samples/s | ours/TRL samples/s | ours train tok/s | "
            "TRL train tok/s | ours gen tok/s | TRL gen tok/s | ours/TRL gen tok/s | peak RSS MB ours / TRL | "
            "quality ours vs TRL |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, (stage, side, unit) in ROWS.items():
        ours, trl = results.get(stage, {}).get(side, []), results.get(stage, {}).get("trl", [])
        if not ours or not trl:
            continue
        n = min(len(ours), len(trl))

        def col(runs, key):
            return [r.get(key) for r in runs]

        ratio = [ours[i]["samples_per_s"] / trl[i]["samples_per_s"] for i in range(n)]
        gen_ratio = ([ours[i]["gen_tokens_per_s"] / trl[i]["gen_tokens_per_s"] for i in range(n)]
                     if stage == "rl" else [])
        q = {k: (statistics.median([r["quality"][k] for r in ours if r["quality"].get(k) is not None] or [float("nan")]),
                 statistics.median([r["quality"][k] for r in trl if r["quality"].get(k) is not None] or [float("nan")]))
             for k in QUALITY[stage]}
        rows[label] = {"stage": stage, "ours_side": side, "unit": unit, "ours": ours, "trl": trl,
                       "ratio_samples_per_s": ratio, "ratio_gen_tokens_per_s": gen_ratio,
                       "ratio_median": statistics.median(ratio),
                       "gen_ratio_median": statistics.median(gen_ratio) if gen_ratio else None, "quality": q}
        qtxt = ", ".join(f"{k} {a:.2f} vs {b:.2f}" for k, (a, b) in q.items())
        lines.append(f"| {label} ({unit}) | {_fmt(col(ours, 'samples_per_s'))} | {_fmt(col(trl, 'samples_per_s'))} | "
                     f"{_fmt(ratio, 2, 'x')} | {_fmt(col(ours, 'tokens_per_s'), 0)} | {_fmt(col(trl, 'tokens_per_s'), 0)} | "
                     f"{_fmt(col(ours, 'gen_tokens_per_s'), 0)} | {_fmt(col(trl, 'gen_tokens_per_s'), 0)} | "
                     f"{_fmt(gen_ratio, 2, 'x')} | "
                     f"{_fmt(col(ours, 'peak_rss_mb'), 0)} / {_fmt(col(trl, 'peak_rss_mb'), 0)} | {qtxt} |")
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--size", choices=sorted(W.SIZES), default="full", help="workload size (smoke: ~2 minutes)")
    ap.add_argument("--runs", type=int, default=2, help="alternating runs per side")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of sft,rm,dpo,rl")
    ap.add_argument("--out", default=None, help="output dir (default bench-results/<time>)")
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parent.parent / ".cache"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(json.loads(a.worker))))
        return 0
    try:
        import trl
    except ImportError:
        sys.exit("make bench needs TRL: pip install --no-deps 'trl==1.16.0' (the `bench` extra of pyproject.toml)")
    stages = [s for s in a.stages.split(",") if s]
    out = Path(a.out or f"bench-results/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache)
    deps = {"actor": str(W.policy_dir(cache)), "critic_init": str(W.critic_dir(cache))}
    deps["critic"] = deps["critic_init"]
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=out))
    results: dict = {}
    load0 = os.getloadavg()
    for r in range(a.runs):
        for stage in stages:
            sides = ["ours", "trl"] + (["ours-rloo"] if stage == "rl" else [])
            if r % 2:
                sides.reverse()
            for side in sides:
                spec = {"stage": stage, "side": side, "run": r, "size": a.size, "cache": str(cache),
                        "run_dir": str(work / f"{stage}-{side}-{r}"), "deps": dict(deps)}
                t0 = time.perf_counter()
                res = _spawn(spec, work)
                print(f"run {r} {stage:>3} {side:<9} {res['samples_per_s']:8.1f} samples/s "
                      f"({time.perf_counter() - t0:.0f} s with start-up) quality {res['quality']}", flush=True)
                results.setdefault(stage, {}).setdefault(side, []).append(res)
                if r == 0 and side == "ours" and stage == "sft":
                    deps["actor"] = res["model_dir"]  # DPO and step 3 start from our SFT model (both sides)
                if r == 0 and side == "ours" and stage == "rm":
                    deps["critic"] = res["model_dir"]  # our PPO critic starts from our reward model
    rows, table = summarise(results)
    meta = {"command": " ".join(["python -m bench", *(argv or sys.argv[1:])]), "size": a.size,
            "workload": W.size_dict(a.size), "hyperparameters": W.HP, "threads": W.THREADS, "runs": a.runs,
            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "counting": "samples: sequences (SFT), pairs (RM, DPO), answers (step 3); train tokens: real "
                        "(non-pad) tokens in the training forwards, both answers of a pair; gen tokens: "
                        "answer tokens through the first EOS",
            "timing": "ours: the stage's training loop (no load/tokenise/eval); TRL: Trainer.train() "
                      "on_train_begin..on_train_end (no construction/eval); step 3: whole iterations "
                      "(generation, scoring, updates)"}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    text = (f"`{meta['command']}` ({a.runs} alternating runs per side, median [range]; "
            f"{W.THREADS} torch threads; load average {load0[0]:.1f} -> {meta['loadavg_end'][0]:.1f})\n\n"
            f"{table}\n\nCounting: {meta['counting']}.\nTiming: {meta['timing']}.\n")
    (out / "table.md").write_text(text)
    print(text)
    print(f"results: {out}/bench.json, {out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
