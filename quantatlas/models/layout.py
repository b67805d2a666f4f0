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

from torch import nn

from quantatlas.errors import UserError

ROLES: tuple[str, ...] = (
    "q", "k", "v", "o", "qkv",              # attention matrices (qkv: fused)
    "gate", "up", "down", "gate_up",         # MLP matrices (gate_up: fused)
    "head",                                  # lm_head (output embedding)
    "embed", "pos_embed",                    # token and learned position embeddings
    "norm", "q_norm", "k_norm",              # LayerNorm/RMSNorm; per-head query/key norms
)
MATRIX_KINDS = ("linear", "conv1d")
MATRIX_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up")
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
    kind: str                 # "linear", "conv1d", "embedding", "norm"
    tied: bool = False        # head and token embedding share one weight (set on both)

    @property
    def shape(self) -> tuple[int, ...]:
        """[out, in] for matrices, [rows, dim] for embeddings, the weight's shape for norms."""
        w = getattr(self.module, "weight", None)
        if w is None:
            return ()
        if self.kind == "conv1d":
            return (w.shape[1], w.shape[0])
        return tuple(w.shape)


# ---- the layout --------------------------------------------------------------------------

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
    unmatched: list[str] = field(default_factory=list, repr=False)
    ambiguous: list[str] = field(default_factory=list, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

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
    for name, module in modules.items():
        if not name:
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

    # One module per matrix role per layer: two claimants mean we have misread the model.
    seen: dict[tuple[int | None, str], str] = {}
    ambiguous = []
    for t in roles:
        if t.kind in MATRIX_KINDS:
            key = (t.layer, t.role)
            if key in seen:
                ambiguous.append(f"{seen[key]} and {t.name} are both '{t.role}' in layer {t.layer}")
            seen[key] = t.name

    theta, rope_params = _rope_config(cfg)
    has_rope = _has_rope(cfg, theta, rope_params)
    blocks = list(model.get_submodule(prefix))
    layers = [_layer(family, cfg, prefix, i, block, [t for t in roles if t.layer == i], positions, modules, has_rope)
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
        unmatched=unmatched, ambiguous=ambiguous)


def _layer(family: Family, cfg, prefix: str, index: int, block: nn.Module, roles: list[TensorRole],
           positions: dict[str, str], modules: dict[str, nn.Module], has_rope: bool) -> LayerLayout:
    name = f"{prefix}.{index}"
    matrices = {t.role: t for t in roles if t.kind in MATRIX_KINDS}
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
    mlp_name, mlp = parent("down", "up", "gate", "gate_up")
    q = matrices.get("q")
    q_rows = q.shape[0] if q is not None and q.shape else None
    n_heads, n_kv, head_dim = _heads(getattr(attention, "config", None) or cfg, attention, q_rows)
    rope = _rope_placement(family, has_rope, "q_norm" in norms or "k_norm" in norms)
    return LayerLayout(index=index, name=name, block=block, roles=roles, matrices=matrices, norms=norms,
                       attention_name=attention_name, attention=attention, mlp_name=mlp_name, mlp=mlp,
                       n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, rope=rope)
