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
`hadamard: [o, down]` rotates the input of o_proj / down_proj by a randomized Hadamard matrix Q
(signs from the seed) before the quantizer and back after it, x ↦ Qᵀ fq(Q x): the quantizer sees
the rotated activations as an online Hadamard (QuaRot) makes them, while the weights stay as the
weight step left them (equal to W Qᵀ applied to Q x). The `hadamard` transform's `online` rotates
the weights too; a Linear rotated by it is refused here (it is already rotated).

Bits per stored value are the codec's stored bits for one token's row (scales included),
averaged over the quantized Linears weighted by their input width.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantatlas.context import RunContext
from quantatlas.quant.config import config_field

#: rows over which the per-value bits are counted
BITS_ROWS = 4096

#: scheme -> the activation codec it stands for (llamacpp_cpu picks one per Linear)
PRESETS: dict[str, dict | None] = {
    "W8A8": {"uniform": {"bits": 8, "group": None}},
    "W4A8": {"uniform": {"bits": 8, "group": None}},
    "INT8": {"uniform": {"bits": 8, "group": None}},
    "W4A4": {"uniform": {"bits": 4, "group": None}},
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


class ActConfig(BaseModel):
    """`act: {codec: <codec>}` or `act: {scheme: W8A8, ...}` (or just `act: W8A8`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    scheme: Literal[tuple(PRESETS)] | None = None
    codec: config_field("codec") = None
    clip_ratio: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    hadamard: list[Literal["o", "down"]] = []
    #: null: the scheme's default (llamacpp_cpu: true; otherwise false)
    include_head: bool | None = None
    #: only the inputs of these Linear roles (null: every decoder Linear; the head follows include_head)
    roles: list[Literal["q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up"]] | None = Field(None, min_length=1)
    #: only the Linears of these decoder layers (null: every layer; the head follows include_head)
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)

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
        return bool(self.hadamard) or (c is not None and c.seeded)


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

    def attach(self, model, recipe=None) -> None:
        from quantatlas.models.roles import find_roles
        from quantatlas.quant.online import has_online_rotation

        linears = [t for t in find_roles(model) if t.kind in ("linear", "conv1d")
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
        types = None
        if self.codec is None:  # llamacpp_cpu
            if recipe is None:
                raise ValueError("act.scheme: llamacpp_cpu needs the recipe (each Linear's weight type)")
            types = weight_types(model, recipe)
        for t in linears:
            width = t.shape[1]
            codec = self.codec if types is None else self._llamacpp_codec(types.get(t.name, "f16"))
            group = codec.group_of(width) if hasattr(codec, "group_of") else width  # refuse a bad group now
            rotation = None
            if t.role in self.cfg.hadamard:
                if has_online_rotation(t.module):
                    raise ValueError(f"act.hadamard: {t.name} already rotates its input online (the hadamard "
                                     f"transform's `online`); drop {t.role!r} from act.hadamard")
                rotation = self._rotation(width, t)
            self.widths.append((width, codec))
            self.handles.append(t.module.register_forward_pre_hook(self._hook(codec, group, rotation)))

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

    def _hook(self, codec, group, rotation):
        clip = self.cfg.clip_ratio

        def hook(module, args):
            x = args[0]
            return (fake_quantize_rows(x, codec, group, clip, rotation).to(x.dtype),) + tuple(args[1:])

        return hook

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


def fake_quantize_rows(x, codec, group: int, clip_ratio: float = 1.0, rotation=None):
    """x [..., width] through the codec one token row at a time, every `group` values one codec
    group: rows are cut into groups and all groups go through the codec at once (float32 out)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).float()
    if rotation is not None:
        rows = rotation.rotate(rows)
    g = rows.reshape(-1, group)
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
