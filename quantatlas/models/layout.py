"""One model layout: the only place that reads a causal LM's structure.

`layout(model)` answers, for every module that bears a weight, what it is and where it sits:

- the decoder layers (the ModuleList of repeated blocks) and, per layer, its matrices by role
  (q k v o, or fused qkv; gate up down, or fused gate_up), its norms by position, the attention
  and MLP blocks, head counts and head_dim, and where RoPE is applied;
- outside the layers: the token embedding, learned position embedding, final norm and head,
  and whether the head and the embedding are one tensor;
- model-wide: the architecture (config.model_type), head counts, RoPE placement and
  parameters (theta, scaling, how many dims of a head rotate), expert count.

Roles, transforms, llama.cpp mixtures and the GGUF writer all ask this module instead of
reading attribute names themselves. It also defines what it reports in: the role vocabulary
(`ROLES`), `TensorRole` (one role-bearing module) and `UnmatchedModulesError`;
`quantatlas.models.roles` builds the role-level queries and the weight access on top of it.

Families. A family adapter knows the module paths of its decoder block, its final norm and
where RoPE goes: `llama` (pre-norm Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma, the reference
model), `gemma2` (Gemma 2/3's sandwich norms), `gpt2`, `gpt_neox` and `opt`. Every other
model gets the `generic` adapter: roles from attribute names and the kind of block that holds
them (GPT-2's `c_proj` is `o` under `attn` and `down` under `mlp`), norm positions from their
order in the block. A module an adapter does not declare falls back to that name-based
matching, so an unknown Linear is reported (`UnmatchedModulesError`) exactly as for a
generic model.

Norm positions (`LayerLayout.norms`, named as llama.cpp names the tensors):

    attn_norm       the norm whose output feeds the attention projections (input_layernorm, ln_1)
    ffn_norm        the norm whose output feeds the MLP (Llama's post_attention_layernorm, ln_2)
    post_attn_norm  a norm on the attention output before the residual add (Gemma 2/3)
    post_ffn_norm   a norm on the MLP output before the residual add (Gemma 2/3)
    q_norm, k_norm  per-head query/key norms (Qwen3, Gemma 3)

A norm the adapter cannot place is keyed by its path inside the block.

RoPE placement (`rope`): "post_qk_norm" (q/k_proj → q_norm/k_norm → RoPE: Qwen3, Gemma 3),
"post_proj" (q/k_proj → RoPE: Llama, Mistral, Qwen2, NeoX, GPT-J, Phi), None (learned or no
positions: GPT-2, OPT; ALiBi).

The layout is built afresh on every call (transforms untie heads and attach modules); a model
with unknown weight-bearing modules still gets a layout, with `unmatched`/`ambiguous` filled,
and `check()` raises on them (find_roles does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from quantatlas.errors import UserError

ROLES: tuple[str, ...] = (
    "q", "k", "v", "o", "qkv",              # attention matrices (qkv: fused)
    "gate", "up", "down", "gate_up",         # MLP matrices (gate_up: fused)
    "router",                                # an MoE block's router (expert scores), kept fp16 by default
    "expert_gate", "expert_up", "expert_down",  # one routed expert's matrices (TensorRole.expert: its index)
    "shared_expert_gate", "shared_expert_up", "shared_expert_down",  # an always-on shared expert
    "shared_router",                         # the shared expert's sigmoid gate (Qwen2-MoE), kept fp16 by default
    "head",                                  # lm_head (output embedding)
    "embed", "pos_embed",                    # token and learned position embeddings
    "norm", "q_norm", "k_norm",              # LayerNorm/RMSNorm; per-head query/key norms
)
#: "expert": one expert's [out, in] slice of a fused 3-D expert tensor (TensorRole.param, .expert, .rows)
MATRIX_KINDS = ("linear", "conv1d", "expert")
EXPERT_ROLES: tuple[str, ...] = ("expert_gate", "expert_up", "expert_down")
SHARED_EXPERT_ROLES: tuple[str, ...] = ("shared_expert_gate", "shared_expert_up", "shared_expert_down")
#: matrices an arm's codec leaves in fp16 (an override can still give them one): what routes tokens
ROUTER_ROLES: tuple[str, ...] = ("router", "shared_router")
MATRIX_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up",
                                 *ROUTER_ROLES, *EXPERT_ROLES, *SHARED_EXPERT_ROLES)
NORM_POSITIONS: tuple[str, ...] = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")
ROPE_PLACEMENTS: tuple[str | None, ...] = ("post_qk_norm", "post_proj", None)


class UnmatchedModulesError(UserError):
    """Weight-bearing modules that have no role, or that claim a role another module has: the spec's
    `model` is one quantatlas cannot read (yet)."""

    def __init__(self, model_class: str, unmatched: list[str], ambiguous: list[str] | None = None):
        self.model_class, self.unmatched, self.ambiguous = model_class, list(unmatched), list(ambiguous or [])
        parts = []
        if self.unmatched:
            parts.append(f"no tensor role for {len(self.unmatched)} weight-bearing module(s): "
                         + ", ".join(self.unmatched))
        if self.ambiguous:
            parts.append("ambiguous roles: " + "; ".join(self.ambiguous))
        super().__init__(f"{model_class}: " + "; ".join(parts)
                         + f" (known roles: {', '.join(ROLES)}; matrices must sit in an attention or MLP block)",
                         "model")


@dataclass
class TensorRole:
    """One role-bearing module: what it is (`role`, one of ROLES), where it sits, and its kind."""

    name: str                 # module path, e.g. "model.layers.3.self_attn.k_proj"
    role: str                 # one of ROLES
    layer: int | None         # decoder layer index; None for embeddings, head, final norm
    module: nn.Module = field(repr=False)
    kind: str                 # "linear", "conv1d", "expert", "embedding", "norm"
    tied: bool = False        # head and token embedding share one weight (set on both)
    expert: int | None = None  # expert index of expert_* roles
    # kind "expert" (a fused 3-D expert tensor, e.g. transformers' `experts.gate_up_proj` [E, 2I, H]): the
    # parameter's attribute on `module`, the rows of this expert's [out, in] matrix in it, and whether the
    # tensor is stored [E, in, out]
    param: str | None = None
    rows: slice | None = field(default=None, repr=False)
    transposed: bool = field(default=False, repr=False)
    moe: MoELayout | None = field(default=None, repr=False)  # the MoE block of expert, router and shared roles

    @property
    def shape(self) -> tuple[int, ...]:
        """[out, in] for matrices, [rows, dim] for embeddings, the weight's shape for norms."""
        if self.param is not None:
            p = getattr(self.module, self.param)
            out, width = (p.shape[2], p.shape[1]) if self.transposed else (p.shape[1], p.shape[2])
            return (len(range(out)[self.rows]), width)
        w = getattr(self.module, "weight", None)
        if w is None:
            return ()
        if self.kind == "conv1d":
            return (w.shape[1], w.shape[0])
        return tuple(w.shape)


# ---- the layout --------------------------------------------------------------------------

@dataclass
class MoELayout:
    """One mixture-of-experts block: a router that scores the experts for each token, the top_k routed
    experts (gated MLPs: down(act(gate x) * up x)) whose outputs are summed with their routing weights,
    and, in some families, a shared expert every token goes through.

    Experts are stored either as a ModuleList of MLPs (each matrix an nn.Linear) or, in recent
    transformers versions, as fused 3-D tensors on one module (`fused`): then each expert's matrix is a
    TensorRole of kind "expert", a slice [out, in] of the 3-D parameter. Paths are kept relative to the
    decoder layer too (`path`, `router_path`, `experts_path`), so the same block can be found in a copy
    of the layer (quant/quantize.py's fp layer)."""

    name: str                                  # "model.layers.3.mlp"
    block: nn.Module = field(repr=False)
    path: str                                  # the block inside its decoder layer: "mlp"
    router: TensorRole = field(repr=False)
    router_path: str                           # inside the block: "gate"
    experts_path: str                          # inside the block: "experts"
    experts_module: nn.Module = field(repr=False)
    fused: bool                                # 3-D expert tensors (True) or a ModuleList of MLPs
    n_experts: int
    top_k: int
    normalise: bool                            # the top-k routing weights renormalised to sum to 1
    experts: list[dict[str, TensorRole]] = field(repr=False)   # per expert index: expert_gate/up/down
    shared: dict[str, TensorRole] = field(default_factory=dict, repr=False)  # shared_expert_*, shared_router
    act: object = field(default=None, repr=False)  # the experts' activation, applied to the gate projection

    def tensors(self) -> list[TensorRole]:
        """Every expert matrix, expert by expert."""
        return [t for roles in self.experts for t in roles.values()]


@dataclass
class LayerLayout:
    """One decoder layer: its tensors by role and position, heads, and where RoPE goes."""

    index: int
    name: str                                  # "model.layers.3"
    block: nn.Module = field(repr=False)
    roles: list[TensorRole] = field(repr=False)  # this layer's tensors, in model order
    matrices: dict[str, TensorRole]            # q k v o qkv gate up down gate_up -> tensor
    norms: dict[str, TensorRole]               # NORM_POSITIONS (or a path in the block) -> tensor
    attention_name: str | None                 # "model.layers.3.self_attn"
    attention: nn.Module | None = field(repr=False)
    mlp_name: str | None                       # "model.layers.3.mlp" (OPT: the layer itself)
    mlp: nn.Module | None = field(repr=False)
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    rope: str | None                           # "post_qk_norm", "post_proj" or None
    #: the layer's mixture-of-experts block (its router and shared roles are also in `matrices`; the
    #: routed experts, many per role, only here), or None for a dense MLP
    moe: MoELayout | None = field(default=None, repr=False)

    def module(self, key: str) -> nn.Module | None:
        """The module of a matrix role ("q", "gate_up") or a norm position ("attn_norm", "q_norm")."""
        t = self.matrices.get(key) or self.norms.get(key)
        return None if t is None else t.module


@dataclass
class ModelLayout:
    family: str                                # the adapter: llama, gemma2, gpt2, gpt_neox, opt, generic
    arch: str | None                           # config.model_type, e.g. "qwen3"; None without a config
    model_class: str
    prefix: str                                # dotted path of the decoder ModuleList
    layers: list[LayerLayout] = field(repr=False)
    roles: list[TensorRole] = field(repr=False)  # every role-bearing module, in model order
    embed: TensorRole | None = field(repr=False)
    pos_embed: TensorRole | None = field(repr=False)
    head: TensorRole | None = field(repr=False)
    final_norm: TensorRole | None = field(repr=False)
    tied: bool                                 # the head's weight is the embedding's (one tensor)
    config_tied: bool                          # config.tie_word_embeddings where it says, else `tied`
    n_heads: int | None                        # from the config (layers carry their own)
    n_kv_heads: int | None
    head_dim: int | None
    n_experts: int
    rope: str | None
    rope_theta: float | None
    rope_parameters: dict = field(repr=False)  # config.rope_parameters / rope_scaling, as given
    rope_dim: int | None                       # dims of a head that rotate (partial rotary: fewer)
    experts_used: int = 0                      # experts each token is routed to (top_k); 0 for dense models
    unmatched: list[str] = field(default_factory=list, repr=False)
    ambiguous: list[str] = field(default_factory=list, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_blocks(self) -> list[MoELayout]:
        """The mixture-of-experts blocks, in layer order."""
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def check(self) -> ModelLayout:
        """Raise UnmatchedModulesError when a weight-bearing module has no role or two claim one."""
        if self.unmatched or self.ambiguous:
            raise UnmatchedModulesError(self.model_class, self.unmatched, self.ambiguous)
        return self

    def tensor(self, name: str) -> TensorRole:
        """The tensor of a module path."""
        t = next((t for t in self.roles if t.name == name), None)
        if t is None:
            raise KeyError(f"{self.model_class}: no tensor role for module {name!r}")
        return t


# ---- families ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str | None = None                  # path of the decoder ModuleList
    modules: dict[str, str] = field(default_factory=dict)  # path in a block -> matrix role or norm position
    final_norm: str | None = None              # path of the final norm
    rope: str = "auto"                         # "auto": post_qk_norm with q/k norms, else post_proj; or fixed
    moe: bool = False                          # its MLPs may be mixture-of-experts blocks (`_moe_block`)


_LLAMA_BLOCK = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "self_attn.qkv_proj": "qkv",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down", "mlp.gate_up_proj": "gate_up",
    "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "input_layernorm": "attn_norm",
}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"), "model.layers",
           {**_LLAMA_BLOCK, "post_attention_layernorm": "ffn_norm"}, "model.norm"),
    Family("gemma2", ("gemma2", "gemma3", "gemma3_text"), "model.layers",
           {**_LLAMA_BLOCK, "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffn_norm"}, "model.norm"),
    Family("gpt2", ("gpt2",), "transformer.h",
           {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down",
            "ln_1": "attn_norm", "ln_2": "ffn_norm"}, "transformer.ln_f", rope=None),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
           {"attention.query_key_value": "qkv", "attention.dense": "o", "mlp.dense_h_to_4h": "up",
            "mlp.dense_4h_to_h": "down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"},
           "gpt_neox.final_layer_norm", rope="post_proj"),
    # Qwen3-MoE, Qwen2-MoE (a shared expert), Mixtral: the Llama decoder with MoE blocks (dense layers keep mlp.*_proj)
    Family("llama_moe", ("qwen3_moe", "qwen2_moe", "mixtral"), "model.layers",
           {**_LLAMA_BLOCK, "post_attention_layernorm": "ffn_norm"}, "model.norm", moe=True),
    Family("opt", ("opt",), "model.decoder.layers",
           {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
            "fc1": "up", "fc2": "down", "self_attn_layer_norm": "attn_norm", "final_layer_norm": "ffn_norm"},
           "model.decoder.final_layer_norm", rope=None),
)
GENERIC = Family("generic", ())


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), GENERIC)


# ---- the generic, name-based reading -----------------------------------------------------

def _names(pattern: str) -> re.Pattern:
    return re.compile(f"(?:{pattern})", re.IGNORECASE)


# attribute name of a matrix -> role, by the kind of block that holds it
_ATTENTION_MATRICES = {
    "q": _names(r"q_proj|q|query|wq"),
    "k": _names(r"k_proj|k|key|wk"),
    "v": _names(r"v_proj|v|value|wv"),
    "qkv": _names(r"qkv_proj|qkv|query_key_value|c_attn|wqkv|w_pack"),
    "o": _names(r"o_proj|out_proj|dense|c_proj|wo|o"),
}
_MLP_MATRICES = {
    "gate": _names(r"gate_proj|w1"),
    "up": _names(r"up_proj|c_fc|fc1|fc_in|dense_h_to_4h|w3"),
    "gate_up": _names(r"gate_up_proj"),
    "down": _names(r"down_proj|c_proj|fc2|fc_out|dense_4h_to_h|w2"),
}
_ATTENTION_NORMS = {
    "q_norm": _names(r"q_norm|q_layernorm|query_norm|query_layernorm"),
    "k_norm": _names(r"k_norm|k_layernorm|key_norm|key_layernorm"),
}
_ATTENTION_BLOCK = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_BLOCK = re.compile(r"mlp|ffn|feed_?forward", re.IGNORECASE)
_POSITION_EMBEDDING = re.compile(r"wpe|.*pos.*", re.IGNORECASE)
_INPUT_EMBEDDING_NAMES = re.compile(r"embed_tokens|wte|word_embeddings|embed_in", re.IGNORECASE)
_HEAD_NAMES = re.compile(r"lm_head|embed_out", re.IGNORECASE)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no Conv1D can exist
        return ()
    return Conv1D


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _has_matrix_parameter(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _largest_block_list(model: nn.Module) -> str:
    """The ModuleList of same-class blocks holding the most parameters (nested lists, such as MoE
    experts, hold fewer than the list that contains them); ties go to the shallower path."""
    best, best_key = None, None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        key = (n_params, -name.count("."))
        if best_key is None or key > best_key:
            best, best_key = name, key
    if best is None:
        raise UserError(f"{type(model).__name__}: cannot find the decoder layers (no ModuleList of repeated blocks)",
                        "model")
    return best


def layer_prefix(model: nn.Module) -> str:
    """Dotted path of the ModuleList of repeated decoder blocks, e.g. "model.layers".

    The family's own path (Llama's model.layers, GPT-2's transformer.h, ...); for other models
    the ModuleList of same-class blocks holding the most parameters (nested lists, such as MoE
    experts, hold fewer than the list that contains them); ties go to the shallower path.
    """
    declared = family_of(model).layers
    if declared is not None:
        try:
            found = model.get_submodule(declared)
        except AttributeError:
            found = None
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return declared
    return _largest_block_list(model)


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    if get is not None:
        try:
            return get()
        except NotImplementedError:
            pass
    return next((m for n, m in model.named_modules()
                 if isinstance(m, nn.Embedding) and _INPUT_EMBEDDING_NAMES.fullmatch(n.rsplit(".", 1)[-1])), None)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is not None:
        try:
            return get()
        except NotImplementedError:
            pass
    return next((m for n, m in model.named_modules() if _HEAD_NAMES.fullmatch(n.rsplit(".", 1)[-1])), None)


def _shares_weight(head: nn.Module | None, embed: nn.Module | None) -> bool:
    if head is None or embed is None:
        return False
    hw, ew = getattr(head, "weight", None), getattr(embed, "weight", None)
    if hw is None or ew is None:
        return False
    return hw is ew or (not hw.is_meta and hw.data_ptr() == ew.data_ptr() and hw.shape == ew.shape  # meta: all 0
                        and hw.device == ew.device)


def is_tied(model: nn.Module) -> bool:
    """True when the head's weight is the token embedding's weight (one tensor, stored once)."""
    return _shares_weight(_output_embedding(model), _input_embedding(model))


def _block_kind(parent_name: str, parent: nn.Module, prefix: str) -> str | None:
    """What holds a module: "attention", "mlp", "layer" (the decoder block itself), or None."""
    if parent_name.startswith(prefix + ".") and parent_name.count(".") == prefix.count(".") + 1:
        return "layer"
    for text in (parent_name.rsplit(".", 1)[-1], type(parent).__name__):  # attribute name first, then class
        if _ATTENTION_BLOCK.search(text):
            return "attention"
        if _MLP_BLOCK.search(text):
            return "mlp"
    return None


def _match(table: dict[str, re.Pattern], attr: str) -> str | None:
    return next((role for role, pattern in table.items() if pattern.fullmatch(attr)), None)


# ---- config readings ---------------------------------------------------------------------

def _heads(cfg, attn: nn.Module | None = None, q_rows: int | None = None) -> tuple[int | None, int | None, int | None]:
    """(n_heads, n_kv_heads, head_dim): the attention module's own head_dim first, then the config's."""
    n_heads = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None and n_heads:
        rows = q_rows if q_rows is not None else getattr(cfg, "hidden_size", None)
        head_dim = rows // n_heads if rows else None
    return n_heads, n_kv, head_dim


def _rope_config(cfg) -> tuple[float | None, dict]:
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return (None if theta is None else float(theta)), params


def _rope_dim(cfg, params: dict, head_dim: int | None) -> int | None:
    rotary_dim = getattr(cfg, "rotary_dim", None)          # GPT-J
    if rotary_dim:
        return int(rotary_dim)
    if head_dim is None:
        return None
    partial = (params.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None)
               or getattr(cfg, "rotary_pct", None))
    return int(head_dim * partial) if partial else head_dim


def _has_rope(cfg, theta: float | None, params: dict) -> bool:
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi":
        return False
    per_attention_type = any(isinstance(v, dict) and "rope_theta" in v for v in params.values())  # Gemma 3
    return theta is not None or per_attention_type or bool(getattr(cfg, "rotary_dim", None))


def _rope_placement(family: Family, has_rope: bool, has_qk_norm: bool) -> str | None:
    if family.rope != "auto":
        return family.rope
    if not has_rope:
        return None
    return "post_qk_norm" if has_qk_norm else "post_proj"


# ---- mixture-of-experts blocks -------------------------------------------------------------

_MOE_BLOCKS = ("mlp", "block_sparse_moe")      # where a decoder layer keeps its MoE block (Mixtral's older name)
_ROUTERS = ("gate", "router")
#: an expert MLP's matrices in the ModuleList form, by attribute name (Qwen: *_proj; Mixtral: w1 w3 w2)
_EXPERT_MATRICES = {"expert_gate": ("gate_proj", "w1"), "expert_up": ("up_proj", "w3"),
                    "expert_down": ("down_proj", "w2")}
_SHARED_MATRICES = {"shared_expert_gate": "gate_proj", "shared_expert_up": "up_proj", "shared_expert_down": "down_proj"}
#: families whose routers always renormalise the top-k weights (no config switch)
_ALWAYS_NORMALISED = ("mixtral",)


def _child(module: nn.Module, names) -> tuple[str | None, nn.Module | None]:
    return next(((n, getattr(module, n)) for n in names if isinstance(getattr(module, n, None), nn.Module)),
                (None, None))


def _moe_block(cfg, layer_name: str, layer: nn.Module, index: int,
               claimed: dict[str, list[TensorRole]], unmatched: list[str]) -> MoELayout | None:
    """The MoE block of one decoder layer (None: a dense MLP). Its modules' roles go into `claimed`
    (module name -> roles); a block it cannot read goes into `unmatched`, naming why."""
    path, block = _child(layer, _MOE_BLOCKS)
    if block is None:
        return None
    experts = getattr(block, "experts", None)
    router_path, router = _child(block, _ROUTERS)
    if experts is None or router is None:
        return None
    name = f"{layer_name}.{path}"
    experts_name, router_name = f"{name}.experts", f"{name}.{router_path}"

    def refuse(why: str) -> None:
        unmatched.append(f"{experts_name} ({type(experts).__name__}: {why})")
        claimed.setdefault(experts_name, [])
        claimed.setdefault(router_name, [])

    w = getattr(router, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        refuse(f"its router {router_name} has no [experts, hidden] weight")
        return None
    n_experts = int(w.shape[0])
    top_k = int(getattr(router, "top_k", None) or getattr(cfg, "num_experts_per_tok", 0) or 0)
    if not 0 < top_k <= n_experts:
        refuse(f"cannot tell how many experts a token is routed to (num_experts_per_tok={top_k})")
        return None
    normalise = getattr(router, "norm_topk_prob", None)
    if normalise is None:
        normalise = getattr(cfg, "model_type", None) in _ALWAYS_NORMALISED or bool(getattr(cfg, "norm_topk_prob", False))
    roles: list[dict[str, TensorRole]] = []
    if isinstance(experts, nn.ModuleList):
        if len(experts) != n_experts:
            refuse(f"{len(experts)} experts, but the router scores {n_experts}")
            return None
        for e, mlp in enumerate(experts):
            found = {role: _child(mlp, names) for role, names in _EXPERT_MATRICES.items()}
            linears = [n for n, m in mlp.named_children() if isinstance(m, nn.Linear)]
            if any(not isinstance(m, nn.Linear) for _, m in found.values()) or len(linears) != 3:
                refuse(f"expert {e} is not a gated MLP of three Linears named gate_proj/up_proj/down_proj or w1/w3/w2 "
                       f"(has {', '.join(linears) or 'none'})")
                return None
            roles.append({role: TensorRole(f"{experts_name}.{e}.{attr}", role, index, m, "linear", expert=e)
                          for role, (attr, m) in found.items()})
        act = getattr(experts[0], "act_fn", None) if n_experts else None
    else:
        params = dict(experts.named_parameters(recurse=False))
        if set(params) != {"gate_up_proj", "down_proj"} or not getattr(experts, "has_gate", True) \
                or getattr(experts, "has_bias", False):
            refuse(f"fused experts with parameters {', '.join(sorted(params)) or 'none'} (readable: gate_up_proj and "
                   "down_proj, no biases)")
            return None
        gate_up, down = params["gate_up_proj"], params["down_proj"]
        transposed = bool(getattr(experts, "is_transposed", False))
        concatenated = bool(getattr(experts, "is_concatenated", True))
        two_i = gate_up.shape[2] if transposed else gate_up.shape[1]
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != n_experts or down.shape[0] != n_experts \
                or two_i % 2 or (down.shape[1] if transposed else down.shape[2]) != two_i // 2:
            refuse(f"fused expert tensors of shapes {tuple(gate_up.shape)} and {tuple(down.shape)} do not fit "
                   f"{n_experts} experts [E, 2I, H] and [E, H, I]")
            return None
        inner = two_i // 2
        # gate and up: the two halves of gate_up (transformers' chunk(2)), or its even and odd rows (interleaved)
        gate_rows = slice(0, inner) if concatenated else slice(0, two_i, 2)
        up_rows = slice(inner, two_i) if concatenated else slice(1, two_i, 2)
        for e in range(n_experts):
            roles.append({role: TensorRole(f"{experts_name}.{e}.{attr}", role, index, experts, "expert", expert=e,
                                           param=param, rows=rows, transposed=transposed)
                          for role, attr, param, rows in (("expert_gate", "gate_proj", "gate_up_proj", gate_rows),
                                                          ("expert_up", "up_proj", "gate_up_proj", up_rows),
                                                          ("expert_down", "down_proj", "down_proj", slice(None)))})
        act = getattr(experts, "act_fn", None)
    if act is None:
        refuse("no act_fn on the experts: the gated MLP's activation is unknown")
        return None
    router_role = TensorRole(router_name, "router", index, router, "linear")
    shared: dict[str, TensorRole] = {}
    shared_mlp = getattr(block, "shared_expert", None)
    if isinstance(shared_mlp, nn.Module):
        for role, attr in _SHARED_MATRICES.items():
            m = getattr(shared_mlp, attr, None)
            if isinstance(m, nn.Linear):
                shared[role] = TensorRole(f"{name}.shared_expert.{attr}", role, index, m, "linear")
    shared_gate = getattr(block, "shared_expert_gate", None)
    if isinstance(shared_gate, nn.Linear):
        shared["shared_router"] = TensorRole(f"{name}.shared_expert_gate", "shared_router", index, shared_gate, "linear")
    moe = MoELayout(name=name, block=block, path=path, router=router_role, router_path=router_path,
                    experts_path="experts", experts_module=experts, fused=not isinstance(experts, nn.ModuleList),
                    n_experts=n_experts, top_k=top_k, normalise=bool(normalise), experts=roles, shared=shared,
                    act=act)
    for t in [router_role, *moe.tensors(), *shared.values()]:
        t.moe = moe
        claimed.setdefault(t.name if t.kind != "expert" else experts_name, []).append(t)
    return moe


# ---- building the layout -----------------------------------------------------------------

def layout(model: nn.Module) -> ModelLayout:
    """The model's layout (see the module docstring). Does not raise on unknown modules: `check()` does."""
    family = family_of(model)
    cfg = getattr(model, "config", None)
    conv1d = _conv1d_class()
    prefix = layer_prefix(model)
    modules = dict(model.named_modules())
    embed, head = _input_embedding(model), _output_embedding(model)
    tied = _shares_weight(head, embed)

    roles: list[TensorRole] = []
    positions: dict[str, str] = {}          # norm module name -> declared position
    unmatched: list[str] = []
    claimed: dict[str, list[TensorRole]] = {}   # MoE blocks' modules -> their roles
    blocks = list(model.get_submodule(prefix))
    moe = {i: _moe_block(cfg, f"{prefix}.{i}", block, i, claimed, unmatched) for i, block in enumerate(blocks)} \
        if family.moe else {}
    for name, module in modules.items():
        if not name:
            continue
        if name in claimed:
            roles.extend(claimed[name])
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = _layer_index(name, prefix)
        in_block = name[len(prefix) + 1:].partition(".")[2] if layer is not None else ""
        declared = family.modules.get(in_block) if in_block else None
        is_matrix = isinstance(module, nn.Linear) or (conv1d and isinstance(module, conv1d))
        kind = "conv1d" if conv1d and isinstance(module, conv1d) else "linear"

        if module is head and head is not None and is_matrix:
            roles.append(TensorRole(name, "head", None, module, kind, tied))
        elif is_matrix:
            role = declared if declared in MATRIX_ROLES else None
            if role is None:
                block = _block_kind(parent_name, parent, prefix) if layer is not None else None
                if block == "attention":
                    role = _match(_ATTENTION_MATRICES, attr)
                elif block in ("mlp", "layer"):  # OPT keeps fc1/fc2 directly in the decoder layer
                    role = _match(_MLP_MATRICES, attr)
            if role is None:
                unmatched.append(f"{name} ({type(module).__name__})")
            else:
                roles.append(TensorRole(name, role, layer, module, kind))
        elif isinstance(module, nn.Embedding):
            if module is embed:
                roles.append(TensorRole(name, "embed", None, module, "embedding", tied))
            elif layer is None and _POSITION_EMBEDDING.fullmatch(attr):
                roles.append(TensorRole(name, "pos_embed", None, module, "embedding"))
            else:
                unmatched.append(f"{name} ({type(module).__name__})")
        elif _is_norm(module) and not any(_is_norm(c) for c in module.children()):
            if declared in NORM_POSITIONS:
                role = declared if declared in ("q_norm", "k_norm") else "norm"
                positions[name] = declared
            else:
                role = "norm"
                if layer is not None and _block_kind(parent_name, parent, prefix) == "attention":
                    role = _match(_ATTENTION_NORMS, attr) or "norm"
            roles.append(TensorRole(name, role, layer, module, "norm"))
        elif _has_matrix_parameter(module):  # e.g. an MoE router or fused expert tensors
            unmatched.append(f"{name} ({type(module).__name__})")

    # One module per matrix role per layer (and expert): two claimants mean we have misread the model.
    seen: dict[tuple[int | None, str, int | None], str] = {}
    ambiguous = []
    for t in roles:
        if t.kind in MATRIX_KINDS:
            key = (t.layer, t.role, t.expert)
            if key in seen:
                ambiguous.append(f"{seen[key]} and {t.name} are both '{t.role}' in layer {t.layer}")
            seen[key] = t.name

    theta, rope_params = _rope_config(cfg)
    has_rope = _has_rope(cfg, theta, rope_params)
    layers = [_layer(family, cfg, prefix, i, block, [t for t in roles if t.layer == i], positions, modules, has_rope,
                     moe.get(i))
              for i, block in enumerate(blocks)]

    outside = {t.role: t for t in reversed(roles) if t.layer is None}  # the first of each role
    norms_outside = [t for t in roles if t.layer is None and t.kind == "norm"]
    final_norm = next((t for t in norms_outside if t.name == family.final_norm), None)
    if final_norm is None and norms_outside:
        final_norm = norms_outside[-1]
    n_heads, n_kv, head_dim = _heads(cfg)
    declared_tie = getattr(cfg, "tie_word_embeddings", None)
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    has_qk_norm = any("q_norm" in layer.norms or "k_norm" in layer.norms for layer in layers)
    rope = _rope_placement(family, has_rope, has_qk_norm)
    return ModelLayout(
        family=family.name, arch=getattr(cfg, "model_type", None), model_class=type(model).__name__,
        prefix=prefix, layers=layers, roles=roles,
        embed=outside.get("embed"), pos_embed=outside.get("pos_embed"), head=outside.get("head"),
        final_norm=final_norm, tied=tied, config_tied=bool(declared_tie) if declared_tie is not None else tied,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, n_experts=int(n_experts),
        rope=rope, rope_theta=theta, rope_parameters=rope_params,
        rope_dim=_rope_dim(cfg, rope_params, head_dim) if rope is not None else None,
        experts_used=max((m.top_k for m in moe.values() if m is not None), default=0),
        unmatched=unmatched, ambiguous=ambiguous)


def _layer(family: Family, cfg, prefix: str, index: int, block: nn.Module, roles: list[TensorRole],
           positions: dict[str, str], modules: dict[str, nn.Module], has_rope: bool,
           moe: MoELayout | None = None) -> LayerLayout:
    name = f"{prefix}.{index}"
    matrices = {t.role: t for t in roles if t.kind in MATRIX_KINDS and t.expert is None}
    norms: dict[str, TensorRole] = {}
    unplaced = []
    for t in (t for t in roles if t.kind == "norm"):
        if t.name in positions:
            norms[positions[t.name]] = t
        elif t.role in ("q_norm", "k_norm"):
            norms[t.role] = t
        else:
            unplaced.append(t)
    if family is GENERIC and 1 <= len(unplaced) <= 2:
        # a pre-norm block in forward order: the attention's norm, then the MLP's (one norm: both read it)
        for position, t in zip(("attn_norm", "ffn_norm"), unplaced):
            norms[position] = t
        unplaced = []
    for t in unplaced:
        norms[t.name[len(name) + 1:]] = t

    def parent(*keys):
        t = next((matrices[k] for k in keys if k in matrices), None)
        if t is None:
            return None, None
        pname = t.name.rpartition(".")[0]
        return pname, modules[pname]

    attention_name, attention = parent("q", "qkv", "k", "v", "o")
    mlp_name, mlp = (moe.name, moe.block) if moe is not None else parent("down", "up", "gate", "gate_up")
    q = matrices.get("q")
    q_rows = q.shape[0] if q is not None and q.shape else None
    n_heads, n_kv, head_dim = _heads(getattr(attention, "config", None) or cfg, attention, q_rows)
    rope = _rope_placement(family, has_rope, "q_norm" in norms or "k_norm" in norms)
    return LayerLayout(index=index, name=name, block=block, roles=roles, matrices=matrices, norms=norms,
                       attention_name=attention_name, attention=attention, mlp_name=mlp_name, mlp=mlp,
                       n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, rope=rope, moe=moe)
