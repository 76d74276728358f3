"""``python -m bench.ab --before <checkout>``: our stages with another checkout's ``rlhf`` (before) and
this one's (after), alternating in separate processes, on the bench workload; prints after/before
samples/s per stage (median and range of the paired ratios). Keeps only speed-ups that measurably help.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench import workload as W
from bench.__main__ import _spawn

HERE = Path(__file__).resolve().parent.parent


def _shim(before: Path) -> Path:
    """A directory whose ``rlhf`` is the other checkout's and whose ``bench`` is this one."""
    shim = Path(tempfile.mkdtemp(prefix="bench-before-"))
    (shim / "rlhf").symlink_to(before.resolve() / "rlhf")
    (shim / "bench").symlink_to(HERE / "bench")
    return shim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    ap.add_argument("--before", required=True, help="checkout whose rlhf/ is the baseline (e.g. the main worktree)")
    ap.add_argument("--size", choices=sorted(W.SIZES), default="medium")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stages", default="sft,rm,dpo,rl")
    ap.add_argument("--out", default="bench-results/ab")
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    a = ap.parse_args(argv)
    out, cache = Path(a.out), Path(a.cache)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=out))
    roots = {"before": _shim(Path(a.before)), "after": HERE}
    deps = {"actor": str(W.policy_dir(cache)), "critic_init": str(W.critic_dir(cache))}
    deps["critic"] = deps["critic_init"]
    res: dict = {}
    for r in range(a.runs):
        for stage in a.stages.split(","):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                spec = {"stage": stage, "side": "ours", "run": f"{side}{r}", "size": a.size, "cache": str(cache),
                        "run_dir": str(work / f"{stage}-{side}-{r}"), "deps": deps}
                got = _spawn(spec, work, root=roots[side])
                print(f"run {r} {stage:>3} {side:<6} {got['samples_per_s']:8.1f} samples/s", flush=True)
                res.setdefault(stage, {}).setdefault(side, []).append(got)
    lines = ["| stage | before samples/s | after samples/s | after/before |", "|---|---|---|---|"]
    for stage, sides in res.items():
        ratio = [x["samples_per_s"] / y["samples_per_s"] for x, y in zip(sides["after"], sides["before"])]
        med = statistics.median
        lines.append(f"| {stage} | {med(s['samples_per_s'] for s in sides['before']):.1f} | "
                     f"{med(s['samples_per_s'] for s in sides['after']):.1f} | "
                     f"{med(ratio):.2f}x [{min(ratio):.2f}-{max(ratio):.2f}] |")
    text = f"`python -m bench.ab --before {a.before} --size {a.size} --runs {a.runs}` ({time.strftime('%H:%M')})\n\n" + "\n".join(lines) + "\n"
    (out / "ab.md").write_text(text)
    (out / "ab.json").write_text(json.dumps(res, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
