#!/usr/bin/env python3
"""Where the PyTorch reference's training step spends its GPU time (run on the GPU machine).

Builds the model of torch_reference.py, warms it up (torch.compile included), profiles a few
steps with torch.profiler and prints the GPU time per kernel and per category (GEMM, attention,
Triton fusions, optimizer, other), per step, to set beside `mor bench train --profile-steps`.

  python3 scripts/bench/torch_profile.py --model mor-ec3 --compile [--dtype amp]
  python3 scripts/bench/torch_profile.py --model mor-ec3 --tiny --device cpu --batch 2 --seq 64   # smoke test
"""
import argparse
import contextlib
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import SIZES, build  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["vanilla", "mor-ec3"], default="mor-ec3")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", choices=["bf16", "amp"], default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--top", type=int, default=30, help="kernels listed")
    args = ap.parse_args()

    s = SIZES["tiny" if args.tiny else "360m"]
    dev = torch.device(args.device)
    amp = args.dtype == "amp"
    torch.manual_seed(0)
    model, step_loss = build(args, s, dev, torch.float32 if amp else torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=dev.type == "cuda")
    run = torch.compile(model) if args.compile else model
    gen = torch.Generator(device="cpu").manual_seed(1)

    def step():
        x = torch.randint(0, s["vocab"], (args.batch, args.seq), generator=gen).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = step_loss(run, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()

    # Device kernels only (not the CPU-side ops that launch them).
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
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
