"""A recipe: what an arm does to a model — transforms, then a solver with a codec per tensor.

Overrides pick tensors by role name (k, down, ...) or by a regex searched in the module
name, in order, the last match winning; `codec: null` in an override keeps a tensor fp16.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quantatlas.quant.codecs import Codec, make_codec
from quantatlas.spec import Arm

SOLVERS = ("rtn", "gptq", "gptaq")

@dataclass
class TensorPlan:
    name: str           # module name
    role: str
    layer: int | None
    codec: Codec | None  # None: stays fp16
    solver: str
    target: Any = None  # the TensorRole


@dataclass
class Recipe:
    transforms: list = field(default_factory=list)
    solver: str = "rtn"
    solver_options: dict = field(default_factory=dict)
    codec: Codec | None = None
    overrides: list[tuple[re.Pattern | str, Codec | None, str | None]] = field(default_factory=list)
    propagation: str = "sequential"
    include_head: bool = False
    mixture: Any = None  # a GGUFMixture: llama.cpp's per-tensor types instead of one codec

    def plan(self, roles, model=None) -> list[TensorPlan]:
        types = self.mixture.plan(model) if self.mixture is not None else {}
        plans = []
        for t in roles:
            codec, solver = self.codec, self.solver
            if self.mixture is not None:
                codec = self.mixture.codec_of(types.get(t.name, "f16"))
            for match, o_codec, o_solver in self.overrides:
                hit = (match == t.role) if isinstance(match, str) else bool(match.search(t.name))
                if hit:
                    codec, solver = o_codec, (o_solver or solver)
            plans.append(TensorPlan(t.name, t.role, t.layer, codec, solver, t))
        return plans

    @property
    def uses_seed(self) -> bool:
        """Whether results differ between experiment seeds (calibration draw, random signs)."""
        codecs = [self.codec] + [c for _, c, _ in self.overrides]
        return self.needs_calibration or any(c is not None and c.seeded for c in codecs)

    @property
    def needs_calibration(self) -> bool:
        return (bool(self.transforms) or self.solver != "rtn" or any(s and s != "rtn" for _, _, s in self.overrides)
                or bool(self.mixture is not None and self.mixture.imatrix))


def _codec(spec: dict[str, dict] | None, where: str) -> Codec | None:
    if spec is None:
        return None
    (name, opts), = spec.items()
    try:
        return make_codec(name, opts)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _transform(spec: dict[str, dict], where: str, arm_codec: Codec | None):
    from quantatlas.quant.transforms import make_transform

    (name, opts), = spec.items()
    try:
        t = make_transform(name, opts)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if getattr(t, "codec", "absent") is None:  # AWQ searches its scales for the arm's own codec
        t.codec = arm_codec
    return t


def build_recipe(arm: Arm, where: str = "arm") -> Recipe:
    """Turn a validated arm into codecs and transforms; ValueErrors name the field."""
    from quantatlas.models.roles import ROLES

    if arm.solver not in SOLVERS:
        raise ValueError(f"{where}.solver: unknown solver {arm.solver!r}; known: {', '.join(SOLVERS)}")
    from quantatlas.quant.solvers import GPTQ_OPTIONS

    for block in ("kv", "act"):  # accepted by the spec so experiments can be written, refused until built
        if getattr(arm, block) is not None:
            what = "KV-cache" if block == "kv" else "activation"
            raise ValueError(f"{where}.{block}: {what} quantization is not implemented yet")
    unknown = sorted(set(arm.solver_options) - set(GPTQ_OPTIONS))
    if unknown:
        raise ValueError(f"{where}.solver_options: unknown option {unknown[0]!r}; known: {', '.join(GPTQ_OPTIONS)}")
    overrides = []
    for i, o in enumerate(arm.overrides):
        w = f"{where}.overrides.{i}"
        if o.solver is not None and o.solver not in SOLVERS:
            raise ValueError(f"{w}.solver: unknown solver {o.solver!r}; known: {', '.join(SOLVERS)}")
        if o.match in ("norm", "q_norm", "k_norm", "pos_embed"):
            raise ValueError(f"{w}.match: {o.match!r} tensors are vectors; quantizing them is not implemented yet")
        if o.match in ROLES:
            match: re.Pattern | str = o.match
        else:
            try:
                match = re.compile(o.match)
            except re.error as e:
                raise ValueError(f"{w}.match: bad regex {o.match!r}: {e}") from None
        overrides.append((match, _codec(o.codec, f"{w}.codec"), o.solver))
    mixture = None
    codec_spec = arm.codec
    if codec_spec is not None and next(iter(codec_spec)) == "gguf":
        from quantatlas.quant.gguf_mix import GGUFMixture

        mixture = GGUFMixture.from_options(codec_spec["gguf"], f"{where}.codec.gguf")
        codec_spec = None
    codec = _codec(codec_spec, f"{where}.codec")
    return Recipe(
        mixture=mixture,
        transforms=[_transform(t, f"{where}.transforms.{i}", codec) for i, t in enumerate(arm.transforms)],
        solver=arm.solver,
        solver_options=dict(arm.solver_options),
        codec=codec,
        overrides=overrides,
        propagation=arm.propagation,
        include_head=arm.include_head,
    )
