"""Results before and after a refactor: runs a fixed set of arms (GPTQ, act-order, incoherence,
turbo, AWQ + Hadamard, a llama.cpp mixture with imatrix, allocation, finetune recovery, KV-cache
and activation steps) on the reference model, and a streamed GPTQ run on a tiny sharded Qwen3
folder, and writes every number to JSON. Run it on two checkouts and compare with `--compare`:

    python bench/pipeline_identity.py --out before.json          # on the old checkout
    python bench/pipeline_identity.py --out after.json --compare before.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

#: GPTQ's first released defaults, written out: the defaults changed since (act_order, static_groups,
#: propagation; uniform's scale, spelled `A` below), and an explicit first default keeps the experiment id
#: and arm keys (atlas/ids.py)
OLD_GPTQ = {"act_order": False, "static_groups": False}
SEQ = {"propagation": "sequential"}
A = {"scale": "absmax"}

SPEC = {
    "title": "pipeline identity", "model": "reference", "seeds": [0, 1],
    "data": {"calib": {"samples": 8, "seq_len": 256}, "eval": {"tokens": 8192, "ctx": 512}},
    "arms": {
        "rtn4": {"codec": {"uniform": {"bits": 4, **A}}},
        "gptq4": {"solver": "gptq", "solver_options": OLD_GPTQ, **SEQ, "codec": {"uniform": {"bits": 4, **A}}},
        "gptq3_ao": {"solver": "gptq", "solver_options": {"act_order": True, "static_groups": True}, **SEQ,
                     "codec": {"uniform": {"bits": 3, **A}}},
        "gptq3_par": {"solver": "gptq", "solver_options": OLD_GPTQ, "propagation": "parallel",
                      "codec": {"uniform": {"bits": 3, **A}}},
        "gptaq3": {"solver": "gptaq", "solver_options": OLD_GPTQ, **SEQ, "codec": {"uniform": {"bits": 3, **A}}},
        "e8p_inc": {"solver": "gptq", "solver_options": {"incoherence": True, **OLD_GPTQ}, **SEQ, "codec": {"e8p": {"bits": 2}}},
        "turbo3": {"codec": {"turbo": {"bits": 3, "group": 128}}},
        "awq_had": {"transforms": [{"awq": {"grid": 5}}, {"hadamard": {}}], "codec": {"uniform": {"bits": 3, **A}}},
        "q4km_im": {"codec": {"gguf": {"ftype": "Q4_K_M", "imatrix": True}}},
        "alloc": {"codec": "q4_k", "allocate": {"candidates": ["q6_k"], "target": {"bits_per_weight": 5.0}}},
        "kd": {"codec": {"uniform": {"bits": 3, **A}},
               "recovery": {"method": "kd_ste", "train": "scales", "steps": 4, "samples": 4, "seq_len": 128,
                            "batch": 2}},
        "kv_act": {"codec": {"uniform": {"bits": 4, **A}},
                   "kv": {"k": "q4_0", "v": "q8_0", "rotate": True},
                   "act": {"codec": {"uniform": {"bits": 8, "group": None, **A}}}},
    },
}


def streamed(tmp: str) -> dict:
    """Streamed GPTQ on a tiny sharded Qwen3 folder: runner results with streaming forced on."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from quantatlas.runner import run_spec

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.to(torch.float16).save_pretrained(tmp, max_shard_size="40KB")
    text = os.path.join(tmp, "text.txt")
    with open(text, "w") as f:
        f.write(open(os.path.join(os.path.dirname(torch.__file__), "functional.py")).read()[:60000])
    spec = {"title": "streamed", "model": tmp, "seeds": [0],
            "data": {"calib": {"samples": 4, "seq_len": 64, "source": text},
                     "eval": {"tokens": 2048, "ctx": 128, "source": text}},
            "arms": {"gptq4": {"solver": "gptq", "solver_options": OLD_GPTQ, **SEQ, "codec": {"uniform": {"bits": 4, "group": 32, **A}}},
                     "rtn3": {"codec": {"uniform": {"bits": 3, "group": 32, **A}}}}}
    os.environ["QUANTATLAS_STREAM"] = "1"
    try:
        return run_spec(spec, ledger=False, device="cpu", compress=False, log=lambda m: None)
    finally:
        os.environ.pop("QUANTATLAS_STREAM")


def numbers(doc: dict) -> dict:
    return {f"{a}/{s}": {k: v for k, v in r.items() if k not in ("seconds", "recovery_cpu_s")}
            for a, arm in doc["arms"].items() for s, r in arm["seeds"].items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from quantatlas.runner import run_spec

    doc = run_spec(SPEC, ledger=False, device="cpu", compress=True, log=lambda m: None)
    out = {"memory": numbers(doc), "ids": {"spec_hash": doc["spec_hash"], "eval": doc["eval_fingerprint"],
                                           "keys": {a: v["key"] for a, v in doc["arms"].items()}}}
    with tempfile.TemporaryDirectory() as tmp:
        out["streamed"] = numbers(streamed(tmp))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {args.out}: {len(out['memory'])} in-memory runs, {len(out['streamed'])} streamed")
    if args.compare:
        old = json.load(open(args.compare))
        diffs = []
        for part in ("memory", "streamed"):
            for run, res in old[part].items():
                for k, v in res.items():
                    w = out[part].get(run, {}).get(k)
                    if w != v:
                        diffs.append(f"{part} {run} {k}: {v!r} -> {w!r}")
        if old["ids"] != out["ids"]:
            diffs.append(f"ids: {old['ids']} -> {out['ids']}")
        print("\n".join(diffs) if diffs else "identical: every number and id")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
