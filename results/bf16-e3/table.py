#!/usr/bin/env python3
"""The table of results/bf16-e3/README.md from the run folders (runs/bf16/PRECISION-sSEED)."""
import json
import statistics
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bf16")
# Seeds whose two runs both finished (the sweep script marks each with DONE).
seeds = sorted({p.name.split("-s")[-1] for p in runs.iterdir() if (p / "DONE").is_file()}, key=int)
seeds = [s for s in seeds if all((runs / f"{p}-s{s}" / "DONE").is_file() for p in ("f32", "bf16-mixed"))]


def events(precision, seed):
    lines = (runs / f"{precision}-s{seed}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def scores(evs):
    last = [e for e in evs if e["event"] in ("knn", "evaluation")]  # "knn" before session 13[-1]
    return [last["linear"], last["knn"]["20"], last["knn"]["200"]]


def losses(evs):
    return [e["loss"] for e in evs if e["event"] == "step"]


rows, diffs, gaps = {}, [], []
for seed in seeds:
    f32, bf16 = events("f32", seed), events("bf16-mixed", seed)
    rows.setdefault("f32", []).append(scores(f32))
    rows.setdefault("bf16-mixed", []).append(scores(bf16))
    diffs.append([100 * (b - a) for a, b in zip(scores(f32), scores(bf16))])
    la, lb = losses(f32), losses(bf16)
    gaps.append((abs(la[0] - lb[0]), max(abs(a - b) for a, b in zip(la[:10], lb[:10])),
                 statistics.mean(la[-50:]), statistics.mean(lb[-50:])))

ms = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
pm = lambda xs: f"{statistics.mean(xs):+.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:+.2f}"
print(f"| precision | linear probe | kNN k=20 | kNN k=200 |  ({len(seeds)} seeds: mean ± sd)")
print("|---|---|---|---|")
for name, r in rows.items():
    print(f"| {name} | " + " | ".join(ms([x[i] for x in r]) for i in range(3)) + " |")
print(f"| bf16-mixed minus f32 (points) | " + " | ".join(pm([d[i] for d in diffs]) for i in range(3)) + " |")
print()
print("| seed | step-0 loss gap | largest gap, steps 0-9 | mean loss, last 50 steps: f32 | bf16-mixed |")
print("|---|---|---|---|---|")
for seed, g in zip(seeds, gaps):
    print(f"| {seed} | {g[0]:.2e} | {g[1]:.2e} | {g[2]:.4f} | {g[3]:.4f} |")
