"""Tensor roles: which weight of a causal LM is a query, a key, an MLP gate, the head, a norm.

Roles come from module names and structure, not from a table per model: a matrix's role is
read from its own attribute name (q_proj, c_attn, dense_4h_to_h, ...) together with what its
parent is (an attention block, an MLP block, or the decoder layer itself). The same name can
mean different things in different places: GPT-2's `c_proj` is `o` under `attn` and `down`
under `mlp`; NeoX's `dense` is `o` under `attention`.

Everything is reported in [out, in] orientation. GPT-2's transformers `Conv1D` stores its
weight as [in, out] (y = x @ W + b); `get_weight`/`set_weight` transpose it so callers never
see the difference.

A model with a weight-bearing module we cannot name (an unknown Linear, an MoE router, fused
expert tensors) is refused with `UnmatchedModulesError` rather than silently left in fp:
the bit counts and the quantized model would both be wrong otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

ROLES: tuple[str, ...] = (
    "q", "k", "v", "o", "qkv",              # attention matrices (qkv: fused)
    "gate", "up", "down", "gate_up",         # MLP matrices (gate_up: fused)
    "head",                                  # lm_head (output embedding)
    "embed", "pos_embed",                    # token and learned position embeddings
    "norm", "q_norm", "k_norm",              # LayerNorm/RMSNorm; per-head query/key norms
)
MATRIX_KINDS = ("linear", "conv1d")

# GPTQ's true-sequential order inside one decoder layer: a group's inputs are produced by
# the groups before it, so each group is calibrated on the outputs of already-quantized ones.
SEQUENTIAL_ORDER: tuple[tuple[str, ...], ...] = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))


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


class UnmatchedModulesError(ValueError):
    """Weight-bearing modules that have no role, or that claim a role another module has."""

    def __init__(self, model_class: str, unmatched: list[str], ambiguous: list[str] | None = None):
        self.model_class, self.unmatched, self.ambiguous = model_class, list(unmatched), list(ambiguous or [])
        parts = []
        if self.unmatched:
            parts.append(f"no tensor role for {len(self.unmatched)} weight-bearing module(s): "
                         + ", ".join(self.unmatched))
        if self.ambiguous:
            parts.append("ambiguous roles: " + "; ".join(self.ambiguous))
        super().__init__(f"{model_class}: " + "; ".join(parts)
                         + f" (known roles: {', '.join(ROLES)}; matrices must sit in an attention or MLP block)")


@dataclass
class TensorRole:
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


# ---- decoder layers ----------------------------------------------------------------------

def layer_prefix(model: nn.Module) -> str:
    """Dotted path of the ModuleList of repeated decoder blocks, e.g. "model.layers".

    Generic: the ModuleList of same-class blocks holding the most parameters (nested lists,
    such as MoE experts, hold fewer than the list that contains them); ties go to the
    shallower path.
    """
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
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers (no ModuleList of repeated blocks)")
    return best


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, in order."""
    return list(model.get_submodule(layer_prefix(model)))


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1:].split(".", 1)[0])


# ---- roles -------------------------------------------------------------------------------

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


def is_tied(model: nn.Module) -> bool:
    """True when the head's weight is the token embedding's weight (one tensor, stored once)."""
    head, embed = _output_embedding(model), _input_embedding(model)
    if head is None or embed is None:
        return False
    hw, ew = getattr(head, "weight", None), getattr(embed, "weight", None)
    if hw is None or ew is None:
        return False
    return hw is ew or (hw.data_ptr() == ew.data_ptr() and hw.shape == ew.shape and hw.device == ew.device)


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


def find_roles(model: nn.Module) -> list[TensorRole]:
    """Every role-bearing module, in model order. Raises UnmatchedModulesError on unknowns."""
    conv1d = _conv1d_class()
    prefix = layer_prefix(model)
    modules = dict(model.named_modules())
    embed, head = _input_embedding(model), _output_embedding(model)
    tied = is_tied(model)

    roles: list[TensorRole] = []
    unmatched: list[str] = []
    for name, module in modules.items():
        if not name:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = _layer_index(name, prefix)
        is_matrix = isinstance(module, nn.Linear) or (conv1d and isinstance(module, conv1d))
        kind = "conv1d" if conv1d and isinstance(module, conv1d) else "linear"

        if module is head and head is not None and is_matrix:
            roles.append(TensorRole(name, "head", None, module, kind, tied))
        elif is_matrix:
            block = _block_kind(parent_name, parent, prefix) if layer is not None else None
            role = None
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
    if unmatched or ambiguous:
        raise UnmatchedModulesError(type(model).__name__, unmatched, ambiguous)
    return roles


def quantizable(model: nn.Module, include_head: bool = False) -> list[TensorRole]:
    """The matrices (Linear/Conv1D), in model order; the head only if asked (it may be tied)."""
    return [t for t in find_roles(model)
            if t.kind in MATRIX_KINDS and (include_head or t.role != "head")]


def sequential_groups(roles_of_one_layer: list[TensorRole]) -> list[list[TensorRole]]:
    """Split one layer's matrices into GPTQ's true-sequential groups: [q,k,v|qkv], [o], [gate,up|gate_up|up], [down].

    Non-matrix roles (norms) are ignored; empty groups are left out.
    """
    matrices = [t for t in roles_of_one_layer if t.kind in MATRIX_KINDS]
    layers = {t.layer for t in matrices}
    if None in layers or len(layers) > 1:
        raise ValueError(f"sequential_groups: roles must come from one decoder layer, got layers {sorted(layers, key=str)}")
    groups = []
    for group_roles in SEQUENTIAL_ORDER:
        group = sorted((t for t in matrices if t.role in group_roles), key=lambda t: group_roles.index(t.role))
        if group:
            groups.append(group)
    return groups


# ---- weights in [out, in] ----------------------------------------------------------------

def _weight(t: TensorRole) -> torch.Tensor:
    w = getattr(t.module, "weight", None)
    if w is None:
        raise ValueError(f"{t.name}: module {type(t.module).__name__} has no weight")
    return w


def get_weight(t: TensorRole) -> torch.Tensor:
    """A float32 copy of the weight in [out, in] (Conv1D's [in, out] transposed), on its device.

    A copy, so callers (GPTQ updates W in place) never write through to the model by accident.
    Norm and embedding weights come as stored (Gemma's norms hold w where the scale is 1 + w).
    """
    w = _weight(t).detach()
    if t.kind == "conv1d":
        w = w.t()
    return w.to(torch.float32, copy=True).contiguous()


@torch.no_grad()
def set_weight(t: TensorRole, w: torch.Tensor) -> None:
    """Write an [out, in] matrix back in the module's own layout, dtype and device.

    For a tied head this also changes the token embedding: they are one tensor.
    """
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"set_weight({t.name}): w must be a torch.Tensor, got {type(w).__name__}")
    if tuple(w.shape) != tuple(t.shape):
        raise ValueError(f"set_weight({t.name}): w has shape {tuple(w.shape)}, expected {tuple(t.shape)} ([out, in])")
    target = _weight(t)
    target.copy_(w.t() if t.kind == "conv1d" else w)
