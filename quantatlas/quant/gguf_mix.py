"""llama.cpp's file-type mixtures (Q4_K_M, Q3_K_S, ...): which ggml type each tensor gets.

A transcription of llama_tensor_get_type / llama_tensor_get_type_impl / tensor_type_fallback
in ggml-org/llama.cpp src/llama-quant.cpp (read at commit 007dbbf3), on our tensor roles:

    role      llama.cpp tensor          role      llama.cpp tensor
    q         blk.N.attn_q              gate      blk.N.ffn_gate
    k         blk.N.attn_k              up        blk.N.ffn_up
    v         blk.N.attn_v              gate_up   blk.N.ffn_up (Phi-3 style fused)
    qkv       blk.N.attn_qkv            down      blk.N.ffn_down
    o         blk.N.attn_output         head      output
    embed     token_embd                norms     *_norm (never quantized, F32)
    expert_gate  blk.N.ffn_gate_exps    shared_expert_gate  blk.N.ffn_gate_shexp
    expert_up    blk.N.ffn_up_exps      shared_expert_up    blk.N.ffn_up_shexp
    expert_down  blk.N.ffn_down_exps    shared_expert_down  blk.N.ffn_down_shexp
    router       blk.N.ffn_gate_inp (never quantized: the converter writes it F32)
    shared_router  blk.N.ffn_gate_inp_shexp ([1, n_embd]: one row, ggml_n_dims 1, never quantized, F16)

MoE tensors: llama.cpp stores each layer's experts of one role as one 3-D tensor (ffn_down_exps), so
every expert of a role and layer gets one type. tensor_get_category matches names by substring, so
ffn_*_exps and ffn_*_shexp fall in the ffn_gate/ffn_up/ffn_down categories, and for a model with
n_expert > 1 the layer of an ffn_* tensor is parsed from its name with n_layer the model's layer count
(llama-quant.cpp's layer_info), which is our role's layer.

The per-layer counters of llama.cpp (i_attention_wv, i_ffn_down) count tensors in the order
the loader sorts them -- by block number, then name -- so for a model with one attn_v/ffn_down
per layer the counter is the layer index, and n_attention_wv = n_ffn_down = n_layers.

Rules that shape the ftypes here (default type in brackets):
- output.weight, and token_embd when the head is tied to it: Q8_0 if its row width is not a
  multiple of the default type's block, else Q6_K (a Q8_0 file keeps Q8_0).
- token_embd (untied): the default type.
- attn_v / attn_qkv (the current source sends qkv through the attn_v branch): Q2_K -> Q4_K with
  GQA >= 4 else Q3_K; Q3_K_M -> Q5_K for the first two, then Q4_K; Q3_K_L -> Q5_K;
  IQ4_NL/IQ4_XS with GQA >= 4 -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K where use_more_bits(i, n);
  Q4_K_S -> Q5_K for i < 4; Q2_K_S with GQA >= 4 -> Q4_K; Llama-70B-shaped models lift Q3_K/Q4_K
  to Q5_K; 8-expert models use Q8_0.
- ffn_down: Q2_K -> Q3_K; Q2_K_S -> Q4_K for i < n/8; Q3_K_M -> Q5_K for i < n/16, else Q4_K
  (Falcon: Q4_K only where use_more_bits); Q3_K_L -> Q5_K (Falcon Q4_K); Q4_K_M -> Q6_K where
  use_more_bits (Falcon: Q6_K / Q5_K / Q4_K); IQ4_NL/IQ4_XS without imatrix -> Q5_K for i < n/8;
  Q5_K_M -> Q6_K where use_more_bits; Q4_K_S -> Q5_K for i < n/8 (not Falcon);
  Q4_0/Q5_0 with imatrix -> Q4_1/Q5_1 for i < n/8.
- attn_output: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K (Falcon: Q3_K_L -> Q4_K);
  8-expert models -> Q5_K for the low-bit ftypes.
- last, a row width that is not a multiple of the type's block falls back:
  IQ4_XS -> IQ4_NL; Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; F16 if even the
  fallback's block does not divide the width; no fallback exists for the 32-blocks (error).

use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2, in C integer arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

from quantatlas.quant.codecs import Codec, make_codec

# ftype -> the default ggml type (llama_ftype_get_default_type)
_DEFAULT_TYPE: dict[str, str] = {
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0",
    "Q2_K": "q2_k", "Q2_K_S": "q2_k",
    "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k",
    "Q4_K_S": "q4_k", "Q4_K_M": "q4_k",
    "Q5_K_S": "q5_k", "Q5_K_M": "q5_k",
    "Q6_K": "q6_k",
    "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs",
}


def block_size(type_name: str) -> int:
    """Weights per block (ggml_blck_size) of a type a mixture can produce, from the formats' table."""
    from quantatlas.quant.codecs.ggml.block_codec import formats

    return 1 if type_name in ("f16", "f32") else formats()[type_name].group_size

# tensor_type_fallback: a 256-block type whose block does not divide the row width
FALLBACK: dict[str, str] = {
    "iq4_xs": "iq4_nl",
    "q2_k": "q4_0", "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}

# our role -> llama.cpp's tensor category (tensor_get_category)
CATEGORY: dict[str, str] = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down",
    "expert_gate": "ffn_gate", "expert_up": "ffn_up", "expert_down": "ffn_down",
    "shared_expert_gate": "ffn_gate", "shared_expert_up": "ffn_up", "shared_expert_down": "ffn_down",
    "head": "output", "embed": "token_embd",
}
_NEVER_QUANTIZED = ("norm", "q_norm", "k_norm", "pos_embed", "shared_router")  # tensor_allows_quantization
_KEPT_F32 = ("router",)   # ffn_gate_inp: never quantized, and written F32 by the converter


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    """What the rules read from a model besides the tensor itself."""

    n_layers: int
    n_gqa: int = 1          # n_head // n_head_kv
    n_expert: int = 0
    arch: str = ""          # general.architecture, e.g. "llama", "qwen3", "falcon"
    tied: bool = False      # token_embd doubles as the output head

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B: a llama-architecture model with 80 layers and GQA
        return self.arch == "llama" and self.n_layers == 80 and self.n_gqa > 1


class GGUFMixture:
    """One llama.cpp file type: `type_for(tensor)` is the ggml type llama-quantize would give it."""

    FTYPES: tuple[str, ...] = tuple(_DEFAULT_TYPE)

    def __init__(self, ftype: str, imatrix: bool = False):
        if not isinstance(ftype, str) or ftype.upper() not in _DEFAULT_TYPE:
            raise ValueError(f"gguf ftype {ftype!r} is not a llama.cpp mixture we know; known: "
                             f"{', '.join(self.FTYPES)}")
        if not isinstance(imatrix, bool):
            raise ValueError(f"gguf imatrix must be true or false, got {imatrix!r}")
        self.ftype = ftype.upper()
        self.imatrix = imatrix
        self.default_type = _DEFAULT_TYPE[self.ftype]
        if self.ftype == "Q2_K_S" and not imatrix:
            # tensor_requires_imatrix: llama-quantize refuses Q2_K_S without one
            raise ValueError("gguf ftype Q2_K_S requires imatrix: true (llama-quantize refuses it without one)")

    def __repr__(self) -> str:
        return f"GGUFMixture({self.ftype!r}, imatrix={self.imatrix})"

    # -- the public API ---------------------------------------------------------------------
    def type_for(self, t, n_layers: int, n_gqa: int = 1, tied: bool = False, *,
                 n_expert: int = 0, arch: str = "") -> str:
        """The ggml type (lower case, e.g. "q6_k"; "f16"/"f32" for kept tensors) of TensorRole `t`."""
        shape = tuple(t.shape)
        return self.tensor_type(t.role, t.layer, shape, ModelShape(n_layers, n_gqa, n_expert, arch,
                                                                   tied or bool(getattr(t, "tied", False))))

    def codec_for(self, t, n_layers: int, n_gqa: int = 1, tied: bool = False, *,
                  n_expert: int = 0, arch: str = "") -> Codec | None:
        """The codec of `type_for`, or None for a tensor kept in floating point."""
        return self.codec_of(self.type_for(t, n_layers, n_gqa, tied, n_expert=n_expert, arch=arch))

    def embeddings_type(self, width: int, n_layers: int = 1, tied: bool = False, *, arch: str = "") -> str:
        """token_embd's type: the head's rule when tied, else the file's default type (then the fallback)."""
        return self.tensor_type("embed", None, (0, width), ModelShape(n_layers, 1, 0, arch, tied))

    def uses_importance(self, t) -> bool:
        """Whether llama-quantize would hand this tensor an imatrix row.

        llama-imatrix records only matrix multiplications of blk.* weights (output.weight only with
        --process-output, token_embd never: it is a row lookup), so the head and the embeddings are
        quantized without importance even in an imatrix build.
        """
        return self.imatrix and t.layer is not None and t.role in CATEGORY

    @staticmethod
    def codec_of(type_name: str) -> Codec | None:
        return None if type_name in ("f16", "f32") else make_codec(type_name)

    def plan(self, model, roles=None) -> dict[str, str]:
        """Module name -> ggml type for every role of a Hugging Face causal LM (norms included)."""
        from quantatlas.models.layout import layout

        model_layout = layout(model)
        shape = model_shape(model_layout)
        roles = model_layout.check().roles if roles is None else roles
        return {t.name: self.tensor_type(t.role, t.layer, tuple(t.shape), shape) for t in roles}

    # -- the rules --------------------------------------------------------------------------
    def tensor_type(self, role: str, layer: int | None, shape: tuple[int, ...], m: ModelShape) -> str:
        """llama_tensor_get_type for a tensor of `role` in `layer`, shape [out, in] (in = ggml's ne[0])."""
        if len(shape) < 2:
            return "f32"                      # norms and biases: kept in F32, as the converter writes them
        if role in _NEVER_QUANTIZED:
            return "f16"                      # e.g. learned position embeddings stay as converted
        if role in _KEPT_F32:
            return "f32"
        if role not in CATEGORY:
            raise ValueError(f"gguf mixture: no llama.cpp rule for tensor role {role!r}")
        width = shape[-1]
        category = CATEGORY[role]
        if layer is None and category not in ("output", "token_embd"):
            raise ValueError(f"gguf mixture: role {role!r} needs a layer index")
        new_type = self._mixture_type(category, layer, width, m)
        return self._fallback(new_type, width, role, layer)

    def _mixture_type(self, category: str, i: int | None, width: int, m: ModelShape) -> str:
        ft, t = self.ftype, self.default_type
        n = m.n_layers
        if category == "output" or (m.tied and category == "token_embd"):
            if width % block_size(t) != 0 or m.arch == "falcon":
                return "q8_0"
            return t if t == "q8_0" else "q6_k"
        if category == "token_embd":
            return t
        if category in ("attn_v", "attn_qkv"):
            if ft == "Q2_K":
                t = "q4_k" if m.n_gqa >= 4 else "q3_k"
            elif ft == "Q2_K_S" and m.n_gqa >= 4:
                t = "q4_k"
            elif ft == "Q3_K_M":
                t = "q5_k" if i < 2 else "q4_k"
            elif ft == "Q3_K_L":
                t = "q5_k"
            elif ft in ("IQ4_NL", "IQ4_XS") and m.n_gqa >= 4:
                t = "q5_k"
            elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                t = "q6_k"
            elif ft == "Q4_K_S" and i < 4:
                t = "q5_k"
            if m.is_70b and t in ("q3_k", "q4_k"):
                t = "q5_k"
            if m.n_expert == 8:
                t = "q8_0"
            return t
        if category == "attn_k":
            return "q8_0" if m.n_expert == 8 else t
        if category == "ffn_down":
            falcon = m.arch == "falcon"
            if ft == "Q2_K":
                t = "q3_k"
            elif ft == "Q2_K_S":
                if i < n // 8:
                    t = "q4_k"
            elif ft == "Q3_K_M":
                t = "q5_k" if i < n // 16 else "q4_k" if (not falcon or use_more_bits(i, n)) else "q3_k"
            elif ft == "Q3_K_L":
                t = "q4_k" if falcon else "q5_k"
            elif ft == "Q4_K_M":
                if falcon:
                    t = "q6_k" if i < n // 16 else "q5_k" if use_more_bits(i, n) else "q4_k"
                elif use_more_bits(i, n):
                    t = "q6_k"
            elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not self.imatrix:
                t = "q5_k"
            elif ft == "Q5_K_M" and use_more_bits(i, n):
                t = "q6_k"
            elif ft == "Q4_K_S" and not falcon and i < n // 8:
                t = "q5_k"
            elif ft in ("Q4_0", "Q5_0") and self.imatrix and i < n // 8:
                # guards the first ffn_down layers of Q4_0/Q5_0 builds that use an imatrix
                t = "q4_1" if ft == "Q4_0" else "q5_1"
            return t
        if category == "attn_output":
            if m.arch != "falcon":
                if m.n_expert == 8:
                    if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                        t = "q5_k"
                elif ft == "Q2_K":
                    t = "q3_k"
                elif ft == "Q3_K_M":
                    t = "q4_k"
                elif ft == "Q3_K_L":
                    t = "q5_k"
            elif ft == "Q3_K_L":
                t = "q4_k"
            return t
        return t  # attn_q, ffn_gate, ffn_up: only IQ ftypes outside this set change them

    def _fallback(self, t: str, width: int, role: str, layer: int | None) -> str:
        if width % block_size(t) == 0:
            return t
        where = role if layer is None else f"{role} of layer {layer}"
        if t not in FALLBACK:
            raise ValueError(f"gguf {self.ftype}: {where} has rows of {width} weights, not a multiple of "
                             f"{block_size(t)} for {t}, and llama.cpp defines no fallback for {t}")
        fb = FALLBACK[t]
        return fb if width % block_size(fb) == 0 else "f16"


def model_shape(model) -> ModelShape:
    """n_layers, GQA factor, expert count, architecture and tying, from the model layout
    (`model` is a causal LM or its `quantatlas.models.layout.ModelLayout`)."""
    from quantatlas.export.gguf import ARCHES  # model_type -> llama.cpp arch (mistral is llama)
    from quantatlas.models.layout import ModelLayout, layout

    m = model if isinstance(model, ModelLayout) else layout(model)
    n_head = m.n_heads or 1
    n_head_kv = m.n_kv_heads or n_head
    model_type = m.arch or ""
    arch = ARCHES.get(model_type, model_type)
    return ModelShape(m.n_layers, int(n_head) // int(n_head_kv), m.n_experts, arch, m.config_tied)
