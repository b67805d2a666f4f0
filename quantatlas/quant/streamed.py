"""The weights step on a layer-streamed model (models/stream.py): GPTQ (any layered solver of the
recipe), RTN and overrides one decoder layer at a time, with the same per-layer step as the
in-memory pass (`quant.quantize.quantize_layer`). Each quantized layer is written
(`layer_00003.safetensors`, the weights as the quantized model holds them, fp32) with its packed
codes (`packed_00003.safetensors`, header metadata naming codec, options and shape) to an output
folder; a `StreamedModel` over [output folder, source folder] is the quantized model.

Peak memory is one fp32 decoder layer, its GPTQ statistics, and the calibration hidden states
([samples, seq, hidden] fp32, twice for parallel propagation/GPTAQ), on top of the interpreter.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from quantatlas.context import RunContext
from quantatlas.eval.windows import cache_dir
from quantatlas.models.stream import (StreamedModel, StreamError, materialise, n_params, release, return_freed_memory,
                                      rss_mb, save_packed, save_tensors)
from quantatlas.quant.fused import share_tensor_scales
from quantatlas.quant.quantize import (LayerStream, as_context, for_run, quantize_layer, solve_direct,
                                       tensors_to_quantize)
from quantatlas.quant.recipe import Recipe


@torch.no_grad()
def quantize_streamed(sm: StreamedModel, recipe: Recipe, calib: torch.Tensor | None, ctx: int | RunContext,
                      out_dir: str | Path,
                      progress=None, log=None, batch: int = 8, records: dict | None = None) -> dict:
    """The weight recipe, one decoder layer resident at a time (module docstring). Writes the
    quantized layers and packed codes to `out_dir`; returns the bit counts
    (`bits_per_weight`, `bits_per_param`, `bytes_packed`, `quantized_params`, `total_params`; each MoE
    expert's matrix counted as its own tensor). `records` receives the MoE calibration coverage ("moe")."""
    ctx = as_context(ctx)
    if recipe.mixture is not None:
        raise StreamError("layer streaming: llama.cpp mixtures (codec: gguf) need the whole model")
    return_freed_memory()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = sm.model
    plans = [p for p in recipe.plan(tensors_to_quantize(model, recipe), model) if p.codec is not None]
    for_run(plans, ctx)
    layered = [p for p in plans if p.solver.needs and p.layer is not None and not p.is_vector]
    direct = [p for p in plans if p not in layered]
    if layered and calib is None:
        raise ValueError("a GPTQ-family solver needs calibration data")
    qbytes = qparams = 0

    def count(packed: dict):
        nonlocal qbytes, qparams
        for p in packed.values():
            if len(p.shape) == 2:
                qbytes += p.nbytes
                qparams += p.shape[0] * p.shape[1]

    # outside the layers: the head (include_head), the final norm (an override): one module at a time
    rest_packed, rest_tensors = {}, {}
    for p in [p for p in direct if p.layer is None]:
        module = p.target.module
        materialise(module, p.name + ".", sm.reader, {"weight": sm.head_name} if p.target.role == "head" else None)
        rest_packed[p.name + ".weight"] = solve_direct(p)
        key = sm.head_name if p.target.role == "head" else p.name + ".weight"
        rest_tensors[key] = module.weight.detach().clone()
        release(module)
        if progress:
            progress(1)
    if rest_tensors:
        save_tensors(rest_tensors, out / "rest.safetensors")
        save_packed(rest_packed, out / "packed_rest.safetensors")
        count(rest_packed)
        del rest_tensors, rest_packed
    # a quantized tied head is the embedding: calibration then starts from it, as in memory
    embed_from = sm.over(out) if (out / "rest.safetensors").exists() else sm
    stream = LayerStream(embed_from.layer_inputs(calib, batch), recipe, layered) if layered else None
    for i, layer in enumerate(sm.layers):
        todo_direct = [p for p in direct if p.layer == i]
        todo = [p for p in layered if p.layer == i]
        if not (todo or todo_direct or stream is not None):
            continue
        prefix = sm.layer_prefix(i)
        materialise(layer, prefix, sm.reader)
        share_tensor_scales(todo_direct + todo)   # NVFP4 `tensor_scale: fused` (quant/fused.py)
        packed: dict = {}
        for p in todo_direct:
            packed[p.name + ".weight"] = solve_direct(p)
            if progress:
                progress(1)
        if stream is not None:
            quantize_layer(layer, todo, recipe, stream, packed, progress)
        if packed:
            save_tensors({prefix + n: t for n, t in layer.state_dict().items()}, out / f"layer_{i:05d}.safetensors")
            save_packed(packed, out / f"packed_{i:05d}.safetensors")
            count(packed)
        release(layer)
        return_freed_memory()
        if log:
            mem = rss_mb()
            log(f"layer {i + 1}/{sm.n_layers}: rss {mem['rss']:.0f} MiB, peak {mem['hwm']:.0f} MiB")
    if stream is not None and stream.routed and records is not None:
        from quantatlas.models.moe import coverage

        records["moe"] = coverage(stream.routed, stream.threshold)
    total = n_params(model)
    payload = qbytes + 2 * (total - qparams)
    summary = {"bits_per_weight": 8.0 * qbytes / qparams if qparams else 16.0,
               "bits_per_param": 8.0 * payload / total, "bytes_packed": payload,
               "quantized_params": qparams, "total_params": total}
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


@dataclass
class StreamedWeights:
    """The weights step's result on a streamed model: the quantized model (a StreamedModel reading
    `folder` first; the folder is removed with it), and the bit counts from the packed files."""
    model: StreamedModel
    folder: Path
    summary: dict


def quantize_to_cache(sm: StreamedModel, recipe: Recipe, calib, ctx: RunContext, progress=None,
                      records: dict | None = None) -> StreamedWeights:
    """`quantize_streamed` into a temporary folder under the cache, removed when the quantized model is."""
    root = cache_dir() / "stream"
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="quantized-", dir=root))
    try:
        summary = quantize_streamed(sm, recipe, calib, ctx, out, progress, records=records)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    quantized = sm.over(out)
    weakref.finalize(quantized, shutil.rmtree, str(out), True)
    return StreamedWeights(quantized, out, summary)
