"""One quantization run for bench/peer_gptq.py, in a fresh process of the tool's own virtualenv.

    <venv>/bin/python bench/peer_gptq_worker.py JOB.json

JOB.json (written by bench/peer_gptq.py) names the tool (`quantatlas`, `llmcompressor`,
`llmcompressor-rtn`, `autoround`, `autoround-rtn`, `gptqmodel`), the model (a HF folder; quantatlas
also takes `reference`), the scheme (`int4`, `int3`: symmetric groups of 128; `w8a8`: int8, one scale
per row), the calibration windows (an int64 .npy of [samples, seq_len] token ids: the very windows
quantatlas draws), the seed, the thread count and the run folder. The run writes there
`weights.safetensors` (every decoder Linear's weight after quantization, dequantized, fp32, by
parameter name; skipped with `write_weights: false`), for llm-compressor with `save_artifact: true` its
compressed-tensors folder (`compressed-tensors/`, what `quantatlas run` reads as an `artifact:` arm),
and `result.json`: the tool's versions, the
wall and process CPU seconds of the quantization call alone (model loading and imports apart), and
the process's resident memory after the imports, after loading the model and at its peak (VmHWM,
read right after the quantization call).

Only this file's standard-library part and the tool's own packages are imported: the peers run
in virtualenvs without quantatlas (their transformers pins differ from ours).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def memory_mb() -> dict[str, float]:
    """Resident set now (VmRSS) and its peak so far (VmHWM), MiB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return {"rss": out.get("VmRSS", float("nan")), "hwm": out.get("VmHWM", float("nan"))}


def versions(names: list[str]) -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def decoder_linears(model) -> dict:
    """name -> nn.Linear for the Linears inside the decoder layers (the head and embeddings stay fp)."""
    import torch

    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}." and not n.endswith("lm_head")}


def dequantized_weights(model) -> dict:
    """Every decoder Linear's weight as the model now holds it (the tools leave it fake-quantized), fp32,
    by the parameter's name in the original model (AutoRound wraps a Linear whose input it quantizes:
    `<name>.orig_layer`)."""
    return {f"{n.replace('.orig_layer', '')}.weight": m.weight.detach().float().cpu().contiguous()
            for n, m in decoder_linears(model).items()}


def load_hf(folder: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    except TypeError:   # transformers < 4.56 names it torch_dtype
        return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()


# -- quantatlas ------------------------------------------------------------------------------------
def run_quantatlas(job: dict, calib, timer) -> dict:
    """quantatlas's public call (quant/pipeline.py `quantize`), as `quantatlas run` makes it: the
    calibration draw from the stdlib train stream by the run seed (checked equal to the windows the
    peers get), the arm's steps on the loaded model itself (`in_place`, the job's `in_place: false` for
    the working copy a `quantatlas run` makes)."""
    import torch

    from quantatlas.context import RunContext
    from quantatlas.models import load_model
    from quantatlas.quant.pipeline import Calibration, quantize
    from quantatlas.spec import Arm

    timer.imported()
    lm = load_model(job["model"], stream=job.get("stream"))   # stream None: load_model's own rule
    timer.loaded()
    ctx = RunContext(job["seed"], "cpu", int(job["threads"]))
    calibration = Calibration(load=lambda: lm.text_tokens("stdlib", "train"), samples=calib.shape[0],
                              seq_len=calib.shape[1])
    if not torch.equal(calibration.tokens(ctx), calib):
        raise SystemExit("quantatlas drew other calibration windows than the ones handed to the peers")
    arm = Arm(**job["arm"])
    with timer.quantizing():   # in place, as the peers quantize the model they loaded: this process keeps no fp weights
        qm = quantize(lm, arm, calibration, ctx, in_place=bool(job.get("in_place", True)))
    streamed = qm.streamed is not None
    if streamed:
        bits = float(qm.sizes["bits_per_weight"]) if qm.sizes and "bits_per_weight" in qm.sizes else None
    else:
        bits = sum(8 * p.nbytes for p in qm.packed.values()) / sum(p.shape[0] * p.shape[1] for p in qm.packed.values())
    weights = None
    if job["write_weights"]:
        if streamed:
            raise SystemExit("write_weights: a layer-streamed model keeps its quantized layers on disk; "
                             "load the model whole (--stream 0) to score it")
        weights = dequantized_weights(qm.model)
    return {"weights": weights, "bits_per_weight": bits, "streamed": streamed,
            "settings": {"arm": arm.model_dump(mode="json")},
            "versions": versions(["quantatlas", "torch", "transformers"])}


# -- llm-compressor --------------------------------------------------------------------------------
def llmcompressor_scheme(scheme: dict):
    """The scheme as llm-compressor names it: its W4A16 / W8A8 presets, int3 as a config group
    shaped like W4A16 (symmetric int, groups of 128)."""
    if scheme["name"] == "int4":
        return {"scheme": "W4A16"}
    if scheme["name"] == "w8a8":
        return {"scheme": "W8A8"}
    return {"config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": scheme["bits"], "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": scheme["group"]}}}}


def stub_tokenizer():
    """oneshot insists on a processor when handed a dataset, and the models here have no tokenizer
    files; the windows come as token ids, which it neither tokenizes again nor pads (its truncation
    collator), so a one-token vocabulary stands in."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                   pad_token="<pad>")


def run_llmcompressor(job: dict, calib, timer) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    timer.imported()
    model = load_hf(job["model_dir"], torch.float32)
    timer.loaded()
    opts = dict(job.get("options") or {})
    kw = dict(targets="Linear", ignore=["lm_head"], **llmcompressor_scheme(job["scheme"]))
    if job["tool"] == "llmcompressor-rtn":
        modifier = QuantizationModifier(**kw, **opts)
        data = {}
    else:
        opts.setdefault("dampening_frac", 0.01)   # the setting (also the library's default)
        modifier = GPTQModifier(**kw, **opts)
        c = calib.numpy()
        data = dict(dataset=Dataset.from_dict({"input_ids": c.tolist(), "attention_mask": np.ones_like(c).tolist()}),
                    num_calibration_samples=c.shape[0], max_seq_length=c.shape[1], shuffle_calibration_samples=False,
                    processor=stub_tokenizer())
    torch.manual_seed(job["seed"])
    with timer.quantizing():
        oneshot(model=model, recipe=modifier, **data)
    some = next(iter(decoder_linears(model).values()))
    weights, off_grid = llmcompressor_weights(model) if job["write_weights"] else (None, None)
    if job.get("save_artifact"):   # the compressed-tensors folder itself, for an `artifact:` arm to read
        model.save_pretrained(str(Path(job["out"]) / "compressed-tensors"), save_compressed=True)
    return {"weights": weights,
            "settings": {"modifier": repr(modifier), "resolved_scheme": str(getattr(some, "quantization_scheme", None)),
                         "scale_dtype": str(getattr(some, "weight_scale", torch.empty(0)).dtype),
                         "held_weight_off_grid_max": off_grid},
            "versions": versions(["llmcompressor", "compressed-tensors", "torch", "transformers", "auto-round"])}


def llmcompressor_weights(model):
    """Each decoder Linear's weight through compressed-tensors' own fake quantization with the module's
    scale and zero point (what its quantized forward computes): GPTQ leaves the weight already on the
    grid, RTN (`QuantizationModifier`) leaves it fp and only sets the scales. Also the largest change
    that makes to a held weight (0 after GPTQ)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out, off = {}, 0.0
    with torch.no_grad():
        for n, m in decoder_linears(model).items():
            w = forward_quantize(m, m.weight, "weight", m.quantization_scheme.weights)
            off = max(off, float((w - m.weight).abs().max()))
            out[f"{n}.weight"] = w.detach().float().cpu().contiguous()
    return out, off


# -- AutoRound -------------------------------------------------------------------------------------
class NoTokenizer:
    """AutoRound wants a tokenizer object even when it is handed token ids; it reads only these."""
    pad_token_id = None
    pad_token = None
    eos_token_id = None


def run_autoround(job: dict, calib, timer) -> dict:
    import torch
    from auto_round import AutoRound

    timer.imported()
    model = load_hf(job["model_dir"], torch.float32)
    timer.loaded()
    scheme = {"int4": "W4A16", "int3": "W3A16", "w8a8": "INT8"}[job["scheme"]["name"]]
    opts = dict(job.get("options") or {})
    opts.setdefault("amp", False)   # tune in fp32 as the other tools compute (its CPU default is bf16)
    if job["tool"] == "autoround-rtn":
        opts.update(iters=0, disable_opt_rtn=True)   # plain round to nearest on its grid
    bs = int(opts.pop("batch_size", 8))
    data = [{"input_ids": calib[i:i + bs], "attention_mask": torch.ones_like(calib[i:i + bs])}
            for i in range(0, calib.shape[0], bs)]
    torch.manual_seed(job["seed"])
    with timer.quantizing():
        ar = AutoRound(model, tokenizer=NoTokenizer(), scheme=scheme, dataset=data, nsamples=calib.shape[0],
                       seqlen=calib.shape[1], batch_size=bs, device_map="cpu", seed=job["seed"], **opts)
        ar.quantize()
    return {"weights": dequantized_weights(ar.model) if job["write_weights"] else None,
            "settings": {"scheme": scheme, "batch_size": bs, **opts},
            "versions": versions(["auto-round", "torch", "transformers"])}


# -- GPTQModel -------------------------------------------------------------------------------------
def run_gptqmodel(job: dict, calib, timer) -> dict:
    """Not driven yet: when this bench was written no GPTQModel release installed beside quantatlas's
    pins (7.7.0 needs torch>=2.14.1; 7.0-7.6 pin numpy==2.2.6; 6.x fails to build without a torch it
    can see), so there was nothing to test a driver against."""
    raise SystemExit("gptqmodel installed, but this worker has no driver for it yet (bench/peer_gptq_worker.py)")


class Timer:
    """Wall and process CPU seconds of the quantization call; resident memory at each stage."""

    def __init__(self):
        self.out = {"rss_start_mb": memory_mb()["rss"]}
        self.t0 = time.perf_counter()

    def imported(self):
        self.out["rss_imported_mb"] = memory_mb()["rss"]
        self.out["import_s"] = time.perf_counter() - self.t0

    def loaded(self):
        self.out["rss_loaded_mb"] = memory_mb()["rss"]
        self.out["hwm_loaded_mb"] = memory_mb()["hwm"]
        self.out["load_s"] = time.perf_counter() - self.t0 - self.out["import_s"]

    def quantizing(self):
        timer = self

        class Span:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                if exc[0] is None:
                    mem = memory_mb()
                    timer.out.update(quant_wall_s=time.perf_counter() - self.w, quant_cpu_s=time.process_time() - self.c,
                                     peak_rss_mb=mem["hwm"], rss_after_mb=mem["rss"])

        return Span()


RUNNERS = {"quantatlas": run_quantatlas, "llmcompressor": run_llmcompressor, "llmcompressor-rtn": run_llmcompressor,
           "autoround": run_autoround, "autoround-rtn": run_autoround, "gptqmodel": run_gptqmodel}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    timer = Timer()
    import numpy as np
    import torch

    torch.set_num_threads(int(job["threads"]))
    calib = torch.from_numpy(np.load(job["calib"]).astype(np.int64))
    res = RUNNERS[job["tool"]](job, calib, timer)
    out = Path(job["out"])
    weights = res.pop("weights")
    if weights is not None:
        from safetensors.torch import save_file

        save_file(weights, str(out / "weights.safetensors"))
    res.update(timer.out, process_peak_rss_mb=memory_mb()["hwm"], tool=job["tool"], threads=int(job["threads"]), torch_threads=torch.get_num_threads(),
               calib_shape=list(calib.shape), n_weights=None if weights is None else len(weights))
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
    os.replace(tmp, out / "result.json")


if __name__ == "__main__":
    main()
