#!/usr/bin/env python3
"""mor vs the independent PyTorch reference (mor_torch.py): loss, logits, aux losses and routing
of a training-mode forward for identical weights and inputs, over a list of presets.

Per preset and init scale: `mor train` a few steps on synthetic data (so routers are not at
their init) with the preset's model and a small batch (B x L), draw a batch of random token
ids, run mor's forward (`dump_logits` example) and the reference, and compare.

Init scales (--init-std, default "preset,0.1"): each preset is checked as configured
(init_std 0.02) and with init_std 0.1. At 0.02 and a few steps, attention is nearly uniform,
so position handling is barely exercised: a reference with RoPE theta off by 0.1 % still
agrees within 2e-6 there, while at 0.1 the same change shows as a 2e-3 logits error (and
RoPE at compacted instead of original positions as 4e-2 instead of 2e-4).

Prints a table:

  preset | init | steps | loss mor | loss torch | loss rel err | logits err | f32 floor | aux rel err | routing | depths | PASS/FAIL

  loss rel err   |loss_mor - loss_torch| / |loss_torch| (loss = the training objective, CE + aux)
  logits err     max over positions of max_v |l_mor - l_torch| / max_v |l_torch| (all B*L rows)
  f32 floor      the same measure for the reference itself in float32 vs float64: the size of
                 plain fp32 rounding for this model and batch (information, not a criterion)
  aux rel err    worst of CE, aux BCE, z-loss, balancing loss: |d| / max(|torch|, 1e-3)
  routing        expert-choice selections / token-choice depths identical ("same"), else the
                 number of positions whose depth differs
  PASS           loss, logits and aux errors <= --tol (1e-4) and identical routing

Here (CPU; mor CPU vs torch fp64 CPU; the default list takes ~13 min on 2 cores, 1 min per 135M row):
  cargo build --release -p mor-cli
  cargo build --release -p mor-train --example dump_logits
  python3 scripts/reference/torch_parity.py                      # default preset list
  python3 scripts/reference/torch_parity.py --presets tiny-mor-ec3,tiny-mor-tc3 --steps 10

GPU machine (mor CUDA vs torch CUDA): build the two binaries here with CUDA and carry .gpu:
  cargo build --release --features cuda -p mor-cli
  cargo build --release --features cuda -p mor-train --example dump_logits
  mkdir -p .gpu && cp target/release/mor target/release/examples/dump_logits .gpu/
  # there (the `run` tool, carrying .gpu):
  source scripts/gpu-env.sh && MOR_PTX_CACHE=.gpu/kernels.ptx python3 scripts/reference/torch_parity.py \
      --mor-bin .gpu/mor --dump-bin .gpu/dump_logits --mor-device cuda --torch-device cuda \
      --work /tmp/torch-parity --json "$OUT/torch_parity.json"
(`--train-device cpu` trains the checkpoints on the CPU instead; the comparison then checks
only the CUDA forward.)

Options: --presets LIST (preset names or paths of TOML configs with a [train] table), --init-std LIST, --batch B (2), --seq-len L (128), --steps N (training
steps before the check; default 20 for tiny-*, 3 otherwise), --dtype float64|float32 (torch),
--seed S (batch), --tol, --no-floor, --work DIR (kept; default a temporary directory, removed),
--keep-files (also keep mor's logits), --json FILE (results).
Exit status 1 if any preset fails, 2 on a usage or setup error.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mor_torch import MorReference  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_PRESETS = [
    "tiny-vanilla", "tiny-rec3-cycle", "tiny-rec3-mcycle", "tiny-rec3-seq", "tiny-rec3-mseq",
    "tiny-mor-ec3", "tiny-mor-ec3-share", "tiny-mor-ec2", "tiny-mor-tc3",
    "135m-vanilla", "135m-rec3-mcycle", "135m-mor-ec3", "135m-mor-ec3-share", "135m-mor-tc3",
]


def die(msg):
    print(f"torch_parity: {msg}", file=sys.stderr)
    sys.exit(2)


def small_config(preset, batch, seq_len, steps, init_std, path):
    """The preset's TOML with a small [train] table (B x L, no warm-up to speak of) and, when
    given, another `model.init_std`."""
    src = preset if preset.endswith(".toml") else os.path.join(ROOT, "configs", f"{preset}.toml")
    if not os.path.isfile(src):
        die(f"no preset {preset} (expected {src}; see `mor presets`)")
    text = open(src).read()
    head, sep, rest = text.partition("\n[train]\n")
    if not sep:
        die(f"{src}: no [train] table")
    if init_std is not None:
        head, k = re.subn(r"^init_std = .*$", f"init_std = {init_std}", head, flags=re.M)
        if k != 1:
            die(f"{src}: no model.init_std line to replace")
    train, sep2, tail = rest.partition("\n[")
    subs = dict(seq_len=seq_len, micro_batch=batch, grad_accum=1, steps=steps, warmup_steps=1, checkpoint_every=0)
    for k, v in subs.items():
        pat = re.compile(rf"^{k} = .*$", re.M)
        line = f"{k} = {v}"
        train = pat.sub(line, train) if pat.search(train) else train.rstrip("\n") + f"\n{line}\n"
    with open(path, "w") as f:
        f.write(head + sep + train + sep2 + tail)


def sh(cmd, what):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stderr.strip()[-2000:]}")
    return time.time() - t


def rel(a, b, floor=1e-12):
    return abs(a - b) / max(abs(b), floor)


def logits_error(x, ref):
    """max over rows of max_v |x - ref| / max_v |ref|."""
    return ((x - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-30)).max().item()


def check(preset, init, a, work):
    """Train, dump, reference, compare one preset at one init scale; returns a result dict."""
    name = os.path.basename(preset)[:-5] if preset.endswith(".toml") else preset
    d = os.path.join(work, f"{name}@{init or 'preset'}")
    os.makedirs(d, exist_ok=True)
    steps = a.steps if a.steps is not None else (20 if name.startswith("tiny") else 3)
    cfg = os.path.join(d, "config.toml")
    small_config(preset, a.batch, a.seq_len, steps, init, cfg)
    run_dir = os.path.join(d, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    t_train = sh([a.mor_bin, "train", cfg, "--data", "synthetic", "--out", run_dir, "--quiet", "--prompt", "",
                  "--device", a.train_device or a.mor_device], f"{preset}: mor train")
    ref_path = run_dir  # a run directory: the loaders find checkpoint/
    m = MorReference(ref_path, getattr(torch, a.dtype), a.torch_device)
    vocab = m.cfg["vocab_size"]
    rng = np.random.default_rng(a.seed)
    ids = rng.integers(0, vocab, size=(a.batch, a.seq_len + 1)).tolist()
    ids_path = os.path.join(d, "ids.json")
    with open(ids_path, "w") as f:
        json.dump({"ids": ids}, f)
    mor_json, mor_logits = os.path.join(d, "mor.json"), os.path.join(d, "mor_logits.f32")
    t_mor = sh([a.dump_bin, run_dir, ids_path, "--out", mor_json, "--logits", mor_logits, "--device", a.mor_device],
               f"{preset}: dump_logits")
    mo = json.load(open(mor_json))
    t = time.time()
    ro = m.forward(ids)
    t_ref = time.time() - t

    n = a.batch * a.seq_len
    lm = torch.from_numpy(np.fromfile(mor_logits, dtype="<f4").astype(np.float64)).view(n, vocab)
    lt = ro["logits"].reshape(n, vocab).to(torch.float64).cpu()
    logits_err = logits_error(lm, lt)
    # fp32 rounding floor: the same reference in float32 against float64 (information only).
    floor = None
    if a.dtype == "float64" and not a.no_floor:
        o32 = MorReference(ref_path, torch.float32, a.torch_device).forward(ids)
        floor = logits_error(o32["logits"].reshape(n, vocab).to(torch.float64).cpu(), lt)
    loss_err = rel(mo["loss"], ro["loss"])
    aux_err = max(rel(mo[k], ro[k], 1e-3) for k in ("ce", "aux_bce", "z_loss", "balance_loss", "aux_router_bce"))
    dm, dt = mo["depths"], ro["depths"].flatten().tolist()
    same = dm == dt and mo["selections"] == ro["selections"]
    routing = "same" if same else f"{sum(x != y for x, y in zip(dm, dt))} depths differ"
    ok = same and loss_err <= a.tol and logits_err <= a.tol and aux_err <= a.tol
    depth_hist = np.bincount(np.array(dt), minlength=m.n_r + 1).tolist()
    res = dict(preset=name, init_std=m.cfg.get("init_std"), steps=steps, batch=a.batch, seq_len=a.seq_len,
               loss_mor=mo["loss"], loss_torch=ro["loss"], ce_mor=mo["ce"], ce_torch=ro["ce"], loss_rel_err=loss_err,
               logits_err=logits_err, fp32_floor=floor, aux_rel_err=aux_err,
               aux_mor={k: mo[k] for k in ("aux_bce", "z_loss", "balance_loss")},
               aux_torch={k: ro[k] for k in ("aux_bce", "z_loss", "balance_loss")},
               routing=routing, depth_histogram=depth_hist, pass_=ok, mor_device=mo["device"],
               torch=f"{a.dtype} {a.torch_device}", seconds=dict(train=t_train, mor=t_mor, torch=t_ref))
    if not a.keep_files:
        os.remove(mor_logits)
    return res


def main():
    ap = argparse.ArgumentParser(description="mor vs PyTorch reference parity (see the module docstring)")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-std", default="preset,0.1",
                    help="comma list of model.init_std values to check each preset at; 'preset' = the preset's own")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--mor-bin", default=os.environ.get("MOR_BIN", os.path.join(ROOT, "target/release/mor")))
    ap.add_argument("--dump-bin", default=os.environ.get("DUMP_BIN", os.path.join(ROOT, "target/release/examples/dump_logits")))
    ap.add_argument("--mor-device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--train-device", choices=["cpu", "cuda"], default=None, help="default: --mor-device")
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--work", default=None, help="working directory (kept); default: a temporary one, removed")
    ap.add_argument("--no-floor", action="store_true", help="skip the float32 reference run (the 'f32 floor' column)")
    ap.add_argument("--keep-files", action="store_true", help="keep the mor logits files in --work")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    for b, name in ((a.mor_bin, "--mor-bin"), (a.dump_bin, "--dump-bin")):
        if not (os.path.isfile(b) and os.access(b, os.X_OK)):
            die(f"{name} {b}: not an executable (build it: see the header of this script)")
    if a.batch < 1 or a.seq_len < 2:
        die("--batch must be >= 1 and --seq-len >= 2")
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    inits = []
    for v in a.init_std.split(","):
        v = v.strip()
        try:
            inits.append(None if v == "preset" else float(v))
        except ValueError:
            die(f"--init-std {v}: expected 'preset' or a number")
    cases = [(p, i) for p in presets for i in inits]
    work = a.work or tempfile.mkdtemp(prefix="torch-parity-")
    os.makedirs(work, exist_ok=True)
    print(f"mor ({a.mor_device}, {a.mor_bin}) vs torch {torch.__version__} ({a.dtype}, {a.torch_device}); "
          f"batch {a.batch} x {a.seq_len}; pass: loss, logits, aux rel err <= {a.tol:g} and identical routing; work {work}",
          flush=True)
    hdr = f"| {'preset':<20} | init  | steps | {'loss mor':>10} | {'loss torch':>10} | loss rel err | logits err | f32 floor | aux rel err | {'routing':<16} | {'depths':>9} | result |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|", flush=True)
    results, fails = [], 0
    for p, init in cases:
        try:
            r = check(p, init, a, work)
        except Exception as e:  # one broken preset should not hide the others
            fails += 1
            print(f"| {p:<20} | {init or '':<5} | ERROR: {str(e).splitlines()[0]}", flush=True)
            print(str(e), file=sys.stderr)
            results.append(dict(preset=p, init_std=init, error=str(e), pass_=False))
            continue
        fails += not r["pass_"]
        hist = "/".join(map(str, r["depth_histogram"][1:]))
        fl = "-" if r["fp32_floor"] is None else f"{r['fp32_floor']:.2e}"
        print(f"| {r['preset']:<20} | {r['init_std']:<5g} | {r['steps']:>5} | {r['loss_mor']:>10.6f} | {r['loss_torch']:>10.6f} | {r['loss_rel_err']:>12.2e} | "
              f"{r['logits_err']:>10.2e} | {fl:>9} | {r['aux_rel_err']:>11.2e} | {r['routing']:<16} | {hist:>9} | "
              f"{'PASS' if r['pass_'] else 'FAIL':>6} |", flush=True)
        results.append(r)
    print("depths: tokens that ran 1/2/.../N_r recursions (torch side; vanilla: all 1)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in results], f, indent=1)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(cases) - fails}/{len(cases)} passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
