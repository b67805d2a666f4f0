"""Activation quantization: the input of every Linear (the head only if asked) goes through a
codec at run time, one row per token (fake quantization: the Linear then multiplies the decoded
values). Scales are dynamic: computed from each token's own values in every forward pass.

    act: {codec: {uniform: {bits: 8, group: null}}}      per-token dynamic int8 (any codec works)
    act: {codec: {uniform: {bits: 4, group: null, symmetric: false}}, clip_ratio: 0.9}
    act: {codec: fp8}                                    per-token dynamic FP8 E4M3
    act: W8A8                                            a preset (below), = {scheme: W8A8}
    act: {scheme: W4A4, clip_ratio: 0.9, hadamard: [o, down]}
    act: llamacpp_cpu                                    what llama.cpp's CPU backend does

Presets (`scheme`) name the activation half of the compressed-tensors / llm-compressor schemes;
the weights are the arm's own `codec`, and the KV cache its `kv`:

    W8A8, W4A8, INT8       int8, symmetric, per-token dynamic (uniform {bits: 8, group: null})
    W4A4                   int4, symmetric, per-token dynamic (uniform {bits: 4, group: null})
    FP8, FP8_DYNAMIC       FP8 E4M3, per-token dynamic (fp8 {group: null})
    llamacpp_cpu           per Linear, from its weight type, as ggml-cpu's type_traits_cpu
                           (vec_dot_type) say: k-quant and IQ weights (q2_k..q6_k, iq4_xs) multiply
                           Q8_K activations; q4_0, q5_0, q8_0, iq4_nl: Q8_0; q4_1, q5_1: Q8_1;
                           f16 (unquantized) weights: fp16-rounded activations. The head is
                           included by default (llama.cpp quantizes its input too).
                           Linear inputs only; attention's roundings are the cache's: with
                           flash attention (llama.cpp's CPU default) ggml-cpu (ops.cpp,
                           flash_attn_ext) takes batches of >= 64 query rows (llama-perplexity's)
                           through its tiled kernel, where Q stays fp32 and the GEMMs and
                           accumulators are fp32, so the only rounding is K and V stored in the
                           cache: add `kv: {k: f16, v: f16}` (its default cache type) or the
                           quantized cache type. Not modelled: the one-row kernel of smaller
                           batches and decoding (Q rounded to fp16, P·V accumulated in an fp16
                           vector; a quantized K cache makes Q its vec_dot_type, Q8_0/Q8_1), and
                           attention without flash attention (Q and the softmax P rounded to fp16).

A W4A4KV4 arm (QuaRot's name) is written as its three parts:

    codec: {uniform: {bits: 4, group: 128}}
    act: {scheme: W4A4}
    kv: {k: {uniform: {bits: 4, group: 64, symmetric: false}}, v: {uniform: {bits: 4, group: 64, symmetric: false}}}
    transforms: [{hadamard: {online: [o, down]}}]     # "with rotations": QuaRot's residual, head and online ones

`roles: [q, k, v]` / `layers: [0, 5]` restrict the step to the inputs of those Linear roles and
decoder layers (both: the intersection; the head still follows `include_head`), for attributing
the error of an activation scheme to where it is spent; the bits average over the quantized
Linears only.
`clip_ratio` r < 1 shrinks each codec group's range by r (QuaRot's activation clip ratio): a
uniform or FP8 grid takes r times its min-max scale and values beyond it saturate at the grid's
ends; any other codec sees each group clamped to r times its range.
`static: true` fixes a per-tensor scale from calibration instead of each forward's activations: for codecs
with one scale per matrix (`fp8 {granularity: tensor}`, `nvfp4` with `tensor_scale: per_tensor`), each
Linear's codec is bound to the largest |x| of its input over the calibration set (run through the model
as the weight step left it, activations unquantized), as vLLM's static FP8 input scales and NVFP4's
static global scale with dynamic block scales (compressed-tensors' NVFP4 scheme) are calibrated;
`act: {codec: {nvfp4: {}}, static: true}` is that scheme's activation half. Block and per-token scales
stay dynamic. Such codecs see each token row whole (their groups are blocks of it), so without `static`
their tensor scale is the forward call's (all tokens of an eval batch; `tensor_scale: per_row` makes it
each token's own, at 32 more bits per token); `clip_ratio` does not apply to them.
`hadamard: [o, down]` rotates the input of o_proj / down_proj by a randomized Hadamard matrix Q
(signs from the seed) before the quantizer and back after it, x ↦ Qᵀ fq(Q x): the quantizer sees
the rotated activations as an online Hadamard (QuaRot) makes them, while the weights stay as the
weight step left them (equal to W Qᵀ applied to Q x). The `hadamard` transform's `online` rotates
the weights too; a Linear (or an expert's down) rotated by it is refused here (it is already rotated),
and the quantizers see the input it rotated (fused experts too: models/moe.py, `BoundMoE.output`).

Mixtures of experts: each expert's gate, up and down count as three Linears (roles `expert_gate`,
`expert_up`, `expert_down`, for `roles`, `layers`, the bits and `static` as any other), whichever way the
experts are stored. A ModuleList of expert MLPs is hooked Linear by Linear. Fused experts (transformers
5: one module holding every expert's matrices in 3-D tensors, `FusedExperts`) run a forward of ours
while the step is attached, the model's own computation (models/moe.py, `BoundMoE.output`) with each
matrix's input quantized on the rows routed to that expert: exactly what hooks on every expert's own
Linears do. Gate and up read the token's hidden state, so with a per-token codec quantizing the block's
input rows once and handing each expert its routed rows is the same as quantizing each expert's rows
(a row's quantization depends on that row only); codecs whose scale spans the call's rows (nvfp4 or fp8
with a tensor scale, not static) and codecs that differ between experts (static amaxes, llamacpp_cpu's
weight types) quantize each expert's rows on their own, as that expert's hooked Linear would. Down reads
act(gate x) ⊙ up x, computed inside the fused forward, quantized per token there. `hadamard: [down]`
rotates the input of every down projection: the dense MLP's, each expert's (one rotation per layer,
shared by its experts) and a shared expert's. `static` calibrates one amax per expert input, as each
hooked Linear has its own (an expert no calibration token reached gets 0). The routers' inputs (`router`,
`shared_router`) are left unquantized unless `roles` names them, as vLLM keeps its MoE gates unquantized
and the weight step keeps routers fp16.

Bits per stored value are the codec's stored bits for one token's row (scales included),
averaged over the quantized Linears weighted by their input width.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from quantatlas.context import RunContext
from quantatlas.quant.config import config_field

#: rows over which the per-value bits are counted
BITS_ROWS = 4096

#: scheme -> the activation codec it stands for (llamacpp_cpu picks one per Linear); every option that
#: changes a computation is spelled out: a preset's id is its name, so it must not follow a default
PRESETS: dict[str, dict | None] = {
    "W8A8": {"uniform": {"bits": 8, "group": None, "scale": "absmax"}},
    "W4A8": {"uniform": {"bits": 8, "group": None, "scale": "absmax"}},
    "INT8": {"uniform": {"bits": 8, "group": None, "scale": "absmax"}},
    "W4A4": {"uniform": {"bits": 4, "group": None, "scale": "absmax"}},
    "FP8": {"fp8": {"group": None}},
    "FP8_DYNAMIC": {"fp8": {"group": None}},
    "llamacpp_cpu": None,
}

#: llama.cpp CPU backend: weight type -> the type its dot products quantize the activations to
#: (ggml-cpu.c type_traits_cpu[...].vec_dot_type)
VEC_DOT_TYPE: dict[str, str] = {
    "q4_0": "q8_0", "q5_0": "q8_0", "q8_0": "q8_0", "iq4_nl": "q8_0",
    "q4_1": "q8_1", "q5_1": "q8_1",
    "q2_k": "q8_k", "q3_k": "q8_k", "q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k", "iq4_xs": "q8_k",
    "f16": "f16",
}

#: routers, whose inputs are quantized only when `roles` names them (module docstring)
ROUTERS = ("router", "shared_router")
#: an `act.hadamard` name -> the roles whose inputs it rotates
HADAMARD_ROLES = {"o": ("o",), "down": ("down", "expert_down", "shared_expert_down")}


class ActConfig(BaseModel):
    """`act: {codec: <codec>}` or `act: {scheme: W8A8, ...}` (or just `act: W8A8`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    scheme: Literal[tuple(PRESETS)] | None = None
    codec: config_field("codec") = None
    clip_ratio: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    #: rotate these inputs (module docstring); "down" is every down projection's, experts' too (HADAMARD_ROLES)
    hadamard: list[Literal["o", "down"]] = []
    #: null: the scheme's default (llamacpp_cpu: true; otherwise false)
    include_head: bool | None = None
    #: only the inputs of these Linear roles (null: every decoder Linear but the routers; the head follows
    #: include_head)
    roles: list[Literal["q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "expert_gate", "expert_up",
                        "expert_down", "shared_expert_gate", "shared_expert_up", "shared_expert_down", "router",
                        "shared_router"]] | None = Field(None, min_length=1)
    #: only the Linears of these decoder layers (null: every layer; the head follows include_head)
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    #: a per-tensor activation scale calibrated once (module docstring); false: dynamic
    static: bool = False

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """`static` came after results were stored: left out while false, so their arm keys stay."""
        d = handler(self)
        if not self.static:
            d.pop("static", None)
        return d

    @model_validator(mode="before")
    @classmethod
    def _preset_name(cls, data):
        if isinstance(data, str):
            if data.upper() == "W4A4KV4":
                raise ValueError("W4A4KV4 is weights + activations + KV cache: write codec: {uniform: {bits: 4, "
                                 "group: 128}}, act: W4A4 and kv: {k: ..., v: ...}")
            return {"scheme": data}
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if (self.scheme is None) == (self.codec is None):
            raise ValueError("give exactly one of scheme (" + ", ".join(PRESETS) + ") and codec")
        if self.scheme == "llamacpp_cpu" and (self.clip_ratio != 1.0 or self.hadamard):
            raise ValueError("llamacpp_cpu reproduces llama.cpp's roundings: clip_ratio and hadamard do not apply")
        c = self.codec_config()
        tensor_scaled = bool(getattr(c, "tensor_scaled", False))   # a scale per matrix or per row (nvfp4, fp8 tensor)
        if self.static and not getattr(c, "per_tensor_scale", False):
            raise ValueError(f"static calibrates a per-tensor scale, which codec {c.name if c else self.scheme!r} "
                             "does not have: use fp8 {granularity: tensor} or nvfp4 (tensor_scale: per_tensor)")
        if tensor_scaled and self.clip_ratio != 1.0:
            raise ValueError(f"clip_ratio shrinks per-group scales; codec {c.name!r} has a per-tensor scale")
        return self

    @property
    def head(self) -> bool:
        return self.scheme == "llamacpp_cpu" if self.include_head is None else self.include_head

    def codec_config(self):
        """The activation codec config (None for llamacpp_cpu, which picks one per Linear)."""
        from quantatlas.quant.config import parse_config

        if self.codec is not None:
            return self.codec
        preset = PRESETS[self.scheme]
        return None if preset is None else parse_config("codec", preset)

    @property
    def seeded(self) -> bool:
        c = self.codec_config()
        return bool(self.hadamard) or self.static or (c is not None and c.seeded)


def weight_types(model, recipe) -> dict[str, str]:
    """Each Linear's stored weight type (a ggml format name, or "f16" when it stays unquantized),
    from the recipe's plan of the model as the weight step left it."""
    from quantatlas.quant.codecs.ggml.block_codec import formats
    from quantatlas.quant.quantize import tensors_to_quantize

    out = {}
    for p in recipe.plan(tensors_to_quantize(model, recipe), model):
        if p.is_vector:
            continue
        name = "f16" if p.codec is None else p.codec.name
        if name != "f16" and name not in formats():
            raise ValueError(f"act.scheme: llamacpp_cpu needs llama.cpp weight types; {p.name} uses codec {name!r}")
        out[p.name] = name
    return out


class ActivationQuantizer:
    def __init__(self, cfg: ActConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        c = cfg.codec_config()
        self.codec = None if c is None else c.build().for_run(RunContext(seed))
        self.widths: list[tuple[int, object]] = []     # (input width, codec) per hooked Linear
        self.handles = []
        self.slots: list[dict] = []     # per hooked Linear: its codec (static: bound to its calibrated amax)
        self.observed: dict[int, float] | None = None   # while calibrating: slot index -> largest |x| seen
        #: training through the step (spinquant): fused experts' quantized inputs pass gradients straight
        #: through (x + (fq(x) − x).detach()), as the hooks around the Linears' quantizers do there
        self.straight_through = False

    def attach(self, model, recipe=None) -> None:
        from quantatlas.models.roles import find_roles
        from quantatlas.quant.online import input_rotated

        # every matrix input: Linears (a ModuleList's experts among them) and fused experts' matrices
        linears = [t for t in find_roles(model) if t.kind in ("linear", "conv1d", "expert")
                   and (self.cfg.head or t.role != "head")]
        roles, layers = self.cfg.roles, self.cfg.layers
        if roles is not None or layers is not None:
            decoder = [t for t in linears if t.role != "head"]
            for field, want, have in (("roles", roles, {t.role for t in decoder}),
                                      ("layers", layers, {t.layer for t in decoder})):
                missing = sorted(set(want or ()) - have)
                if missing:
                    raise ValueError(f"act.{field}: {missing} not in {type(model).__name__} "
                                     f"(it has {sorted(have)})")
            linears = [t for t in linears if t.role == "head" or ((roles is None or t.role in roles)
                                                                  and (layers is None or t.layer in layers))]
        if roles is None:
            linears = [t for t in linears if t.role not in ROUTERS]
        rotated = {r for name in self.cfg.hadamard for r in HADAMARD_ROLES[name]}
        types = None
        if self.codec is None:  # llamacpp_cpu
            if recipe is None:
                raise ValueError("act.scheme: llamacpp_cpu needs the recipe (each Linear's weight type)")
            types = weight_types(model, recipe)
        codecs: dict[str, object] = {}          # llamacpp_cpu: one codec per weight type
        rotations: dict[tuple, object] = {}     # one per (role, layer): a layer's experts share theirs
        fused: dict[int, tuple] = {}            # experts module -> (its MoELayout, (expert, role) -> slot)
        for t in linears:
            width = t.shape[1]
            if types is None:
                codec = self.codec
            else:
                wtype = types.get(t.name, "f16")
                codec = codecs.get(wtype) or codecs.setdefault(wtype, self._llamacpp_codec(wtype))
            group = codec.group_of(width) if hasattr(codec, "group_of") else width  # refuse a bad group now
            rotation = None
            if t.role in rotated:
                if input_rotated(t):
                    raise ValueError(f"act.hadamard: {t.name} already rotates its input online (the hadamard "
                                     f"transform's `online`); drop it from act.hadamard")
                key = (t.role, t.layer, width)
                rotation = rotations.get(key) or rotations.setdefault(key, self._rotation(width, t))
            self.widths.append((width, codec))
            self.slots.append({"codec": codec, "name": t.name})
            index = len(self.slots) - 1
            if t.kind == "expert":       # fused: no module of its own to hook; its block's forward quantizes it
                fused.setdefault(id(t.module), (t.moe, {}))[1][(t.expert, t.role)] = (index, group, rotation)
            else:
                self.handles.append(t.module.register_forward_pre_hook(self._hook(index, group, rotation)))
        for moe, slots in fused.values():
            self.handles.append(FusedExperts(self, moe, slots))

    def calibrate(self, model, tokens, batch: int = 8) -> None:
        """`static`: bind each hooked Linear's codec to the largest |x| of its (rotated) input over the
        calibration windows `tokens` [samples, seq_len], run through `model` unquantized by this step."""
        from quantatlas._lazy import torch

        self.observed = {}
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for i in range(0, tokens.shape[0], batch):
                    model(tokens[i:i + batch].to(device))
            seen = self.observed
        finally:
            self.observed = None
        for i, slot in enumerate(self.slots):
            slot["codec"] = slot["codec"].with_amax(seen.get(i, 0.0))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @staticmethod
    def _llamacpp_codec(weight_type: str):
        act_type = VEC_DOT_TYPE.get(weight_type)
        if act_type is None:
            raise ValueError(f"act.scheme: llamacpp_cpu does not know the CPU activation type of {weight_type}")
        from quantatlas.quant.config import parse_config

        return parse_config("codec", act_type).build()

    def _rotation(self, width, t):
        from quantatlas.quant.hadamard import RandomizedHadamard

        try:
            return RandomizedHadamard(width, RunContext(self.seed).sub_seed("named", "act", t.role, t.layer))
        except ValueError as e:
            raise ValueError(f"act.hadamard: {t.name} (width {width}): {e}") from None

    def _hook(self, index, group, rotation):
        clip = self.cfg.clip_ratio
        slot = self.slots[index]

        def hook(module, args):
            x = args[0]
            if self.observed is not None:   # calibrating a static scale: observe, change nothing
                self.observe(index, x, rotation)
                return None
            return (fake_quantize_rows(x, slot["codec"], group, clip, rotation).to(x.dtype),) + tuple(args[1:])

        return hook

    def observe(self, index: int, x, rotation=None) -> None:
        """Calibrating `static`: the largest |x| (rotated as the quantizer sees it) of slot `index` so far."""
        seen = x.float() if rotation is None else rotation.rotate(x.reshape(-1, x.shape[-1]).float())
        if seen.numel():
            self.observed[index] = max(self.observed.get(index, 0.0), float(seen.abs().amax()))

    def bits(self) -> dict[str, float]:
        total = sum(w for w, _ in self.widths)
        cache: dict[tuple, float] = {}
        bits = 0.0
        for w, codec in self.widths:
            key = (codec.name, repr(codec.config()), w)
            if key not in cache:
                cache[key] = codec.bits_per_weight((BITS_ROWS, w))
            bits += w * cache[key]
        return {"act_bits": bits / max(total, 1)}


class FusedExperts:
    """The step on one block of fused experts (module docstring): while attached, the experts module runs
    `forward` below in place of its own; `remove()` gives it back its own.

    `slots`: (expert, role) -> (slot index, group, rotation) for the expert inputs the step quantizes."""

    def __init__(self, quantizer: ActivationQuantizer, moe, slots: dict):
        from quantatlas.models.moe import BoundMoE

        self.quantizer, self.bound, self.slots = quantizer, BoundMoE(moe), slots
        self.inputs = [s for (_, role), s in slots.items() if role != "expert_down"]
        module = self.bound.experts
        self.saved = module.__dict__.get("forward")   # a forward set on the instance before ours, to put back
        module.forward = self.forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        q = self.quantizer
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        clip = q.cfg.clip_ratio
        # gate/up of every expert through one row-wise codec (the dynamic schemes): the block's rows once
        codecs = {id(q.slots[i]["codec"]) for i, _, _ in self.inputs}

        def quantized(rows, *how):      # training (`straight_through`): with the gradient of the identity
            if not q.straight_through:
                return fake_quantize_rows(rows, *how).to(rows.dtype)
            return rows + (fake_quantize_rows(rows.detach(), *how).to(rows.dtype) - rows).detach()

        shared = None
        if len(codecs) == 1 and q.observed is None:
            i, group, rotation = self.inputs[0]
            codec = q.slots[i]["codec"]
            if rotation is None and not getattr(codec, "has_tensor_scale", False):
                shared = quantized(x, codec, group, clip)

        def transform(expert, role, rows, tok):
            slot = self.slots.get((expert, role))
            if slot is None:
                return rows
            i, group, rotation = slot
            if q.observed is not None:      # calibrating a static scale: observe, change nothing
                q.observe(i, rows, rotation)
                return rows
            if shared is not None and role != "expert_down":
                return shared[tok]
            return quantized(rows, q.slots[i]["codec"], group, clip, rotation)

        index = top_k_index.reshape(x.shape[0], -1)
        weight = top_k_weights.reshape(x.shape[0], -1)
        return self.bound.output(x, index, weight, transform).reshape(hidden_states.shape)

    def remove(self) -> None:
        module = self.bound.experts
        if self.saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = self.saved


def fake_quantize_rows(x, codec, group: int, clip_ratio: float = 1.0, rotation=None):
    """x [..., width] through the codec one token row at a time, every `group` values one codec
    group: rows are cut into groups and all groups go through the codec at once (float32 out)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).float()
    if rotation is not None:
        rows = rotation.rotate(rows)
    # a codec with a scale per matrix or per row (nvfp4, fp8 tensor) sees the token rows whole
    g = rows if getattr(codec, "has_tensor_scale", False) else rows.reshape(-1, group)
    out = (codec.fake_quantize(g) if clip_ratio == 1.0 else _clipped(codec, g, clip_ratio)).reshape(rows.shape)
    if rotation is not None:
        out = rotation.unrotate(out)
    return out.reshape(shape)


def _clipped(codec, g, r: float):
    """Each group (row of g) quantized with its range shrunk by r: the scale of a uniform or FP8
    grid times r (values beyond it saturate, as QuaRot's clip ratio); other codecs see each group
    clamped to r times its range first."""
    from quantatlas._lazy import torch
    from quantatlas.quant.codecs.fp8 import FP8, FP8Params
    from quantatlas.quant.codecs.uniform import Uniform

    if isinstance(codec, Uniform):
        params = codec.row_params(g, torch.full((g.shape[0],), r, device=g.device))
    elif isinstance(codec, FP8):
        params = codec.fit(g)
        params = FP8Params(torch.where(g.abs().amax(-1) > 0, params.scale * r, params.scale))
    else:
        lo = torch.minimum(g.amin(-1, keepdim=True), g.new_zeros(())) * r
        hi = torch.maximum(g.amax(-1, keepdim=True), g.new_zeros(())) * r
        g = torch.maximum(torch.minimum(g, hi), lo)
        return codec.fake_quantize(g)
    return codec.quantize(g, params, 0).values
