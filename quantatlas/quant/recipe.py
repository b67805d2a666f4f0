"""A recipe: what an arm does to a model, as an ordered plan of steps.

    1. transforms      function-preserving re-parametrisations (rotations, scales)
    2. weights         a solver with a codec per tensor (overrides), or a llama.cpp mixture
    3. kv              KV-cache quantization in the forward pass (quant/kv.py)
    4. act             activation quantization of Linear inputs (quant/act.py)
    5. recovery        finetuning against the fp teacher on calibration tokens (quant/recovery.py);
                       the runner runs it right after the weights (the KV/act hooks attach later)

Each step says which statistics it needs; the runner collects only those. Overrides pick
tensors by role name (k, down, q_norm, ...) or by a regex searched in the module name, in order,
the last match winning; `codec: null` in an override keeps a tensor fp16. The arm's codec
applies to matrices; norm vectors are quantized only where an override gives them a codec.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quantatlas.quant.act import ActConfig
from quantatlas.quant.codecs import Codec
from quantatlas.quant.codecs.gguf import GGUFConfig
from quantatlas.quant.config import parse_config
from quantatlas.quant.kv import KVCacheConfig
from quantatlas.quant.recovery import RecoveryConfig
from quantatlas.quant.solvers.base import Solver
from quantatlas.spec import Arm

VECTOR_ROLES = ("norm", "q_norm", "k_norm")


@dataclass
class TensorPlan:
    name: str           # module name
    role: str
    layer: int | None
    codec: Codec | None  # None: stays fp16
    solver: Solver
    target: Any = None  # the TensorRole

    @property
    def is_vector(self) -> bool:
        return self.role in VECTOR_ROLES


@dataclass
class Recipe:
    transforms: list = field(default_factory=list)
    solver: Solver | None = None
    codec: Codec | None = None
    overrides: list[tuple[re.Pattern | str, Codec | None, Solver | None]] = field(default_factory=list)
    propagation: str = "sequential"
    include_head: bool = False
    mixture: Any = None  # a GGUFMixture: llama.cpp's per-tensor types instead of one codec
    kv: KVCacheConfig | None = None
    act: ActConfig | None = None
    recovery: RecoveryConfig | None = None

    def __post_init__(self):
        if self.solver is None:
            self.solver = parse_config("solver", "rtn").build()

    def plan(self, roles, model=None) -> list[TensorPlan]:
        types = self.mixture.plan(model) if self.mixture is not None else {}
        plans = []
        for t in roles:
            vector = t.role in VECTOR_ROLES
            codec, solver = (None if vector else self.codec), self.solver
            if self.mixture is not None and not vector:
                codec = self.mixture.codec_of(types.get(t.name, "f16"))
            for match, o_codec, o_solver in self.overrides:
                if _hits(match, t):
                    codec, solver = o_codec, (o_solver or solver)
            plans.append(TensorPlan(t.name, t.role, t.layer, codec, solver, t))
        return plans

    def overridden(self, t) -> bool:
        """Whether an override names tensor `t` (a TensorRole)."""
        return any(_hits(match, t) for match, _, _ in self.overrides)

    @property
    def solvers(self) -> list[Solver]:
        return [self.solver] + [s for _, _, s in self.overrides if s is not None]

    @property
    def statistics(self) -> frozenset[str]:
        """What the weight step's solvers need from calibration (see solvers/base.py)."""
        out = frozenset().union(*(s.needs for s in self.solvers))
        if self.mixture is not None and self.mixture.imatrix:
            out |= {"sq_mean"}
        return out

    @property
    def uses_seed(self) -> bool:
        """Whether results differ between experiment seeds (calibration draw, random signs)."""
        codecs = [self.codec] + [c for _, c, _ in self.overrides]
        runtime = [c for c in (self.kv, self.act) if c is not None]
        return self.needs_calibration or any(c is not None and c.seeded for c in codecs) or \
            any(c.seeded for c in runtime) or any(s.seeded for s in self.solvers) or self.recovery is not None

    @property
    def needs_calibration(self) -> bool:
        return bool(self.transforms) or bool(self.statistics)


def _hits(match: re.Pattern | str, t) -> bool:
    return (match == t.role) if isinstance(match, str) else bool(match.search(t.name))


def _match(pattern: str, where: str) -> re.Pattern | str:
    from quantatlas.models.roles import ROLES

    if pattern in ROLES:
        return pattern
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}.match: bad regex {pattern!r}: {e}") from None


def build_recipe(arm: Arm, where: str = "arm") -> Recipe:
    """Turn a validated arm (typed configs) into the objects that run; ValueErrors name the field."""
    solver = arm.solver_options.build()
    overrides = []
    for i, o in enumerate(arm.overrides):
        o_solver = None
        if o.solver is not None:
            o_solver = solver if o.solver == arm.solver else parse_config("solver", o.solver).build()
        overrides.append((_match(o.match, f"{where}.overrides.{i}"), None if o.codec is None else o.codec.build(),
                          o_solver))
    mixture = codec = None
    if isinstance(arm.codec, GGUFConfig):
        mixture = arm.codec.build()
    elif arm.codec is not None:
        codec = arm.codec.build()
    transforms = [t.build() for t in arm.transforms]
    for t in transforms:
        if getattr(t, "codec", "absent") is None:  # AWQ searches its scales for the arm's own codec
            t.codec = codec
    return Recipe(transforms=transforms, solver=solver, codec=codec, overrides=overrides,
                  propagation=arm.propagation, include_head=arm.include_head, mixture=mixture, kv=arm.kv,
                  act=arm.act, recovery=arm.recovery)
