#!/usr/bin/env python3
"""Where the PyTorch reference's training step spends its GPU time (run on the GPU machine).

Builds the model of torch_reference.py, warms it up (torch.compile included), profiles a few
steps with torch.profiler and prints the GPU time per kernel and per category (GEMM, attention,
Triton fusions, optimizer, other), per step, to set beside `mor bench train --profile-steps`.

  python3 scripts/bench/torch_profile.py --model mor-ec3 --compile [--dtype amp]
  python3 scripts/bench/torch_profile.py --model mor-ec3 --tiny --device cpu --batch 2 --seq 64   # smoke test
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import model_args, setup  # noqa: E402


def category(name):
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "cublas" in n or "sm90_xmma" in n or "nvjet" in n or "matmul" in n:
        return "GEMM"
    if "adam" in n or "multi_tensor" in n or "foreach" in n or "norm_kernel" in n:
        return "optimizer / grad norm"
    if n.startswith("triton") or "triton" in n:
        return "Triton fusions"
    if "elementwise" in n or "vectorized" in n or "reduce" in n or "copy" in n or "fill" in n:
        return "aten elementwise / reductions"
    if "index" in n or "scatter" in n or "gather" in n or "sort" in n or "topk" in n or "radix" in n:
        return "index / scatter / gather / top-k"
    return "other"


def gemm_shapes(prof, steps, top):
    """GEMMs by operand shapes, to set beside the per-shape table of `mor bench train --profile-steps`."""
    gemm_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in gemm_ops:
            t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            rows.append((t, e.count, e.key, e.input_shapes))
    per = steps * 1e3
    print(f"\nGEMM ops by input shapes (device time), {sum(r[0] for r in rows) / per:.1f} ms per step")
    for t, n, key, shapes in sorted(rows, key=lambda r: (-r[0], -r[1]))[:top]:
        print(f"{t / per:8.3f} ms {n / steps:6.0f}x  {key} {shapes}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap, model="mor-ec3")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--top", type=int, default=30, help="kernels listed")
    args = ap.parse_args()

    _, dev, _, next_batch, step = setup(args)
    for _ in range(args.warmup):
        step(next_batch())
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    batches = [next_batch() for _ in range(args.steps)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for x in batches:
            step(x)
        if cuda:
            torch.cuda.synchronize()

    # Device kernels only (not the CPU-side ops that launch them).
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    gemm_shapes(prof, args.steps, args.top)
    if not kernels:
        print("no device kernels recorded (CPU run: the profile is only a smoke test)")
        return
    total = sum(v[0] for v in kernels.values())
    per = args.steps * 1e3  # microseconds -> ms per step
    label = f"torch {args.model} {args.dtype} {'compile' if args.compile else 'eager'}"
    print(f"{label}: {args.batch} x {args.seq}, GPU kernel time {total / per:.1f} ms per step ({args.steps} profiled steps)")
    cats = defaultdict(lambda: [0.0, 0])
    for name, (t, n) in kernels.items():
        c = cats[category(name)]
        c[0] += t
        c[1] += n
    print(f"\n{'category':<36} {'ms/step':>8} {'share':>7} {'kernels/step':>13}")
    for c, (t, n) in sorted(cats.items(), key=lambda x: -x[1][0]):
        print(f"{c:<36} {t / per:8.2f} {100 * t / total:6.1f}% {n / args.steps:13.0f}")
    print(f"\ntop {args.top} kernels")
    for name, (t, n) in sorted(kernels.items(), key=lambda x: -x[1][0])[: args.top]:
        print(f"{t / per:8.2f} ms {n / args.steps:6.0f}x  [{category(name)}] {name[:150]}")


if __name__ == "__main__":
    sys.exit(main())
