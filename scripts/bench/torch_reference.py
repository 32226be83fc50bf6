#!/usr/bin/env python3
"""PyTorch training-throughput reference for `mor bench train` (run on the GPU machine).

Models (same shapes as the mor presets):
  vanilla  a compact Llama (360M: SmolLM-360M dims, tied embeddings), the layers of mor-ec3 below,
           causal SDPA (is_causal=True).
  hf-vanilla  Hugging Face transformers LlamaForCausalLM with attn_implementation="sdpa". Under
           torch.compile, transformers materialises the causal mask (no is_causal skip while
           tracing), so SDPA runs masked full attention: about 2.4x the causal attention time
           (torch.profiler, H200). Kept to show that; `vanilla` is the speed reference.
  mor-ec3  a compact re-implementation of MoR expert-choice, N_r = 3, middle-cycle sharing,
           recursion-wise KV (MOR_SPEC Appendix A): unique first layer, 3 recursion steps over one
           shared 10-layer block, unique last layer; per step a Linear(d->1) router,
           g = 0.1 * sigmoid(logit), per-sequence top-k with k = floor(c_r * L) for
           c = 1, 2/3, 1/3, selected tokens kept in original order, causal SDPA among them with
           RoPE at their original positions, h[S] += g_k * block(h[S]); BCE aux loss 0.001.

One training step = forward, cross-entropy (+ aux), backward, grad clipping (1.0), fused AdamW.
Weights and activations in bf16 (as in ../../docs GPU figures), logits upcast to fp32 for the loss;
--dtype amp: mor's recipe instead, fp32 weights, optimizer state and residual stream with the
GEMMs and attention in bf16 (torch.autocast).
Timing: torch.cuda.synchronize() around each step, median over --steps after --warmup steps.

  python3 scripts/bench/torch_reference.py --model vanilla --batch 8 --seq 2048 [--compile]
  python3 scripts/bench/torch_reference.py --model mor-ec3 --tiny --device cpu --batch 2 --seq 64 --steps 2   # smoke test

--json FILE appends one JSON line per run (read by scripts/bench/make_table.py).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {
    # vocab, d, layers, heads, kv heads, head dim, intermediate, max len
    "360m": dict(vocab=49152, d=960, layers=32, heads=15, kv=5, hd=64, inter=2560, max_len=2048),
    "tiny": dict(vocab=512, d=64, layers=8, heads=4, kv=2, hd=16, inter=192, max_len=256),
}


def layer_flops(d, di, L, c):
    return 2.0 * (4 * d * d + 3 * d * di) * c + 2.0 * L * d * c * c


def train_flops_per_token(s, model, L):
    """Same formula as mor_config::accounting::train_flops_per_token (MOR_SPEC 7.3 + LM head)."""
    d, di, n = s["d"], s["inter"], s["layers"]
    if model in ("vanilla", "hf-vanilla"):
        caps = [1.0] * n
    else:
        base = (n - 2) // 3
        caps = [1.0] + [1.0] * base + [2.0 / 3.0] * base + [1.0 / 3.0] * base + [1.0]
    fwd = sum(layer_flops(d, di, L, c) for c in caps)
    return 3.0 * (fwd + 2.0 * d * s["vocab"])


# ---- compact Llama pieces (for the MoR model) ---------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.h, self.kv, self.hd = s["heads"], s["kv"], s["hd"]
        d = s["d"]
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        # x [B, T, d]; cos/sin [B or 1, 1, T, hd] at the tokens' original positions.
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.gate_proj = nn.Linear(s["d"], s["inter"], bias=False)
        self.up_proj = nn.Linear(s["d"], s["inter"], bias=False)
        self.down_proj = nn.Linear(s["inter"], s["d"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.input_layernorm = RMSNorm(s["d"])
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s["d"])
        self.mlp = MLP(s)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class CompactLM(nn.Module):
    """Embedding, RoPE tables, final norm, tied LM head and the loss shared by the compact models."""

    def __init__(self, s, theta=10000.0):
        super().__init__()
        self.s = s
        self.embed_tokens = nn.Embedding(s["vocab"], s["d"])
        self.norm = RMSNorm(s["d"])
        hd = s["hd"]
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        t = torch.arange(s["max_len"], dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def rope(self, T, dt):
        return self.cos_cache[:T].to(dt), self.sin_cache[:T].to(dt)

    def loss(self, h, labels):
        logits = F.linear(self.norm(h), self.embed_tokens.weight)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


class Llama(CompactLM):
    """Llama with tied embeddings: the vanilla baseline."""

    def __init__(self, s):
        super().__init__(s)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s["layers"]))
        self.init_weights()

    def forward(self, ids, labels):
        h = self.embed_tokens(ids)
        cos, sin = self.rope(ids.shape[1], h.dtype)
        for layer in self.layers:
            h = layer(h, cos[None, None], sin[None, None])
        return self.loss(h, labels)


class MoRExpertChoice(CompactLM):
    """MoR expert-choice, middle-cycle, N_r recursions (MOR_SPEC 3.5 / Appendix A)."""

    def __init__(self, s, n_r=3, alpha=0.1, aux_coeff=0.001):
        super().__init__(s)
        self.n_r, self.alpha, self.aux_coeff = n_r, alpha, aux_coeff
        base = (s["layers"] - 2) // n_r
        self.first = Layer(s)
        self.block = nn.ModuleList(Layer(s) for _ in range(base))
        self.last = Layer(s)
        self.routers = nn.ModuleList(nn.Linear(s["d"], 1, bias=False) for _ in range(n_r))
        self.caps = [(n_r - r) / n_r for r in range(n_r)]
        self.init_weights()

    def forward(self, ids, labels):
        B, T = ids.shape
        d = self.s["d"]
        h = self.embed_tokens(ids)
        cos, sin = self.rope(T, h.dtype)
        h = self.first(h, cos[None, None], sin[None, None])
        S = torch.arange(T, device=ids.device).expand(B, T)
        aux = 0.0
        for r in range(self.n_r):
            X = torch.gather(h, 1, S[..., None].expand(-1, -1, d))
            logit = self.routers[r](X).squeeze(-1)
            g = self.alpha * torch.sigmoid(logit)
            k = max(1, int(math.floor(self.caps[r] * T)))
            _, top = torch.topk(g, k, dim=1)
            idx, _ = torch.sort(top, dim=1)
            gk = torch.gather(g, 1, idx)
            target = torch.zeros_like(logit).scatter_(1, idx, 1.0)
            aux = aux + F.binary_cross_entropy_with_logits(logit.float(), target.float())
            S = torch.gather(S, 1, idx)
            Y = torch.gather(h, 1, S[..., None].expand(-1, -1, d))
            cs, sn = cos[S][:, None], sin[S][:, None]
            for layer in self.block:
                Y = layer(Y, cs, sn)
            h = h.scatter_add(1, S[..., None].expand(-1, -1, d), gk[..., None] * Y)
        h = self.last(h, cos[None, None], sin[None, None])
        return self.loss(h, labels) + self.aux_coeff * aux


def build(args, s, dev, dtype):
    if args.model == "hf-vanilla":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=s["vocab"],
            hidden_size=s["d"],
            intermediate_size=s["inter"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv"],
            head_dim=s["hd"],
            max_position_embeddings=s["max_len"],
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            use_cache=False,
            attn_implementation="sdpa",
        )
        with torch.device(dev):
            m = LlamaForCausalLM(cfg)
        m = m.to(dtype)

        def step_loss(model, x):
            return model(input_ids=x, labels=x).loss

        return m, step_loss
    with torch.device(dev):
        m = Llama(s) if args.model == "vanilla" else MoRExpertChoice(s)
    m = m.to(dtype)

    def step_loss(model, x):
        return model(x, x)

    return m, step_loss


def model_args(ap, model="vanilla"):
    """The arguments that choose the model, batch and precision (shared with torch_profile.py)."""
    ap.add_argument("--model", choices=["vanilla", "hf-vanilla", "mor-ec3"], default=model)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "amp"], default="bf16",
                    help="bf16 weights and activations, fp32, or amp (fp32 weights, bf16 autocast)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions (smoke test)")


def setup(args):
    """Model, the next random batch, and one training step on a batch (forward, loss, backward,
    clipping, AdamW) for args."""
    s = SIZES["tiny" if args.tiny else "360m"]
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    amp = args.dtype == "amp"
    torch.manual_seed(0)
    model, step_loss = build(args, s, dev, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=dev.type == "cuda")
    run = torch.compile(model) if args.compile else model
    gen = torch.Generator(device="cpu").manual_seed(1)

    def next_batch():
        return torch.randint(0, s["vocab"], (args.batch, args.seq), generator=gen).to(dev)

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = step_loss(run, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return s, dev, model, next_batch, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", help="append the result as a JSON line")
    ap.add_argument("--label")
    args = ap.parse_args()

    t0 = time.time()
    s, dev, model, next_batch, step = setup(args)
    params = sum(p.numel() for p in model.parameters())
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    label = args.label or f"torch {args.model} {args.dtype} sdpa {'compile' if args.compile else 'eager'}"
    print(f"{label}: {params / 1e6:.2f}M parameters, {args.batch} x {args.seq}, built in {time.time() - t0:.1f}s", flush=True)
    times, losses, used_peak = [], [], 0
    for i in range(args.warmup + args.steps):
        x = next_batch()
        if cuda and i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        loss = step(x)
        sync()
        dt = time.perf_counter() - t
        if cuda:
            free, total = torch.cuda.mem_get_info()
            used_peak = max(used_peak, total - free)
        losses.append(float(loss.detach()))
        tag = "(warm-up)" if i < args.warmup else ""
        print(f"  step {i + 1:>3} {tag:<9} {dt * 1e3:9.1f} ms  loss {losses[-1]:.4f}", flush=True)
        if i >= args.warmup:
            times.append(dt)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    tps = tokens / med
    fpt = train_flops_per_token(s, args.model, args.seq)
    mfu = tps * fpt / (args.peak_tflops * 1e12)
    rec = {
        "impl": "torch",
        "label": label,
        "model": args.model,
        "compile": args.compile,
        "dtype": args.dtype,
        "device": str(dev),
        "micro_batch": args.batch,
        "seq_len": args.seq,
        "tokens_per_step": tokens,
        "warmup": args.warmup,
        "steps": args.steps,
        "step_ms_median": med * 1e3,
        "step_ms": [t * 1e3 for t in times],
        "tokens_per_s": tps,
        "train_flops_per_token": fpt,
        "mfu": mfu,
        "peak_tflops": args.peak_tflops,
        "params": params,
        "losses": losses,
        "torch": torch.__version__,
    }
    if cuda:
        rec["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        rec["peak_mem_gib"] = used_peak / 2**30
        rec["gpu"] = torch.cuda.get_device_name()
    mem = ""
    if cuda:
        mem = (
            f"; peak memory {rec['max_allocated_gib']:.2f} GiB allocated, {rec['max_reserved_gib']:.2f} GiB reserved, "
            f"{rec['peak_mem_gib']:.2f} GiB device used"
        )
    print(f"{label}: median step {med * 1e3:.1f} ms, {tps:.0f} tokens/s, MFU {100 * mfu:.2f}% of {args.peak_tflops:g} TFLOP/s{mem}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.exit(main())
