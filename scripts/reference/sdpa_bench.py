#!/usr/bin/env python3
"""PyTorch SDPA attention on the shapes of mor's attention benchmark (cuda_parity `bench`).

Causal self-attention, batch 8 x 2048 tokens, 15 query / 5 kv heads (SmolLM-360M), head_dim 64,
bf16, through torch.nn.functional.scaled_dot_product_attention with the flash backend, the cuDNN
backend and PyTorch's own choice (GQA via enable_gqa when available, else K/V repeated outside the
timed region). FLOPs counted as mor does:
forward 4 * L^2/2 * hd per head and sequence, backward 2.5x that.

    python3 scripts/reference/sdpa_bench.py [--json]
"""
import argparse
import contextlib
import json

import torch
import torch.nn.functional as F


def median_ms(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=15)
    ap.add_argument("--kv-heads", type=int, default=5)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(a.batch, a.heads, a.seq, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    try:
        F.scaled_dot_product_attention(q[:1, :, :8], k[:1, :, :8], v[:1, :, :8], is_causal=True, enable_gqa=True)
        gqa = {"enable_gqa": True}
        kk, vv = k, v
    except TypeError:
        gqa = {}
        rep = a.heads // a.kv_heads
        kk = k.detach().repeat_interleave(rep, 1).requires_grad_()
        vv = v.detach().repeat_interleave(rep, 1).requires_grad_()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f_fwd = a.batch * 4.0 * a.seq * a.seq / 2.0 * a.head_dim * a.heads
    # The flash backend (FlashAttention-2), cuDNN's, and what PyTorch picks by itself (on an H200
    # with torch 2.11 the model references get cuDNN's kernels).
    backends = [("flash", [SDPBackend.FLASH_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("default", None)]
    results = []
    for name, which in backends:
        ctx = sdpa_kernel(which) if which else contextlib.nullcontext()
        try:
            with ctx:
                fwd = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, **gqa)
                out = fwd()
                g = torch.randn_like(out)
                fwd_ms = median_ms(lambda: fwd())

                def fwd_bwd():
                    o = fwd()
                    torch.autograd.grad(o, (q, kk, vv), g)

                fb_ms = median_ms(fwd_bwd)
        except RuntimeError as e:
            print(f"  SDPA {name}: not available here ({str(e).splitlines()[0][:120]})")
            continue
        bwd_ms = fb_ms - fwd_ms
        res = {
            "backend": name,
            "torch": torch.__version__,
            "fwd_ms": fwd_ms,
            "bwd_ms": bwd_ms,
            "fwd_bwd_ms": fb_ms,
            "fwd_tflops": f_fwd / fwd_ms / 1e9,
            "bwd_tflops": 2.5 * f_fwd / bwd_ms / 1e9,
            "fwd_bwd_tflops": 3.5 * f_fwd / fb_ms / 1e9,
        }
        results.append(res)
        if not a.json:
            print(
                f"  SDPA {name} (torch {res['torch']}), {a.batch}x{a.seq} causal, {a.heads}/{a.kv_heads} heads, "
                f"hd {a.head_dim}:\n    fwd {fwd_ms:.3f} ms, {res['fwd_tflops']:.1f} TFLOP/s; bwd {bwd_ms:.3f} ms, "
                f"{res['bwd_tflops']:.1f} TFLOP/s; fwd+bwd {fb_ms:.3f} ms, {res['fwd_bwd_tflops']:.1f} TFLOP/s"
            )
    if a.json:
        print(json.dumps(results))

if __name__ == "__main__":
    main()
