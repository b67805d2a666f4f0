"""Which compressed-tensors scheme carries an arm, from its configs alone (no torch, no compute).

compressed-tensors (the format vLLM and transformers load; llm-compressor writes it) describes
each quantized Linear by `QuantizationArgs` for its weights and, optionally, its input activations,
and the model's KV cache by one more `QuantizationArgs`. Here each of our configs is mapped to the
args that mean exactly what it stores, or refused with the reason:

weights (a codec's config; the stored codes and scales define the values, whatever rule chose them)
    uniform {bits b, group g | null, symmetric}   int, b bits, strategy group (group_size g) or
                                                  channel (g null); asymmetric: zero points
    fp8 e4m3 {group g | null}                     float 8, strategy group or channel
    fp8 e4m3 {granularity tensor | block}         float 8, strategy tensor / block [128, 128]
    nvfp4 {block: 16}                             float 4, strategy tensor_group, group 16, fp8 scales
    mx {element: fp4_e2m1 | fp8_e4m3, block 32}   float 4 / 8, strategy group 32, uint8 (E8M0) scales
    f16, bf16                                     no quantization: written as a dense tensor
GPTQ's act_order (with static groups: the stored groups stay on the column grid, so no group
index is needed) is `actorder: weight`, compressed-tensors' name for exactly that (its `group`
order, which needed a g_idx, was removed in 0.20).

activations (`act:`; compressed-tensors quantizes each Linear's input as the forward sees it)
    int b-bit per token (uniform {bits b, group null, symmetric})  int, strategy token, dynamic
    fp8 per token (fp8 {group null}) / per group of g              float 8, strategy token / group g
    fp8 {granularity: tensor}                                      float 8, strategy tensor, dynamic;
                                with `static: true`                static, the calibrated input_scale
    nvfp4 with `static: true`   float 4, tensor_group 16, dynamic local (block scales per call), the
                                calibrated input_global_scale (NVFP4's activation half)
    mx {element: fp4_e2m1 | fp8_e4m3}                              float 4 / 8, group 32, dynamic
    Only the format is carried: the runtime picks each token's scale by its own rule
    (compressed-tensors' reference: amax / 127.5 for int8, amax / 448 for fp8; vLLM's int8
    kernel: amax / 127), which our fp8 per-token activations match exactly and our int ones
    (absmax: amax / 127 rounded to fp16) to within that rounding.

KV cache (`kv:`)
    k and v the same fp8 codec, per token (one scale per token and head over head_dim, or per
    group g of head_dim), after RoPE, no residual / sinks / rotation: float 8, strategy group
    (group_size g or head_dim), dynamic, which is what compressed-tensors' cache hook computes
    on [batch, heads, tokens, head_dim]. (vLLM's fp8 cache takes static per-tensor scales; see
    export/runtimes.py.)

Refused, each in one line that names the codec or field and what would carry it instead: codecs
with no scheme (ggml types and gguf mixtures: GGUF; trellis, lattices, AQLM, VQ, ...: none, a
research format), online rotations, activation clip ratios / Hadamards / role or layer subsets,
and caches compressed-tensors cannot express.
"""
from __future__ import annotations

from typing import Any

from quantatlas.errors import UserError
from quantatlas.quant.config import arm_codecs

#: compressed-tensors' format names (compressed_tensors.config.CompressionFormat)
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
NAIVE_QUANTIZED = "naive-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
MXFP8_QUANTIZED = "mxfp8-quantized"
MIXED_PRECISION = "mixed-precision"

#: codecs stored as plain 16-bit tensors (no quantization scheme: the dense weight)
DENSE_CODECS = ("f16", "bf16")
#: ggml block types (llama.cpp's weight formats) and the gguf mixture of them
GGML_CODECS = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0", "q8_1", "q8_k",
               "iq4_nl", "iq4_xs", "mxfp4")
#: where a codec without a compressed-tensors scheme can go instead
ELSEWHERE: dict[str, str] = {
    "trellis": "QTIP's own checkpoint format (a research format here)",
    "e8p": "QuIP#'s E8P format (a research format here)",
    "aqlm": "AQLM's own format (a research format here)",
    "sparse24": "none (compressed-tensors dropped its 2:4 formats in 0.15; a research format here)",
}
GGUF_ELSEWHERE = "GGUF (quantatlas export --format gguf; llama.cpp)"
NOWHERE = "none: no runtime format stores it (a research format)"


class NoScheme(UserError):
    """An arm that compressed-tensors cannot carry: one line naming the codec (or field) and what would."""


def carried_by(codec: str) -> str:
    """The formats that would carry `codec` instead of compressed-tensors."""
    if codec in GGML_CODECS or codec == "gguf":
        return GGUF_ELSEWHERE
    return ELSEWHERE.get(codec, NOWHERE)


def no_scheme(codec: str, why: str = "", field: str | None = None) -> NoScheme:
    reason = f" ({why})" if why else ""
    return NoScheme(f"compressed-tensors export: codec {codec}{reason} has no compressed-tensors scheme; "
                    f"formats that would carry it: {carried_by(codec)}", field)


# ---- weights -------------------------------------------------------------------------------------

def _args(num_bits: int, type_: str, strategy: str, *, symmetric: bool = True, group_size: int | None = None,
          dynamic: bool | str = False, **more) -> dict[str, Any]:
    """QuantizationArgs as compressed-tensors serialises them (its model_dump: optional fields only when set)."""
    out = {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
           "strategy": strategy, "dynamic": dynamic}
    out.update({k: v for k, v in more.items() if v is not None})
    return out


def weight_args(codec: str, options: dict, actorder: bool = False, field: str | None = None) -> dict | None:
    """compressed-tensors weight args for a codec (name and options, as `Packed.config` or
    `CodecConfig.options()` give them); None for a dense 16-bit codec; NoScheme if none carries it."""
    order = "weight" if actorder else None
    if codec in DENSE_CODECS:
        return None
    if codec == "uniform":
        group = options.get("group")
        return _args(int(options["bits"]), "int", "channel" if group is None else "group",
                     symmetric=bool(options.get("symmetric", True)), group_size=group, actorder=order)
    if codec == "fp8":
        return _fp8_weight_args(options, order, field)
    if codec == "nvfp4":
        return _nvfp4_weight_args(options, order, field)
    if codec == "mx":
        return _mx_weight_args(options, order, field)
    raise no_scheme(codec, field=field)


def _fp8_weight_args(options: dict, order, field) -> dict:
    element = options.get("format", options.get("element", "e4m3"))
    if element != "e4m3":
        raise no_scheme("fp8", f"element {element}: compressed-tensors' float 8 is E4M3 only", field)
    granularity = options.get("granularity")
    group = options.get("group")
    if granularity == "tensor":
        return _args(8, "float", "tensor", actorder=order)
    if granularity == "block":
        block = options.get("block", 128)
        shape = list(block) if isinstance(block, (list, tuple)) else [int(block), int(block)]
        return _args(8, "float", "block", block_structure=shape, actorder=order)
    if group is None:
        return _args(8, "float", "channel", actorder=order)
    return _args(8, "float", "group", group_size=int(group), actorder=order)


def _nvfp4_weight_args(options: dict, order, field) -> dict:
    block = int(options.get("block", 16))
    if block != 16:
        raise no_scheme("nvfp4", f"block {block}: NVFP4 is blocks of 16", field)
    if options.get("tensor_scale", "per_tensor") not in ("per_tensor", "fused"):
        raise no_scheme("nvfp4", f"tensor_scale {options.get('tensor_scale')}", field)
    return _args(4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn",
                 zp_dtype="torch.float8_e4m3fn", actorder=order)


#: mx element -> (num_bits) compressed-tensors carries (its MXFP4 / MXFP8 schemes)
MX_ELEMENTS = {"fp4_e2m1": 4, "fp8_e4m3": 8}


def _mx_weight_args(options: dict, order, field) -> dict:
    element = options.get("element", "fp4_e2m1")
    block = int(options.get("block", 32))
    if element not in MX_ELEMENTS or block != 32:
        raise no_scheme("mx", f"element {element}, block {block}: compressed-tensors carries MXFP4 (fp4_e2m1) and "
                              "MXFP8 (fp8_e4m3) in blocks of 32", field)
    return _args(MX_ELEMENTS[element], "float", "group", group_size=32, scale_dtype="torch.uint8",
                 zp_dtype="torch.uint8", actorder=order)


# ---- activations and the KV cache ----------------------------------------------------------------

def _input_args(codec_cfg, static: bool, where: str) -> dict:
    """Input args for an activation codec applied to each token's row (`static`: its per-tensor scale
    calibrated once, quant/act.py)."""
    name, options = codec_cfg.name, codec_cfg.options()
    granularity = options.get("granularity")
    if static:   # act.py allows it only for a per-tensor scale: fp8 tensor, nvfp4 per_tensor / fused
        if name == "fp8" and options.get("format", "e4m3") == "e4m3" and granularity == "tensor":
            return _args(8, "float", "tensor")
        if name == "nvfp4" and int(options.get("block", 16)) == 16:
            return _args(4, "float", "tensor_group", group_size=16, dynamic="local",
                         scale_dtype="torch.float8_e4m3fn", zp_dtype="torch.float8_e4m3fn")
    elif name == "fp8" and options.get("format", "e4m3") == "e4m3" and granularity == "tensor":
        return _args(8, "float", "tensor", dynamic=True)
    elif name == "mx" and options.get("element", "fp4_e2m1") in MX_ELEMENTS and int(options.get("block", 32)) == 32:
        return _args(MX_ELEMENTS[options.get("element", "fp4_e2m1")], "float", "group", group_size=32, dynamic=True,
                     scale_dtype="torch.uint8", zp_dtype="torch.uint8")
    if name == "nvfp4" and not static:
        raise NoScheme(f"compressed-tensors export: {where} nvfp4 activations need `static: true`: "
                       "compressed-tensors' NVFP4 takes a calibrated global input scale (its block scales are "
                       "dynamic), not one of each forward call", where)
    if static:
        raise NoScheme(f"compressed-tensors export: {where} codec {name} {options} with static: true has no "
                       "compressed-tensors activation scheme", where)
    if name == "uniform" and options.get("symmetric", True):
        group = options.get("group")
        if group is None:
            return _args(int(options["bits"]), "int", "token", dynamic=True)
        return _args(int(options["bits"]), "int", "group", group_size=int(group), dynamic=True)
    if name == "fp8" and options.get("format", "e4m3") == "e4m3" and granularity in (None, "channel"):
        group = options.get("group")
        if group is None:
            return _args(8, "float", "token", dynamic=True)
        return _args(8, "float", "group", group_size=int(group), dynamic=True)
    raise NoScheme(f"compressed-tensors export: {where} codec {name} {options} has no compressed-tensors "
                   "activation scheme (it carries int and fp8 per-token or per-group dynamic activations)", where)


def activation_args(act, where: str = "act") -> dict | None:
    """compressed-tensors input-activation args for an arm's `act:` (None without one)."""
    if act is None:
        return None
    if act.scheme == "llamacpp_cpu":
        raise NoScheme(f"compressed-tensors export: {where}.scheme llamacpp_cpu is llama.cpp's activation "
                       f"rounding; formats that would carry it: {GGUF_ELSEWHERE}", f"{where}.scheme")
    for option, unset, what in (("clip_ratio", 1.0, "a clip ratio"), ("hadamard", [], "an online Hadamard"),
                                ("roles", None, "a subset of roles"), ("layers", None, "a subset of layers")):
        if getattr(act, option) != unset:
            raise NoScheme(f"compressed-tensors export: {where}.{option}: {what} on the activations has no "
                           "compressed-tensors scheme (it quantizes every targeted Linear's input as is)",
                           f"{where}.{option}")
    if act.head:
        raise NoScheme(f"compressed-tensors export: {where}.include_head: a quantized head input has no "
                       "compressed-tensors scheme here (the head stays unquantized)", f"{where}.include_head")
    return _input_args(act.codec_config(), bool(getattr(act, "static", False)), f"{where}.codec")


def kv_cache_args(kv, where: str = "kv") -> dict | None:
    """compressed-tensors kv_cache_scheme for an arm's `kv:` (None without a quantized cache)."""
    if kv is None or (kv.k is None and kv.v is None):
        return None
    if kv.k is None or kv.v is None or kv.k != kv.v:
        raise NoScheme(f"compressed-tensors export: {where}: K and V need the same codec (compressed-tensors has "
                       "one kv_cache_scheme for both)", where)
    for option, plain in (("placement", "post_rope"), ("k_granularity", "token"), ("v_granularity", "token"),
                          ("residual", 0), ("sinks", 0), ("rotate", False)):
        if getattr(kv, option) != plain:
            raise NoScheme(f"compressed-tensors export: {where}.{option} {getattr(kv, option)!r} has no "
                           f"compressed-tensors KV-cache scheme (it quantizes every stored token after RoPE, "
                           f"{option} {plain!r})", f"{where}.{option}")
    codec = kv.k
    options = codec.options()
    if codec.name != "fp8" or options.get("format", "e4m3") != "e4m3" or options.get("granularity") not in (None,
                                                                                                             "channel"):
        raise NoScheme(f"compressed-tensors export: {where}.k codec {codec.name} {options} has no compressed-tensors "
                       "KV-cache scheme that computes the same (it carries fp8 E4M3 per token and head, or per "
                       "group of head_dim)", f"{where}.k")
    return {"group": options.get("group")}   # group_size: the model's head_dim when null (filled by the writer)


def kv_args_for(kv_plan: dict | None, head_dim: int) -> dict | None:
    """The kv_cache_scheme args once the model's head_dim is known."""
    if kv_plan is None:
        return None
    group = kv_plan["group"] or head_dim
    if head_dim % group:
        raise NoScheme(f"compressed-tensors export: kv group {group} does not divide head_dim {head_dim}", "kv.k")
    return _args(8, "float", "group", group_size=group, dynamic=True)


# ---- formats ---------------------------------------------------------------------------------------

def compression_format(weights: dict, inputs: dict | None) -> str:
    """The format compressed-tensors infers for a Linear's scheme (compressors/format.py: the first of
    its priority list whose compressor can compress it)."""
    if weights["type"] == "float" and weights["strategy"] == "group" and weights.get("scale_dtype") == "torch.uint8":
        return MXFP4_PACK_QUANTIZED if weights["num_bits"] == 4 else MXFP8_QUANTIZED
    if weights["type"] == "float" and weights["num_bits"] == 4:
        return NVFP4_PACK_QUANTIZED
    if weights["type"] == "int":
        if inputs is not None:
            return INT_QUANTIZED
        return PACK_QUANTIZED
    return FLOAT_QUANTIZED if inputs is not None else NAIVE_QUANTIZED


def arm_online_rotation(arm, where: str = "arm") -> tuple[str, str] | None:
    """(field, one line naming it) of the first rotation of Linear inputs at run time that the arm asks for,
    or None: a transform's online Hadamards (hadamard's, SpinQuant's on o/down inputs), or RoSTE's
    down_proj rotation, which `rotation: adaptive` chooses per layer from data and `hadamard` always takes.
    A file format without run-time rotations cannot carry either."""
    for i, t in enumerate(arm.transforms):
        if getattr(t, "online", None):
            return f"{where}.transforms.{i}", (f"{where}.transforms.{i}.{t.name}.online {list(t.online)}: an online "
                                               "rotation of the Linear inputs (write online: [] to fold every "
                                               "rotation into the weights)")
    rec = arm.recovery
    if rec is not None and rec.method == "roste" and rec.rotation != "none":
        return f"{where}.recovery.rotation", (f"{where}.recovery.rotation {rec.rotation}: RoSTE may rotate "
                                               "down_proj's input online (write rotation: none: STE with the act "
                                               "and KV quantizers in the loop, no rotation)")
    return None


def online_rotations(arm, where: str = "arm") -> None:
    """Refuse an arm whose Linear inputs may be rotated at run time (`arm_online_rotation`)."""
    if (found := arm_online_rotation(arm, where)) is not None:
        field, line = found
        raise NoScheme(f"compressed-tensors export: {line}; compressed-tensors has no scheme for it here", field)


def online_rotated_model(model, fmt: str) -> str | None:
    """What a file format `fmt` without run-time rotations cannot carry: the modules of `model` that rotate
    their input online (whatever put them there: an arm's transform, RoSTE's chosen down rotations), as one
    line, or None. A runtime would read their rotated weights with unrotated inputs."""
    from quantatlas.quant.online import online_rotated

    rotated = online_rotated(model)
    if not rotated:
        return None
    return f"{rotated[0]} (and {len(rotated) - 1} more) rotate their input online, which {fmt} cannot carry"


def check_arm(arm, where: str = "arm") -> None:
    """Refuse, before any compute, an arm compressed-tensors cannot carry (NoScheme: one line)."""
    for codec, field in arm_codecs(arm, where):
        weight_args(codec.name, codec.options(), field=field)
    if getattr(arm.solver_options, "incoherence", False):
        raise NoScheme(f"compressed-tensors export: {where}.solver_options.incoherence: GPTQ's incoherence "
                       "processing stores rotated codes, which compressed-tensors cannot undo",
                       f"{where}.solver_options.incoherence")
    if getattr(arm, "freeze_dry", None) is not None:
        raise NoScheme(f"compressed-tensors export: {where}.freeze_dry: a freeze-dried matrix rebuilds its dropped "
                       "weights on load, which compressed-tensors cannot do (research format)", f"{where}.freeze_dry")
    online_rotations(arm, where)
    activation_args(arm.act, f"{where}.act")
    kv_cache_args(arm.kv, f"{where}.kv")
