"""`runs_on` of a measured arm: which runtimes load its quantized model as it was measured
(the record's shape and vocabulary: quantatlas/runtimes.py).

llama.cpp, when every stored tensor is a ggml type llama.cpp loads as a weight (q8_1 and q8_k are
only its activation types) or a 16-bit float, no tensor holds rotated codes (incoherence) or is
freeze-dried (rebuilt on load), no Linear input is rotated online (an arm's online transform, RoSTE
unless `rotation: none`, or any rotation the quantized model carries), the activations are unquantized or llama.cpp's own
(`act: llamacpp_cpu`), and the KV cache is unquantized or one of llama.cpp's cache types (`-ctk`/
`-ctv`: f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1) stored per token after RoPE with no fp16
window or sinks (`rotate: auto` is llama.cpp's own default).

vLLM, when the compressed-tensors export carries the arm (export/schemes.py: every quantized tensor
an nn.Linear weight with a scheme; neither the embeddings nor the head quantized) and vLLM has a
kernel for each Linear's scheme; the KV cache unquantized (vLLM's fp8 cache takes static per-tensor
scales, which no `kv:` codec here computes). The kernels and the lowest compute capability that runs
each natively, from vLLM's compressed-tensors schemes (get_min_capability):

    W4A16 / W8A16        int4 / int8 weights, per channel or groups of 32, 64, 128, symmetric   Marlin, sm80
    W4A16_ASYM           int4 weights with zero points (same groups)                            Marlin, sm80
    W8A8                 int8 weights per channel + int8 per-token dynamic activations         CUTLASS, sm75
    FP8_W8A16            fp8 weights per channel or tensor, activations unquantized            Marlin, sm80
    FP8_DYNAMIC / FP8    fp8 weights per channel or tensor + fp8 activations per token
                         (dynamic) / per tensor (static)                                       sm89 (Ada, Hopper)
    FP8_BLOCK            fp8 128×128 weight blocks + fp8 activations per group of 128          sm89
    NVFP4A16 / MXFP4A16  FP4 weights, activations unquantized                                  Marlin, sm80
    NVFP4 / MXFP4        FP4 weights and FP4 activations                                       sm100 (Blackwell)

Anything else (2/3/5/6/7-bit integers, other group sizes, W4A4 / W4A8 integers, e5m2, MXFP6/MXFP8,
a quantized cache) has no vLLM kernel here: not listed. An arm no runtime loads is a research format
(an empty list).
"""
from __future__ import annotations

from quantatlas.export import schemes
from quantatlas.runtimes import GPU_GENERATIONS, LLAMACPP_TYPES

#: llama.cpp's KV-cache types (common/arg.cpp kv_cache_types) as our codec names
LLAMACPP_CACHE_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
#: Marlin's group sizes (None: per channel)
MARLIN_GROUPS = (None, 32, 64, 128)


def vllm_kernel(weights: dict | None, inputs: dict | None) -> tuple[str, int] | None:
    """(scheme name, lowest compute capability ×10) of vLLM's kernel for a Linear's compressed-tensors
    weight and input args; None where vLLM has none."""
    if weights is None:
        return None
    w, a = weights, inputs
    bits, kind, strategy = w["num_bits"], w["type"], w["strategy"]
    if kind == "int":
        if a is None and bits in (4, 8) and w.get("group_size") in MARLIN_GROUPS \
                and strategy in ("channel", "group"):
            if w["symmetric"]:
                return f"W{bits}A16", 80
            return ("W4A16_ASYM", 80) if bits == 4 else None
        if a is not None and bits == 8 and strategy == "channel" and w["symmetric"] and a["type"] == "int" \
                and a["num_bits"] == 8 and a["strategy"] == "token" and a["dynamic"] is True:
            return "W8A8", 75
        return None
    if kind == "float" and bits == 8 and w.get("scale_dtype") is None:
        if strategy in ("channel", "tensor"):
            if a is None:
                return "FP8_W8A16", 80
            if a["type"] == "float" and a["num_bits"] == 8 and a.get("scale_dtype") is None:
                if a["strategy"] == "token" and a["dynamic"] is True:
                    return "FP8_DYNAMIC", 89
                if a["strategy"] == "tensor" and a["dynamic"] is False:
                    return "FP8", 89
            return None
        if strategy == "block" and w.get("block_structure") == [128, 128] and a is not None \
                and a["type"] == "float" and a["num_bits"] == 8 and a["strategy"] == "group" \
                and a.get("group_size") == 128 and a["dynamic"] is True:
            return "FP8_BLOCK", 89
        return None
    if kind == "float" and bits == 4:
        nv = strategy == "tensor_group"
        name = "NVFP4" if nv else "MXFP4"
        if a is None:
            return f"{name}A16", 80
        if a["type"] == "float" and a["num_bits"] == 4 and a["strategy"] == strategy:
            return name, 100
    return None


def llamacpp_entry(types: set[str], arm, incoherent: bool) -> dict | None:
    """llama.cpp's entry for an arm whose stored tensors have these codec `types` (module docstring)."""
    if incoherent or not types <= set(LLAMACPP_TYPES):
        return None
    if schemes.arm_online_rotation(arm) is not None:
        return None
    if arm.act is not None and arm.act.scheme != "llamacpp_cpu":
        return None
    kv = arm.kv
    if kv is not None and (kv.k is not None or kv.v is not None):
        halves = [c.name for c in (kv.k, kv.v) if c is not None]
        if any(h not in LLAMACPP_CACHE_TYPES for h in halves) or kv.placement != "post_rope" \
                or kv.k_granularity != "token" or kv.v_granularity != "token" or kv.residual or kv.sinks \
                or kv.rotate is True:
            return None
    return {"runtime": "llama.cpp", "format": "gguf", "types": sorted(types or {"f16"})}


def vllm_entry(tensors: dict[str, tuple[str, dict, str | None]], arm, linears: dict[str, str] | None) -> dict | None:
    """vLLM's entry: `tensors` maps each stored weight (parameter name) to (codec, options, role);
    `linears` every nn.Linear module -> role (None when unknown: a layer-streamed skeleton)."""
    try:
        schemes.online_rotations(arm)
        inputs = schemes.activation_args(arm.act)
        if arm.kv is not None and any(c is not None and c.name not in ("f16", "bf16") for c in (arm.kv.k, arm.kv.v)):
            return None
        found = set()
        for name, (codec, options, role) in tensors.items():
            if role in ("embed", "head") or not name.endswith(".weight"):
                return None
            weights = schemes.weight_args(codec, options)
            kernel = vllm_kernel(weights, inputs) if weights is not None else (
                ("unquantized", 70) if inputs is None else None)
            if kernel is None:
                return None
            found.add(kernel)
        if inputs is not None and linears is not None:   # unquantized Linears whose inputs the arm quantizes
            for module, role in linears.items():
                if role != "head" and f"{module}.weight" not in tensors:
                    return None
    except schemes.NoScheme:
        return None
    if not found:
        found = {("unquantized", 70)}
    sm = max(s for _, s in found)
    return {"runtime": "vllm", "format": "compressed-tensors", "schemes": sorted({n for n, _ in found}),
            "min_sm": sm, "gpu": GPU_GENERATIONS[sm]}


def runs_on(packed: dict, arm, model=None) -> list[dict]:
    """runs_on of an arm quantized into `packed` (parameter name -> Packed) on `model` (for its roles)."""
    from quantatlas.quant.freeze_dry import FrozenPacked
    from quantatlas.quant.incoherence import IncoherentPacked
    from quantatlas.quant.online import online_rotated

    if any(isinstance(p, FrozenPacked) for p in packed.values()) or (model is not None and online_rotated(model)):
        return []    # weights rebuilt on load, or inputs rotated at run time: neither runtime does either
    roles, linears = _roles(model)
    tensors = {name: (p.codec, p.config, roles.get(name)) for name, p in packed.items()}
    return _entries(tensors, arm, any(isinstance(p, IncoherentPacked) for p in packed.values()), linears)


def planned_runs_on(arm, model) -> list[dict] | None:
    """runs_on from the arm's recipe on `model` (a layer-streamed run's meta skeleton, whose packs are
    in files): each tensor's planned codec. None where the codecs are chosen at run time (allocate)."""
    from quantatlas.quant.quantize import tensors_to_quantize
    from quantatlas.quant.recipe import build_recipe

    if arm.allocate is not None:
        return None
    if getattr(arm, "freeze_dry", None) is not None:
        return []
    recipe = build_recipe(arm)
    tensors = {f"{p.name}.weight": (p.codec.name, p.codec.config(), p.role)
               for p in recipe.plan(tensors_to_quantize(model, recipe), model) if p.codec is not None}
    incoherent = any(getattr(getattr(s, "cfg", None), "incoherence", False) for s in recipe.solvers)
    return _entries(tensors, arm, incoherent, _roles(model)[1])


def _roles(model) -> tuple[dict[str, str], dict[str, str] | None]:
    if model is None:
        return {}, None
    from quantatlas.models.roles import find_roles

    found = find_roles(model)
    return {f"{t.name}.weight": t.role for t in found}, {t.name: t.role for t in found if t.kind == "linear"}


def _entries(tensors: dict[str, tuple[str, dict, str | None]], arm, incoherent: bool,
             linears: dict[str, str] | None) -> list[dict]:
    from quantatlas.quant.recipe import VECTOR_ROLES

    if any(role in VECTOR_ROLES for _, _, role in tensors.values()):
        return []    # a quantized norm: neither runtime stores one
    out = []
    types = {codec for codec, _, _ in tensors.values()}
    if (entry := llamacpp_entry(types, arm, incoherent)) is not None:
        out.append(entry)
    if not incoherent and (entry := vllm_entry(tensors, arm, linears)) is not None:
        out.append(entry)
    return out


def measured_runs_on(qm, arm) -> list[dict] | None:
    """runs_on of a quantized model as the pipeline returned it (quant/pipeline.py QuantizedModel): from its
    packs in memory, from the recipe for a layer-streamed run; None for an artifact arm (an external
    checkpoint: its own format says where it runs) and where the codecs are chosen at run time."""
    if getattr(qm, "external", None) is not None:
        return None
    if qm.streamed is not None:
        return planned_runs_on(arm, qm.model)
    return runs_on(qm.packed, arm, qm.model)
