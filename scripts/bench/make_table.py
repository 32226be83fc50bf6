#!/usr/bin/env python3
"""Markdown tables from the JSON lines of `mor bench train --json` and torch_reference.py --json.

  python3 scripts/bench/make_table.py results.jsonl > table.md
"""
import json
import sys


def gib(x):
    return "-" if x is None else f"{x:.1f} GiB"


def main():
    recs = []
    for path in sys.argv[1:]:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    if not recs:
        print("no results")
        return
    gpu = next((r.get("gpu") for r in recs if r.get("gpu")), "GPU")
    print(f"Training throughput on {gpu}, median step after warm-up (random tokens; forward, backward, "
          "grad clipping 1.0, AdamW). MFU = tokens/s x train FLOPs per token / 989 TFLOP/s (dense bf16 peak).\n")
    print("| implementation | model | precision | batch x seq | step (ms) | tokens/s | MFU | peak memory | vs PyTorch eager |")
    print("|---|---|---|---|---|---|---|---|---|")

    def model_of(r):
        if r["impl"] == "torch":
            return {"vanilla": "360M vanilla", "hf-vanilla": "360M vanilla", "mor-ec3": "360M MoR-E3"}.get(r["model"], r["model"])
        c = r.get("config", "")
        return {"360m-vanilla": "360M vanilla", "360m-mor-ec3": "360M MoR-E3"}.get(c, c)

    eager = {}
    for r in recs:
        if r["impl"] == "torch" and not r.get("compile") and r.get("dtype", "bf16") == "bf16":
            eager[(model_of(r), r["micro_batch"], r["seq_len"])] = r["tokens_per_s"]
    order = sorted(recs, key=lambda r: (model_of(r), r["impl"] != "torch", r.get("dtype", ""), r.get("compile", False), r.get("gemm", "")))
    for r in order:
        m = model_of(r)
        if r["impl"] == "torch":
            impl = f"PyTorch {r.get('torch', '')} {'torch.compile' if r.get('compile') else 'eager'}, SDPA" + {
                "vanilla": " (compact Llama)",
                "hf-vanilla": " (HF transformers Llama: masked attention under torch.compile)",
            }.get(r["model"], " (compact MoR re-implementation)")
            prec = "fp32 weights, bf16 autocast" if r.get("dtype") == "amp" else "bf16 weights + activations"
            mem = f"{gib(r.get('max_allocated_gib'))} alloc / {gib(r.get('peak_mem_gib'))} device"
        else:
            impl = "mor (Rust, CUDA)" + (", --deterministic" if r.get("deterministic") else "")
            prec = "fp32, SGEMM" if r.get("gemm") == "f32" else "bf16 activations, fp32 weights + residual stream, bf16 GEMM + attention (fp32 acc.)"
            mem = f"{gib(r.get('peak_mem_gib'))} device"
        base = eager.get((m, r["micro_batch"], r["seq_len"]))
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {impl} | {m} | {prec} | {r['micro_batch']} x {r['seq_len']} | {r['step_ms_median']:.0f} | "
              f"{r['tokens_per_s'] / 1e3:.1f}K | {100 * r['mfu']:.1f}% | {mem} | {rel} |")

    for r in recs:
        ops = r.get("ops") or []
        if not ops:
            continue
        gemms = sorted((o for o in ops if o["op"].startswith("detail: ")), key=lambda o: -o["ms_per_step"])
        ops = [o for o in ops if not o["op"].startswith("detail: ")]
        cats = {}
        for o in ops:
            c = cats.setdefault(o["category"], [0.0, 0.0])
            c[0] += o["ms_per_step"]
            c[1] += o["share"]
        print(f"\nTime per op category, {model_of(r)}, {r.get('gemm')} GEMMs "
              f"({r.get('profile_steps')} profiled steps of {r.get('profile_step_ms', 0):.0f} ms; GPU time per op from "
              f"CUDA events, the GPU's waiting between ops as its own row):\n")
        print("| category | ms/step | share |")
        print("|---|---|---|")
        for k, (ms, share) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
            print(f"| {k} | {ms:.1f} | {100 * share:.1f}% |")
        top = sorted((o for o in ops if not o["op"].startswith("(")), key=lambda o: -o["ms_per_step"])[:8]
        print("\nTop ops: " + ", ".join(f"{o['op']} {o['ms_per_step']:.1f} ms ({100 * o['share']:.0f}%)" for o in top))
        if gemms:
            print(f"\nbf16 GEMMs by shape (cuBLASLt column-major view), {sum(o['ms_per_step'] for o in gemms):.1f} ms/step:\n")
            print("| ms/step | calls/step | shape |")
            print("|---|---|---|")
            for o in gemms[:16]:
                print(f"| {o['ms_per_step']:.2f} | {o['calls_per_step']:.0f} | {o['op'][len('detail: '):]} |")


if __name__ == "__main__":
    main()
