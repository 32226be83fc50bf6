#!/usr/bin/env python3
"""Load folders exported by `mor export` (or the hf_fixture example) with Hugging Face
transformers as LlamaForCausalLM, in float32, and compare their logits and greedy continuations
with the numbers mor computed (`mor_logits.json` in each folder).

    python3 scripts/reference/hf_logits_check.py FIXTURE_DIR OUT.json
"""
import json, os, sys, traceback
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"
root, out_path = sys.argv[1], sys.argv[2]
report = {"transformers": transformers.__version__, "torch": torch.__version__, "device": dev, "models": {}}
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isfile(os.path.join(d, "mor_logits.json")):
        continue
    r = {}
    try:
        ref = json.load(open(os.path.join(d, "mor_logits.json")))
        try:
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
        except TypeError:
            m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
        m = m.to(dev).eval()
        r["class"] = type(m).__name__
        r["is_llama"] = isinstance(m, LlamaForCausalLM)
        r["tied"] = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        r["rope_theta"] = getattr(m.config, "rope_theta", None) or (getattr(m.config, "rope_parameters", None) or {}).get("rope_theta")
        errs, agree = [], []
        V = ref["vocab"]
        with torch.no_grad():
            for ids, lg in zip(ref["ids"], ref["logits"]):
                x = torch.tensor([ids], device=dev)
                hf = m(x).logits[0].double().cpu()
                mo = torch.tensor(lg, dtype=torch.float64).view(len(ids), V)
                errs.append(float((hf - mo).abs().max() / mo.abs().max()))
                agree.append(float((hf.argmax(-1) == mo.argmax(-1)).double().mean()))
            p = torch.tensor([ref["greedy_prompt"]], device=dev)
            g = m.generate(p, max_new_tokens=len(ref["greedy_ids"]), do_sample=False, pad_token_id=0, eos_token_id=None)
            r["greedy_hf"] = g[0, p.shape[1]:].tolist()
        r["greedy_mor"] = ref["greedy_ids"]
        r["greedy_equal"] = r["greedy_hf"] == r["greedy_mor"]
        r["rel_err_per_sequence"] = errs
        r["rel_err_max"] = max(errs)
        r["argmax_agreement"] = agree
        r["pass"] = bool(max(errs) < 1e-3 and r["is_llama"])
    except Exception:
        r["error"] = traceback.format_exc()
        r["pass"] = False
    report["models"][name] = r
    print(name, json.dumps({k: v for k, v in r.items() if k != "error"}), r.get("error", ""), flush=True)
json.dump(report, open(out_path, "w"), indent=1)
