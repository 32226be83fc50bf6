#!/usr/bin/env python3
"""Does torch.compile run the same computation as eager for the torch_reference.py models?
(GPU machine.) For one batch and the same weights: loss and gradient norm, eager vs compiled, and
the FLOPs the eager step executes (torch.utils.flop_counter: matmuls and SDPA) against the
accounting that mor and torch_reference.py use for MFU (MOR_SPEC 7.3 + LM head).
  python3 scripts/bench/torch_compile_check.py --model mor-ec3 [--batch 8 --seq 2048]
"""
import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import torch_reference as ref  # noqa: E402


def grad_norm(model):
    return torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()


def step(run, model, step_loss, x):
    model.zero_grad(set_to_none=True)
    loss = step_loss(run, x)
    loss.backward()
    torch.cuda.synchronize()
    return loss.item(), grad_norm(model)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["vanilla", "mor-ec3"], default="mor-ec3")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--no-compile", action="store_true", help="only count the eager step's FLOPs")
    args = ap.parse_args()
    s = ref.SIZES["360m"]
    torch.manual_seed(0)
    model, step_loss = ref.build(args, s, torch.device("cuda"), torch.bfloat16)
    x = torch.randint(0, s["vocab"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).cuda()
    le, ge = step(model, model, step_loss, x)
    # GEMM FLOPs only: the counter's SDPA formula rejects grouped-query shapes, and it would count
    # the full (non-causal) score matrix anyway.
    aten = torch.ops.aten
    sdpa = [getattr(aten, n) for n in dir(aten) if n.startswith("_scaled_dot_product") or n.startswith("_flash_attention")
            or n.startswith("_efficient_attention")]
    with FlopCounterMode(display=False, custom_mapping={op: (lambda *a, **k: 0) for op in sdpa}) as fc:
        step(model, model, step_loss, x)
    tokens = args.batch * args.seq
    counted = fc.get_total_flops() / tokens
    # The accounting without its attention term: 3 x (Σ_layers 2·(4d² + 3·d·di)·c + LM head 2·d·V).
    d, di, n, v = s["d"], s["inter"], s["layers"], s["vocab"]
    caps = [1.0] * n if args.model == "vanilla" else [1.0] + [1.0] * 10 + [2 / 3] * 10 + [1 / 3] * 10 + [1.0]
    acct = 3.0 * (sum(2.0 * (4 * d * d + 3 * d * di) * c for c in caps) + 2.0 * d * v)
    # The same with the real q/k/v/o sizes (k and v project to kv·hd, not d).
    qkvo = 2 * d * d + 2 * d * s["kv"] * s["hd"]
    real = 3.0 * (sum(2.0 * (qkvo + 3 * d * di) * c for c in caps) + 2.0 * d * v)
    print(f"{args.model}: eager loss {le:.6f} |g| {ge:.6f}; executed GEMM FLOPs/token {counted / 1e9:.3f}G; "
          f"accounting's GEMM part {acct / 1e9:.3f}G (with GQA-sized k/v {real / 1e9:.3f}G)")
    if args.no_compile:
        return
    run = torch.compile(model)
    t = time.time()
    lc, gc = step(run, model, step_loss, x)
    print(f"{args.model}: compiled loss {lc:.6f} |g| {gc:.6f} (compile + first step {time.time() - t:.1f}s); "
          f"loss rel diff {abs(lc - le) / abs(le):.2e}, |g| rel diff {abs(gc - ge) / abs(ge):.2e}")
    for name, r in (("eager", model), ("compiled", run)):
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            step(r, model, step_loss, x)
            ts.append(time.perf_counter() - t)
        print(f"  {name}: forward + backward {sorted(ts)[2] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
