#!/usr/bin/env python3
"""Independent PyTorch reference of the mor model family (MOR_SPEC sections 1-5), for parity
checks of mor's forward: logits, cross-entropy and aux losses for the same weights and batch.

Written from ../shared/docs/MOR_SPEC.md, not from mor's Rust code. Where the spec leaves a
choice open, mor's documented choice is followed:
  * parameter names: mor's layout (crates/mor-model/src/weights.rs): `model.layers.{s}` is
    parameter set `s` of the sharing map (Middle variants: 0 = unique first layer, 1..bd the
    shared pool, bd+1 the unique last layer), routers `model.routers.{r}[.fc1|.fc2].weight`,
    untied attention `model.recursions.{r}.layers.{j}.self_attn.*`;
  * W-MLP router hidden width 4d (the paper; the released code uses 2d);
  * capacity rounding `k = clamp(floor(c * L + 1e-9), 1, L)`;
  * expert-choice top-k ties go to the lowest candidate index; token-choice argmax ties to the
    shallowest depth;
  * expert aux BCE and z-loss: per step the mean over all candidates of the batch, summed over
    steps; the training objective adds `aux_coeff * BCE` (sampling = aux_loss) and
    `z_coeff * z`; the token-choice balancing loss and z-loss are over all B*L tokens;
  * capacity warm-up counts training forward calls (`router.forward_calls` of the checkpoint).

The forward is the TRAINING forward (expert-choice: per-sequence top-k over each step's
candidates, MOR_SPEC 3.5). Every sequence is run on its own: a recursion step gathers that
sequence's active tokens, runs the block on them with causal attention among them and RoPE at
their original positions, and scatters back (KV sharing: later recursions attend to the
recursion-1 keys/values of all earlier positions, MOR_SPEC 5.2).

Load: a mor checkpoint (`state.json` + `model.safetensors`, a run directory works too), a
`mor export` folder (config.json with `model_type: "mor"`) or a vanilla export
(`LlamaForCausalLM` config.json).

    python3 scripts/reference/mor_torch.py CHECKPOINT IDS.json [--dtype float64|float32]
        [--device cpu|cuda] [--out OUT.json] [--logits LOGITS.f32]

IDS.json: {"ids": [[t0, ..., tL], ...]}: B rows of L+1 ids; inputs row[:-1], targets row[1:].
Prints (or writes) JSON with loss, ce, aux_bce, aux_router_bce, z_loss, balance_loss, token_ce,
depths, selections; --logits writes all logits as raw little-endian f32 [B*L, vocab].
As a library: `MorReference(path, dtype, device).forward(ids)`.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class ReferenceError_(Exception):
    """A checkpoint or input this reference cannot handle (message says why)."""


# ------------------------------------------------------------------------------------- loading
def read_model(path):
    """(model config dict, router state dict, tensors) of a checkpoint / export folder."""
    if not os.path.isdir(path):
        raise ReferenceError_(f"{path}: not a directory (expected a mor checkpoint, run directory or export folder)")
    for d in (path, os.path.join(path, "checkpoint")):
        state = os.path.join(d, "state.json")
        if os.path.isfile(state):
            with open(state) as f:
                s = json.load(f)
            try:
                cfg = s["config"]["model"]
            except (KeyError, TypeError):
                raise ReferenceError_(f"{state}: no config.model field (not a mor checkpoint?)")
            return cfg, s.get("router") or {}, load_file(os.path.join(d, "model.safetensors"))
    cj = os.path.join(path, "config.json")
    if os.path.isfile(cj):
        with open(cj) as f:
            v = json.load(f)
        if v.get("model_type") == "mor":
            return v["mor_model"], v.get("mor_router_state") or {}, load_file(os.path.join(path, "model.safetensors"))
        if v.get("model_type") == "llama":  # a vanilla export
            cfg = dict(
                vocab_size=v["vocab_size"], hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"],
                num_heads=v["num_attention_heads"], num_kv_heads=v["num_key_value_heads"],
                head_dim=v.get("head_dim") or v["hidden_size"] // v["num_attention_heads"],
                intermediate_size=v["intermediate_size"], rms_norm_eps=v["rms_norm_eps"],
                rope_theta=v.get("rope_theta") or v.get("rope_parameters", {}).get("rope_theta", 10000.0),
                max_seq_len=v["max_position_embeddings"], tie_embeddings=v.get("tie_word_embeddings", True),
                recursion=None, router=None)
            return cfg, {}, load_file(os.path.join(path, "model.safetensors"))
    raise ReferenceError_(f"{path}: no state.json, checkpoint/state.json or config.json")


def param_sets(strategy, num_layers, n_r):
    """Parameter set of every layer position (MOR_SPEC 2.1), numbered as mor names them."""
    if strategy is None:
        return list(range(num_layers)), num_layers
    middle = strategy in ("middle_cycle", "middle_sequence")
    shared = num_layers - 2 if middle else num_layers
    if shared % n_r:
        raise ReferenceError_(f"{num_layers} layers do not split into {n_r} recursions for {strategy}")
    bd = shared // n_r
    sets = []
    for l in range(num_layers):
        if middle and l == 0:
            sets.append(0)
        elif middle and l == num_layers - 1:
            sets.append(bd + 1)
        else:
            p = l - 1 if middle else l
            pool = p % bd if strategy in ("cycle", "middle_cycle") else p // n_r
            sets.append(pool + (1 if middle else 0))
    return sets, bd


# ------------------------------------------------------------------------------------- model
class MorReference:
    def __init__(self, path, dtype=torch.float64, device="cpu"):
        self.cfg, self.router_state, raw = read_model(path)
        self.dtype, self.device = dtype, torch.device(device)
        self.w = {k: v.to(device=self.device, dtype=dtype) for k, v in raw.items()}
        c = self.cfg
        self.d, self.hd = c["hidden_size"], c["head_dim"]
        self.nh, self.nkv = c["num_heads"], c["num_kv_heads"]
        self.eps, self.theta = c["rms_norm_eps"], c["rope_theta"]
        rec, self.rc = c.get("recursion"), c.get("router")
        self.strategy = rec["sharing"] if rec else None
        self.n_r = rec["num_recursions"] if rec else 1
        self.kv_share = bool(rec) and rec.get("kv_mode") == "share"
        self.untie_attn = bool(rec) and rec.get("untie_attention", False)
        self.sets, self.bd = param_sets(self.strategy, c["num_layers"], self.n_r)
        self.middle = self.strategy in ("middle_cycle", "middle_sequence")
        # Recursion blocks exist as contiguous position ranges only for (middle-)cycle.
        self.blocks = self.strategy in ("cycle", "middle_cycle")
        if self.rc is not None:
            if not self.blocks:
                raise ReferenceError_(f"routers need cycle or middle_cycle sharing, not {self.strategy}")
            if self.rc.get("random"):
                raise ReferenceError_("random routers draw from mor's own RNG stream; not reproducible here")
        if self.kv_share and not self.blocks:
            raise ReferenceError_("KV sharing needs cycle or middle_cycle sharing")
        missing = [n for n in self.expected_names() if n not in self.w]
        if missing:
            raise ReferenceError_(f"{path}: tensors missing from model.safetensors: {missing[:5]}")

    # -- names
    def step_positions(self, r):
        start = (1 if self.middle else 0) + r * self.bd
        return range(start, start + self.bd)

    def attn_prefix(self, pos):
        if self.untie_attn:
            for r in range(1, self.n_r):
                rng = self.step_positions(r)
                if pos in rng:
                    return f"model.recursions.{r}.layers.{pos - rng.start}.self_attn"
        return f"model.layers.{self.sets[pos]}.self_attn"

    def expected_names(self):
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.cfg["tie_embeddings"]:
            names.append("lm_head.weight")
        for pos in range(len(self.sets)):
            names.append(f"model.layers.{self.sets[pos]}.mlp.down_proj.weight")
            names.append(f"{self.attn_prefix(pos)}.q_proj.weight")
        return names

    # -- pieces
    def rmsnorm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, x, pos):
        """Rotate-half RoPE of x [T, heads, hd] at original positions pos [T] (angles in fp64)."""
        half = self.hd // 2
        inv = self.theta ** (-torch.arange(0, half, dtype=torch.float64, device=self.device) * 2 / self.hd)
        ang = pos.to(torch.float64)[:, None] * inv[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(self.dtype)[:, None, :]
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(self.dtype)[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def kv(self, pos_l, x, pos):
        """Post-RoPE keys and values of layer position pos_l for rows x at positions pos."""
        a, n = self.attn_prefix(pos_l), f"model.layers.{self.sets[pos_l]}"
        xn = self.rmsnorm(x, self.w[f"{n}.input_layernorm.weight"])
        k = (xn @ self.w[f"{a}.k_proj.weight"].T).view(-1, self.nkv, self.hd)
        v = (xn @ self.w[f"{a}.v_proj.weight"].T).view(-1, self.nkv, self.hd)
        return self.rope(k, pos), v, pos

    def layer(self, pos_l, x, pos, shared_kv=None):
        """Decoder layer at position pos_l on rows x [T, d] (original positions pos, ascending).
        Query i sees key j iff key position <= query position; keys are x's own rows, or
        `shared_kv` = (k, v, key positions) from recursion 1 (KV sharing)."""
        a, n = self.attn_prefix(pos_l), f"model.layers.{self.sets[pos_l]}"
        xn = self.rmsnorm(x, self.w[f"{n}.input_layernorm.weight"])
        q = self.rope((xn @ self.w[f"{a}.q_proj.weight"].T).view(-1, self.nh, self.hd), pos)
        k, v, kpos = shared_kv if shared_kv is not None else self.kv(pos_l, x, pos)
        rep = self.nh // self.nkv  # GQA: query head h uses kv head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = torch.einsum("qhe,khe->hqk", q, k) / math.sqrt(self.hd)
        s = s.masked_fill(~(kpos[None, :] <= pos[:, None])[None], float("-inf"))
        att = torch.einsum("hqk,khe->qhe", torch.softmax(s, -1), v).reshape(-1, self.nh * self.hd)
        h = x + att @ self.w[f"{a}.o_proj.weight"].T
        hn = self.rmsnorm(h, self.w[f"{n}.post_attention_layernorm.weight"])
        g = hn @ self.w[f"{n}.mlp.gate_proj.weight"].T
        u = hn @ self.w[f"{n}.mlp.up_proj.weight"].T
        return h + (F.silu(g) * u) @ self.w[f"{n}.mlp.down_proj.weight"].T

    def block(self, r, x, pos, cache):
        """Recursion step r's layers on rows x. `cache` collects recursion-1 K/V (KV sharing)."""
        for j, pl in enumerate(self.step_positions(r)):
            if self.kv_share and r > 0:
                x = self.layer(pl, x, pos, cache[j])
            else:
                if self.kv_share:
                    cache.append(self.kv(pl, x, pos))
                x = self.layer(pl, x, pos)
        return x

    def router(self, prefix, x):
        """Router logits R(x / temperature): linear, or Linear -> GELU (erf) -> Linear."""
        x = x / self.rc.get("temperature", 1.0)
        if f"{prefix}.weight" in self.w:
            return x @ self.w[f"{prefix}.weight"].T
        hid = F.gelu(x @ self.w[f"{prefix}.fc1.weight"].T)
        return hid @ self.w[f"{prefix}.fc2.weight"].T

    # -- router settings (defaults of MOR_SPEC 3.3 / 4.1)
    def activation(self):
        return self.rc.get("activation") or ("sigmoid" if self.rc["kind"] == "expert" else "softmax")

    def alpha(self):
        a = self.rc.get("alpha")
        if a is not None:
            return a
        return 1.0 if (self.rc["kind"] == "token" and self.activation() == "softmax") else 0.1

    def z_coeff(self):
        z = self.rc.get("z_coeff")
        return z if z is not None else (0.0 if self.rc["kind"] == "expert" else 1e-5)

    def k_tokens(self, r, L):
        """Tokens kept per sequence at expert-choice step r (0-based): max(1, floor(c_r L))."""
        caps = self.rc.get("capacities")
        c = caps[r] if caps else (self.n_r - r) / self.n_r
        T = self.rc.get("capacity_warmup", 0) or 0
        if T > 0:  # cosine warm-up from 1 to c over T training forward calls (MOR_SPEC 3.4)
            t = min(1.0, self.router_state.get("forward_calls", 0) / T)
            c = c + (1 - c) * 0.5 * (1 + math.cos(math.pi * t))
        return min(L, max(1, math.floor(c * L + 1e-9)))

    # -- recursion stages
    def expert(self, hs, L, out):
        """Expert-choice steps on every sequence of hs [B, L, d] (in place), MOR_SPEC 3.5-3.6."""
        act, alpha = self.activation(), self.alpha()
        B = hs.shape[0]
        bce_sum = [0.0] * self.n_r
        bce_aux_router = [0.0] * self.n_r
        z_sum = [0.0] * self.n_r
        n_cand = [0] * self.n_r
        sel_all = [[] for _ in range(self.n_r)]
        depth = torch.zeros(B, L, dtype=torch.long)
        for b in range(B):
            h = hs[b]
            cand = torch.arange(L, device=self.device)
            cache = []
            for r in range(self.n_r):
                logit = self.router(f"model.routers.{r}", h[cand])[:, 0]
                g = {"sigmoid": lambda l: alpha * torch.sigmoid(l), "tanh": lambda l: alpha * torch.tanh(l),
                     "none": lambda l: l}[act](logit)
                k = self.k_tokens(r, L)
                order = torch.sort(g, descending=True, stable=True).indices  # ties: lowest index first
                chosen = torch.sort(order[:k]).values
                target = torch.zeros_like(logit)
                target[chosen] = 1.0
                bce_sum[r] += F.binary_cross_entropy_with_logits(logit, target, reduction="sum").item()
                z_sum[r] += logit.pow(2).sum().item()
                n_cand[r] += len(cand)
                if self.rc.get("sampling") == "aux_router":
                    al = self.router(f"model.aux_routers.{r}", h[cand])[:, 0]
                    bce_aux_router[r] += F.binary_cross_entropy_with_logits(al, target, reduction="sum").item()
                sel = cand[chosen]
                y = self.block(r, h[sel], sel, cache)
                if self.rc.get("combine", "add") == "replace":
                    h[sel] = y
                else:
                    h[sel] = h[sel] + g[chosen][:, None] * y
                depth[b, sel.cpu()] += 1
                sel_all[r].extend((b * L + sel.cpu()).tolist())
                cand = sel
        out["aux_bce"] = sum(s / n for s, n in zip(bce_sum, n_cand))
        out["aux_router_bce"] = sum(s / n for s, n in zip(bce_aux_router, n_cand))
        out["z_loss"] = sum(s / n for s, n in zip(z_sum, n_cand))
        aux = self.z_coeff() * out["z_loss"]
        if self.rc.get("sampling", "aux_loss") == "aux_loss":
            aux += self.rc.get("aux_coeff", 0.001) * out["aux_bce"]
        out["depths"], out["selections"] = depth, sel_all
        return aux

    def token(self, hs, L, out):
        """Token-choice recursions (MOR_SPEC 4.1-4.2) on hs [B, L, d] (in place)."""
        B, n_r, alpha = hs.shape[0], self.n_r, self.alpha()
        logits = self.router("model.routers.0", hs)  # [B, L, N_r], router on h^1
        p = alpha * (torch.softmax(logits, -1) if self.activation() == "softmax" else torch.sigmoid(logits))
        bias = torch.tensor(self.router_state.get("bias") or [0.0] * n_r, dtype=self.dtype, device=self.device)
        depth = torch.argmax(p + bias, -1)  # bias only steers the argmax; first maximum wins
        w = p.gather(-1, depth[..., None])[..., 0]
        n = B * L
        f = n_r * torch.bincount(depth.flatten(), minlength=n_r).to(self.dtype) / n
        out["balance_loss"] = (f * p.reshape(n, n_r).mean(0)).sum().item()
        out["z_loss"] = torch.logsumexp(logits, -1).pow(2).mean().item()
        aux = self.z_coeff() * out["z_loss"]
        if self.rc.get("balancing", "loss") == "loss":
            aux += self.rc.get("balance_coeff", 0.1) * out["balance_loss"]
        sel_all = [[] for _ in range(n_r)]
        for b in range(B):
            h1 = hs[b].clone()
            x, res = h1.clone(), h1.clone()
            cache = []
            for r in range(n_r):
                active = torch.nonzero(depth[b] >= r)[:, 0]
                y = self.block(r, x[active], active, cache)
                exit_ = depth[b][active] == r
                te, tc = active[exit_], active[~exit_]
                res[te] = h1[te] + w[b][te][:, None] * y[exit_]  # exits: gated, residual from h^1
                x[tc] = y[~exit_]  # continuing tokens: ungated
                sel_all[r].extend((b * L + active.cpu()).tolist())
            hs[b] = res
        out["depths"], out["selections"] = (depth + 1).cpu(), sel_all
        return aux

    # -- whole model
    @torch.no_grad()
    def forward(self, ids):
        """ids [B, L+1] (int). Returns a dict: logits [B, L, V], token_ce [B, L], ce, loss, aux
        losses (unweighted), depths [B, L], selections (per step, flat b*L+t indices)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ReferenceError_("ids must be [B, L+1] with L >= 1")
        V = self.cfg["vocab_size"]
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ReferenceError_(f"token ids must lie in [0, {V})")
        inp, tgt = ids[:, :-1], ids[:, 1:]
        B, L = inp.shape
        if L > self.cfg["max_seq_len"]:
            raise ReferenceError_(f"sequence length {L} exceeds max_seq_len {self.cfg['max_seq_len']}")
        pos = torch.arange(L, device=self.device)
        hs = self.w["model.embed_tokens.weight"][inp].clone()
        out = dict(aux_bce=0.0, aux_router_bce=0.0, z_loss=0.0, balance_loss=0.0,
                   depths=torch.full((B, L), self.n_r, dtype=torch.long), selections=[])
        aux = 0.0
        num_layers = len(self.sets)

        def run(positions):  # plain layers on every whole sequence
            for b in range(B):
                for pl in positions:
                    hs[b] = self.layer(pl, hs[b], pos)

        if not self.blocks:  # vanilla and the sequence strategies: every position in order
            run(range(num_layers))
        else:
            run(range(1 if self.middle else 0))
            kind = self.rc["kind"] if self.rc else None
            if kind is None:
                for b in range(B):
                    cache = []
                    for r in range(self.n_r):
                        hs[b] = self.block(r, hs[b], pos, cache)
            elif kind == "expert":
                aux = self.expert(hs, L, out)
            elif kind == "token":
                aux = self.token(hs, L, out)
            else:
                raise ReferenceError_(f"unknown router kind {kind}")
            run(range(self.step_positions(self.n_r - 1).stop, num_layers))
        head = self.w["model.embed_tokens.weight" if self.cfg["tie_embeddings"] else "lm_head.weight"]
        logits = self.rmsnorm(hs, self.w["model.norm.weight"]) @ head.T
        token_ce = F.cross_entropy(logits.reshape(B * L, V), tgt.reshape(-1), reduction="none").view(B, L)
        out["logits"], out["token_ce"] = logits, token_ce
        out["ce"] = token_ce.mean().item()
        out["loss"] = out["ce"] + aux
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("ids", help='JSON file {"ids": [[t0, ..., tL], ...]}')
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    ap.add_argument("--logits", help="write all logits as raw little-endian f32 [B*L, vocab]")
    a = ap.parse_args()
    try:
        with open(a.ids) as f:
            ids = json.load(f)["ids"]
        m = MorReference(a.checkpoint, getattr(torch, a.dtype), a.device)
        o = m.forward(ids)
    except (ReferenceError_, OSError, KeyError, ValueError) as e:
        sys.exit(f"mor_torch: {e}")
    if a.logits:
        o["logits"].reshape(-1, o["logits"].shape[-1]).to(torch.float32).cpu().numpy().astype("<f4").tofile(a.logits)
    res = {k: v for k, v in o.items() if k not in ("logits", "token_ce", "depths")}
    res.update(token_ce=o["token_ce"].flatten().tolist(), depths=o["depths"].flatten().tolist(),
               dtype=a.dtype, device=a.device, logits_file=a.logits)
    text = json.dumps(res) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
