"""PyTorch reference for `dcl bench loss --pytorch`: lightly's DCLLoss forward + backward on the CPU, for the
same N x D as the Rust bench. Prints one JSON array of {"n", "d", "path", "ms", "peak_bytes"}.
Not a runtime dependency: pip install torch lightly (lightly with --no-deps)."""
import argparse
import json
import time

import torch
from lightly.loss import DCLLoss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="256,1024,4096,8192")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    loss = DCLLoss(temperature=0.1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        z1 = (torch.rand(n, args.d, generator=gen) * 2 - 1).requires_grad_()
        z2 = (torch.rand(n, args.d, generator=gen) * 2 - 1).requires_grad_()
        times = []
        for rep in range(args.reps + 1):
            start = time.perf_counter()
            loss(z1, z2).backward()
            if rep:  # the first run warms up
                times.append((time.perf_counter() - start) * 1e3)
            z1.grad = z2.grad = None
        times.sort()
        rows.append({"n": n, "d": args.d, "path": "pytorch-cpu", "ms": times[len(times) // 2],
                     "peak_bytes": None, "threads": torch.get_num_threads()})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
