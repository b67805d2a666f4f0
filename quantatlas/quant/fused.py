"""One tensor scale for the matrices a runtime fuses (the weights step's hook for NVFP4 `tensor_scale: fused`).

vLLM loads q/k/v of a layer as one matrix (QKVParallelLinear) and gate/up as another (MergedColumnParallelLinear,
likewise a shared expert's gate/up): a format with one scale per tensor can then hold only one, so
llm-compressor writes the same NVFP4 global scale into each member, from their joint amax. Before any member is
solved, each such group of plans whose codecs share tensor scales (`shares_tensor_scale`) and have the same
config gets its codec bound to the group's amax (`with_amax`, quant/codecs/tensor_scale.py): the largest |w|
over the members' weights as the weights step finds them (after the transforms).

The weights must be in memory: the in-memory pass binds every plan up front, the layer-streamed pass each
layer's plans once the layer is materialised. A member alone in its group (an override gave the others another
codec) keeps its own amax. Under solver incoherence the shared amax is the unrotated matrices'.
"""
from __future__ import annotations

from quantatlas.models.roles import get_weight

#: role -> the matrix a runtime fuses it into
FUSED_ROLES = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up",
               "shared_expert_gate": "shared_gate_up", "shared_expert_up": "shared_gate_up",
               "expert_gate": "expert_gate_up", "expert_up": "expert_gate_up"}


def share_tensor_scales(plans) -> None:
    """Bind each fused group's codecs to the group's amax, in place (module docstring)."""
    groups: dict[tuple, list] = {}
    for p in plans:
        if p.codec is None or not getattr(p.codec, "shares_tensor_scale", False) or p.role not in FUSED_ROLES:
            continue
        expert = getattr(p.target, "expert", None)
        key = (p.layer, FUSED_ROLES[p.role], expert, p.codec.name, repr(p.codec.config()))
        groups.setdefault(key, []).append(p)
    for members in groups.values():
        if len(members) < 2:
            continue
        amax = max(float(get_weight(p.target).abs().amax()) for p in members)
        for p in members:
            p.codec = p.codec.with_amax(amax)
