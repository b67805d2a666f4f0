"""Write a quantized model as a Hugging Face folder in the compressed-tensors format (what vLLM and
transformers load; what llm-compressor writes), from the codes and scales our codecs stored.

The folder: config.json with the model's config and `quantization_config` (quant_method
compressed-tensors, config_groups, ignore, kv_cache_scheme, format, quantization_status
compressed), model.safetensors (sharded with an index past `max_shard_bytes`), the tokenizer's
files when the model has one, and generation_config.json when it has one.

Which scheme each Linear gets: export/schemes.py. How each is stored (compressed-tensors 0.20's
compressors, per Linear `prefix`; q are the signed codes, q_ct = code - 2^(b-1)):

    pack-quantized        int weights, no input quantization: prefix.weight_packed int32
                          [rows, ceil(cols·b/32)]: each row's unsigned codes q_ct + 2^(b-1) as one
                          little-endian bit stream, 32 codes to b words (rows padded to 32 codes);
                          prefix.weight_scale [rows, groups]; prefix.weight_shape int64 [rows, cols];
                          asymmetric: prefix.weight_zero_point, zero points z - 2^(b-1) packed the same
                          way down the rows, int32 [ceil(rows·b/32), groups]
    int-quantized         int weights with input quantization: prefix.weight int8 q_ct,
                          prefix.weight_scale, and int8 zero points when asymmetric
    float-quantized /     fp8 weights (with / without input quantization): prefix.weight
    naive-quantized       float8_e4m3fn (our E4M3 bytes as they are), prefix.weight_scale fp32
                          ([rows, 1] channel, [rows, groups] group, [1] tensor, [⌈rows/128⌉,
                          cols/128] block)
    nvfp4-pack-quantized  prefix.weight_packed uint8 [rows, cols/2] (two E2M1 codes per byte, the
                          first in the low nibble), prefix.weight_scale float8_e4m3fn [rows, cols/16],
                          prefix.weight_global_scale fp32 [1] (the reciprocal of our tensor scale)
    mxfp4-pack-quantized  prefix.weight_packed uint8 [rows, cols/2], prefix.weight_scale uint8
    mxfp8-quantized       (E8M0 exponents) [rows, cols/32]; MXFP8: prefix.weight float8_e4m3fn

Values decode exactly: compressed-tensors dequantizes q · s (minus the zero point) in the scale's
dtype, so a scale is written in the model's dtype when that holds every stored scale exactly (fp32
always; fp16 for our fp16 scales) and in float32 otherwise; the product of a small integer or an
fp8 value with an fp32 scale is then the same float our codec's decode gives. Unquantized tensors
keep the model's dtype; f16 / bf16 codecs' tensors are written in their 16-bit dtype.

Refused with one line (schemes.NoScheme): a codec with no scheme, a pack with rotated codes
(incoherence), a quantized tensor that is not an nn.Linear weight, a tied head that is quantized,
a layer-streamed model (export needs the weights in memory).
"""
from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from quantatlas.export import schemes
from quantatlas.export.schemes import NoScheme
from quantatlas.quant.codecs.base import Packed, pack_bits, unpack_bits

#: shard the safetensors past this many bytes (transformers' save_pretrained default, 5 GB)
MAX_SHARD_BYTES = 5_000_000_000
#: compressed-tensors' version whose layout this writes (the config's `version` field)
LAYOUT_VERSION = "0.20.1"


# ---- codes in compressed-tensors' layouts -------------------------------------------------------------

def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit codes [rows, cols] -> int32 [rows, ceil(cols·bits/32)]: each row one
    little-endian bit stream (code j at bits j·bits ...), padded with zero codes to a multiple of 32,
    as compressed-tensors' pack_to_int32 stores them (32 codes fill exactly `bits` words)."""
    rows, cols = codes.shape
    padded = math.ceil(cols / 32) * 32
    full = torch.zeros(rows, padded, dtype=torch.int64, device=codes.device)
    full[:, :cols] = codes.to(torch.int64)
    stream = pack_bits(full, bits)                                   # rows · padded · bits / 8 bytes
    words = stream.view(torch.int32).reshape(rows, padded * bits // 32)   # little-endian words
    return words[:, :math.ceil(cols * bits / 32)].contiguous()


def _dtype_holding(values: torch.Tensor, preferred: torch.dtype) -> torch.dtype:
    """`preferred` (the model's dtype) when it represents every value exactly, else float32."""
    if preferred == torch.float32 or torch.equal(values.float().to(preferred).float(), values.float()):
        return preferred
    return torch.float32


def _uniform_tensors(p: Packed, args: dict, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rows, cols = p.shape
    bits = args["num_bits"]
    half = 1 << (bits - 1)
    codes = unpack_bits(p.data["codes"], bits, rows * cols).reshape(rows, cols)   # q - lo, in [0, 2^b)
    scale = p.data["scale"].float()
    out = {"weight_scale": scale.to(_dtype_holding(scale, dtype))}
    zero = p.data.get("zero")
    if fmt == schemes.PACK_QUANTIZED:
        out["weight_packed"] = pack_int32(codes, bits)
        out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if zero is not None:   # zero points z in [0, 2^b): stored as z - half + half, packed down the rows
            out["weight_zero_point"] = pack_int32(zero.round().to(torch.int64).t(), bits).t().contiguous()
    else:  # int-quantized: the signed codes as int8
        out["weight"] = (codes - half).to(torch.int8)
        if zero is not None:
            out["weight_zero_point"] = (zero.round().to(torch.int64) - half).to(torch.int8)
    return out


def _fp8_tensors(p: Packed, args: dict) -> dict[str, torch.Tensor]:
    rows, cols = p.shape
    codes = p.data["codes"].to(torch.uint8).reshape(rows, cols)
    scale = p.data["scale"].float()
    if args["strategy"] == "tensor":
        scale = scale.reshape(-1)[:1]
    elif args["strategy"] == "block":
        br, bc = args["block_structure"]
        scale = scale.reshape(math.ceil(rows / br), math.ceil(cols / bc))
    return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale": scale.contiguous()}


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, cols] -> uint8 [rows, cols/2], code 2j in the low nibble of byte j."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def _fp4_codes(p: Packed) -> torch.Tensor:
    """The E2M1 codes [rows, cols] (s|E|E|M: sign bit 3) of an nvfp4 / mx pack (a 4-bit stream)."""
    rows, cols = p.shape
    return unpack_bits(p.data["codes"], 4, rows * cols).reshape(rows, cols).to(torch.uint8)


#: fp32 neighbours of 1 / t tried as NVFP4's stored global scale (units in the last place each way)
GLOBAL_SCALE_ULPS = 4


def nvfp4_global_scale(t: torch.Tensor, block_scales: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """The fp32 global scale g stored for tensor scale t (our t = amax / (6 · 448); compressed-tensors
    stores its reciprocal and dequantizes P · (s / g), we P · (t · s)). fl(1 / t) does not always give
    fl(s / g) == fl(t · s), so g is the fp32 number within GLOBAL_SCALE_ULPS of fl(1 / t) that matches t · s
    on every block scale s the tensor uses where one does (then every consumer decodes our values
    exactly); else the one whose values after compressed-tensors' bfloat16 decompression (P · (s / g)
    rounded to bf16) match ours rounded to bf16 on the most weights; then the nearest to 1 / t."""
    base = (1.0 / t.float()).reshape(1)
    s = block_scales.float()
    ours = t.float() * s
    values = elements.float() * ours.repeat_interleave(elements.shape[1] // s.shape[1], 1)
    want = values.to(torch.bfloat16)
    best, best_key = base, None
    for k in range(-GLOBAL_SCALE_ULPS, GLOBAL_SCALE_ULPS + 1):
        g = (base.view(torch.int32) + k).view(torch.float32)
        theirs = s / g
        scale_misses = int((theirs != ours).sum())
        got = (elements.float() * theirs.repeat_interleave(elements.shape[1] // s.shape[1], 1)).to(torch.bfloat16)
        key = (scale_misses > 0, int((got != want).sum()), scale_misses, abs(k))
        if best_key is None or key < best_key:
            best, best_key = g, key
    return best


def _nvfp4_tensors(p: Packed) -> dict[str, torch.Tensor]:
    from quantatlas.quant.codecs.minifloat import E4M3, FP4

    rows, cols = p.shape
    tensor_scale = p.data["tensor_scale"].float().reshape(-1)
    if tensor_scale.numel() != 1:
        raise schemes.no_scheme("nvfp4", "tensor_scale per_row: compressed-tensors has one global scale per tensor")
    codes = _fp4_codes(p)
    scales = p.data["scales"].to(torch.uint8).reshape(rows, cols // 16)
    g = nvfp4_global_scale(tensor_scale, E4M3.decode(scales), FP4.decode(codes))
    return {"weight_packed": _nibbles(codes), "weight_scale": scales.view(torch.float8_e4m3fn),
            "weight_global_scale": g.to(torch.float32)}


def _mx_tensors(p: Packed, args: dict) -> dict[str, torch.Tensor]:
    rows, cols = p.shape
    scale = p.data["scales"].to(torch.uint8).reshape(rows, cols // 32)
    if args["num_bits"] == 4:
        return {"weight_packed": _nibbles(_fp4_codes(p)), "weight_scale": scale}
    return {"weight": p.data["codes"].to(torch.uint8).reshape(rows, cols).view(torch.float8_e4m3fn),
            "weight_scale": scale}


def stored_tensors(p: Packed, args: dict, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A pack as compressed-tensors' `fmt` stores it, keyed by the names after the module's prefix."""
    if p.codec == "uniform":
        return _uniform_tensors(p, args, fmt, dtype)
    if p.codec == "fp8":
        return _fp8_tensors(p, args)
    if p.codec == "nvfp4":
        return _nvfp4_tensors(p)
    if p.codec == "mx":
        return _mx_tensors(p, args)
    raise schemes.no_scheme(p.codec)


# ---- the plan: which scheme each Linear gets ------------------------------------------------------------

def _act_order_of(arm, model) -> dict[str, bool]:
    """Weight name -> whether its solver ran GPTQ's act_order (the plan's solver for that tensor)."""
    from quantatlas.models.roles import find_roles
    from quantatlas.quant.recipe import build_recipe

    out = {}
    for plan in build_recipe(arm).plan(find_roles(model), model):
        cfg = getattr(plan.solver, "cfg", None)
        out[f"{plan.name}.weight"] = bool(getattr(cfg, "act_order", False))
    return out


def _scheme_key(weights: dict | None, inputs: dict | None) -> str:
    return json.dumps([weights, inputs], sort_keys=True)


def plan_schemes(model, packed: dict[str, Packed], arm) -> tuple[dict[str, tuple[dict | None, dict | None]], list[str]]:
    """(Linear module name -> (weight args, input args)) for every Linear with a scheme, and the
    Linears with none (the ignore list). Raises NoScheme for what cannot be carried."""
    from quantatlas.models.roles import find_roles
    from quantatlas.quant.incoherence import IncoherentPacked

    schemes.online_rotations(arm)
    rotated = schemes.online_rotated_model(model, "compressed-tensors")
    if rotated:   # e.g. RoSTE's chosen down rotations, which the arm's transforms do not name
        raise NoScheme(f"compressed-tensors export: {rotated}", "recovery")
    inputs = schemes.activation_args(arm.act)
    linears = {t.name: t for t in find_roles(model) if t.kind == "linear"}
    modules = dict(model.named_modules())
    act_order = _act_order_of(arm, model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in packed.items():
        module = name.removesuffix(".weight")
        if isinstance(p, IncoherentPacked):
            raise NoScheme(f"compressed-tensors export: {name} holds incoherence-rotated codes (U W Vᵀ), which "
                           "compressed-tensors cannot undo", "solver_options.incoherence")
        if not name.endswith(".weight") or not isinstance(modules.get(module), torch.nn.Linear):
            raise NoScheme(f"compressed-tensors export: {name} ({p.codec}) is not an nn.Linear weight; only "
                           "Linear weights are exported quantized")
        if tied and linears.get(module) is not None and linears[module].role == "head" \
                and p.codec not in schemes.DENSE_CODECS:
            raise NoScheme(f"compressed-tensors export: {name} is tied to the embeddings and quantized; "
                           "compressed-tensors stores the two apart")
    out, ignore = {}, []
    for module, t in linears.items():
        p = packed.get(f"{module}.weight")
        weights = None if p is None else schemes.weight_args(p.codec, p.config, act_order.get(f"{module}.weight",
                                                                                                False))
        act = inputs if t.role != "head" else None
        if weights is None and act is None:
            ignore.append(module)
        else:
            out[module] = (weights, act)
    return out, ignore


def quantization_config(plan: dict[str, tuple], ignore: list[str], kv: dict | None) -> dict:
    """config.json's `quantization_config`: one config group per distinct (weights, inputs) scheme.
    The most common targets "Linear"; the others name their modules exactly, which both
    compressed-tensors (utils/match.py) and vLLM match before a class name; the Linears without a
    scheme are in `ignore`. (transformers' `dequantize=True` path decompresses every module with the
    first group's scheme, so a mixed-scheme folder loads there only without it.)"""
    groups: dict[str, list[str]] = defaultdict(list)
    for module, (w, a) in plan.items():
        groups[_scheme_key(w, a)].append(module)
    ordered = sorted(groups.items(), key=lambda kv_: -len(kv_[1]))
    config_groups, formats = {}, []
    for i, (key, modules) in enumerate(ordered):
        weights, inputs = json.loads(key)
        fmt = schemes.compression_format(weights, inputs) if weights is not None else "dense"
        if fmt != "dense":
            formats.append(fmt)
        targets = ["Linear"] if i == 0 else sorted(modules)
        config_groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": inputs,
                                       "output_activations": None, "format": fmt}
    distinct = sorted(set(formats))
    return {"config_groups": config_groups, "quant_method": "compressed-tensors",
            "format": distinct[0] if len(distinct) == 1 else (schemes.MIXED_PRECISION if distinct else "dense"),
            "quantization_status": "compressed", "kv_cache_scheme": kv, "global_compression_ratio": None,
            "ignore": sorted(ignore), "sparsity_config": {}, "transform_config": {},
            "version": LAYOUT_VERSION}


# ---- the writer ---------------------------------------------------------------------------------------

def _state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, each storage once (a tied head is the embedding)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def _save(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards, current, size = [], {}, 0
    for k in tensors:
        if current and size + sizes[k] > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = tensors[k]
        size += sizes[k]
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
    return names


def static_input_tensors(act, amax: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Linear's static input scale, from the amax its `act: {static: true}` codec was bound to:
    fp8 tensor: input_scale = the codec's scale (clip · amax / 448); nvfp4: input_global_scale = 1 / t
    (t = amax / (6 · 448), nvfp4.tensor_scale_of)."""
    cfg = act.codec_config()
    if cfg.name == "nvfp4":
        from quantatlas.quant.codecs.nvfp4 import tensor_scale_of

        t = tensor_scale_of(torch.tensor([amax], dtype=torch.float32), cfg.scale_selection)
        return {"input_global_scale": (1.0 / t).float()}
    scale = cfg.build().with_amax(amax).fit(torch.zeros(1, 1)).scale.reshape(1).float()
    return {"input_scale": scale.to(_dtype_holding(scale, dtype))}


def write_compressed_tensors(out: str | Path, model, packed: dict[str, Packed], arm, *, tokenizer=None,
                             input_amax: dict[str, float] | None = None,
                             max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write `model` (quantized by arm `arm`: its Linears hold the decoded weights; `packed` their stored
    codes, keyed by parameter name) as a compressed-tensors folder `out`. `input_amax`: each Linear's
    calibrated input amax for static activation scales (the act step's records["act_static_amax"]).
    Returns the quantization_config written, with `files` (the safetensors) and `schemes` (module ->
    format)."""
    if any(p.is_meta for p in model.parameters()):
        raise NoScheme("compressed-tensors export: the model is layer-streamed (its weights are not in memory); "
                       "set QUANTATLAS_STREAM=0", "model")
    plan, ignore = plan_schemes(model, packed, arm)
    if not plan:
        raise NoScheme("compressed-tensors export: the arm quantizes no Linear (nothing for a scheme to describe)",
                       "codec")
    from quantatlas.models.layout import layout

    kv = schemes.kv_args_for(schemes.kv_cache_args(arm.kv), layout(model).head_dim) if arm.kv is not None else None
    qconfig = quantization_config(plan, ignore, kv)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    formats = {}
    for g in qconfig["config_groups"].values():
        if g["targets"] != ["Linear"]:
            formats.update({m: g["format"] for m in g["targets"]})
    for m in plan:
        formats.setdefault(m, qconfig["config_groups"]["group_0"]["format"])

    tensors = _state_dict(model)
    for module, (weights, inputs) in plan.items():
        if inputs is not None and inputs["dynamic"] is not True:   # a static (or NVFP4's global) input scale
            if module not in (input_amax or {}):
                raise NoScheme(f"compressed-tensors export: {module}'s static activation scale was not recorded "
                               "(quantize the arm with its act step to export it)", "act.static")
            tensors.update({f"{module}.{k}": v for k, v in
                            static_input_tensors(arm.act, input_amax[module], dtype).items()})
        name = f"{module}.weight"
        p = packed.get(name)
        if p is None:
            continue
        if weights is None:   # f16 / bf16: the dense tensor in its 16-bit dtype
            tensors[name] = p.decode().to(torch.float16 if p.codec == "f16" else torch.bfloat16).contiguous()
            continue
        if tuple(p.shape) != tuple(tensors[name].shape):
            raise NoScheme(f"compressed-tensors export: packed {name} has shape {tuple(p.shape)}, the model's is "
                           f"{tuple(tensors[name].shape)}")
        del tensors[name]
        for suffix, t in stored_tensors(p, weights, formats[module], dtype).items():
            tensors[f"{module}.{suffix}"] = t.detach().cpu().contiguous()
    for name, p in packed.items():   # dense 16-bit packs of Linears without a group (no act, no scheme)
        module = name.removesuffix(".weight")
        if module not in plan and p.codec in schemes.DENSE_CODECS:
            tensors[name] = p.decode().to(torch.float16 if p.codec == "f16" else torch.bfloat16).contiguous()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _save(tensors, out, max_shard_bytes)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.quantization_config = qconfig
    config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return dict(qconfig, files=files, schemes=formats)
