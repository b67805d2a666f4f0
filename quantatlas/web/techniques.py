"""What an arm is made of, read from its stored config (the validated spec's arm) through its steps
(quant/steps/: each says what it contributes), and which bit budgets a codec can produce.

Technique labels. Named techniques (stable since the first atlas):

    solver:gptq / solver:gptaq     the solver (rtn is the default and no technique)
    transform:<name>               each transform (hadamard, equalize, awq, ...)
    codec:<name>                   the default codec (uniform, turbo, q4_k, ...)
    gguf:<FTYPE>                   a llama.cpp file-type mixture ({gguf: Q4_K_M})
    override:<codec|fp16>          a per-tensor override's codec (fp16: kept unquantized)
    allocate, recovery:<method>    allocation within a budget; finetune recovery
    kv, act                        KV-cache / activation quantisation

Option labels: an option of a step's typed config away from its first released default
(`quant.steps.base.option_techniques` says which options are techniques and which are settings),
`<scope>.<option>[=<value>]`, the scope being where the option sits in the arm:

    solver.incoherence, solver.act_order, solver.static_groups, solver.no_importance_from_hessian
    codec.clip=mse, codec.no_symmetric, codec.scale_search, codec.code=3inst, codec.imatrix
    transform:hadamard.no_residual, transform:awq.codec=q4_0
    kv.k=q4_0, kv.v=q8_0, kv.placement=pre_rope, kv.k_granularity=channel, kv.rotate, kv.residual, kv.sinks
    act.codec=uniform, act.scheme=W8A8, act.roles=k+q+v, act.layers, act.include_head
    recovery.train=weights, allocate.grouping=role, propagation=layer|parallel, include_head

A switch turned off reads `<scope>.no_<option>`. The labels of existing techniques never change; an
option label is added only where an arm makes that choice.

No torch: the spec's typed configs and the gguf package's block sizes only.
"""
from __future__ import annotations

import math
import typing
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantatlas.quant.config import ConfigError, parse_config, registry
from quantatlas.quant.steps import arm_techniques
from quantatlas.spec import arm_of

# ggml's quantized tensor types (the gguf package's GGMLQuantizationType with blocks of more than one
# weight, lower case): an arm whose codec is one of these, or a {gguf: ...} mixture, is a llama.cpp
# format and a reference point on the landscape. Our own formats are a subset (a test checks).
GGML_TYPES = frozenset(t.name.lower() for t in GGMLQuantizationType if GGML_QUANT_SIZES[t][0] > 1)

#: an arm has one solver, one default codec and one recovery method
KINDS_ONE_PER_ARM = ("solver", "codec", "recovery")
#: option kinds one arm cannot hold together (ActConfig takes a scheme or a codec, not both)
EXCLUSIVE_KINDS = (frozenset({"act.scheme", "act.codec"}),)

#: whole-bit budgets (bits per weight); see `bit_budget`
BUDGETS = tuple(range(1, 9))
#: a point at b - SLACK bits or more counts for budget b (see `bit_budget`)
BUDGET_SLACK = 0.25
#: at this many bits per weight or more a format is not a quantization budget (fp16, bf16)
NO_BUDGET_FROM = 12.0


def techniques(config: dict | None) -> frozenset[str]:
    """The techniques an arm stacks: what each of its steps contributes (quant/steps/, read from the
    arm's typed configs); none for a config that no longer validates."""
    arm = arm_of(config)
    return frozenset() if arm is None else arm_techniques(arm)


def is_option(technique: str) -> bool:
    """An option label (`solver.incoherence`, `kv.placement=pre_rope`, `propagation=layer`)."""
    head = technique.split("=", 1)[0]
    return "=" in technique or "." in head


def option_parts(technique: str) -> tuple[str | None, str, str | None]:
    """(scope, option, value) of an option label: `solver.no_act_order` -> ("solver", "act_order", "false"),
    `kv.placement=pre_rope` -> ("kv", "placement", "pre_rope"), `include_head` -> (None, "include_head", "true")."""
    head, _, value = technique.partition("=")
    scope, _, option = head.rpartition(".")
    if not value:
        value = "false" if option.startswith("no_") else "true"
        option = option.removeprefix("no_")
    return scope or None, option, value


def kind(technique: str) -> str:
    """What an arm holds one of: `solver`, `codec` (a gguf mixture too), `recovery`; an option label's
    kind is its option (`solver.act_order` for both act_order and no_act_order); else the name's prefix."""
    if technique.startswith("gguf:"):
        return "codec"
    if is_option(technique):
        scope, option, _ = option_parts(technique)
        return option if scope is None else f"{scope}.{option}"
    return technique.split(":", 1)[0]


def _config_has(kind_name: str, name: str, option: str) -> bool:
    cls = registry(kind_name).get(name)
    return cls is not None and option in cls.model_fields


def compatible(a: str, b: str) -> bool:
    """Whether one arm can hold both: not two solvers, two default codecs or two recovery methods; not
    two values of one option; a solver option only with a solver that has it (act_order: gptq, not
    aqlm), a codec option only with a codec that has it (clip: uniform, sparse24)."""
    if a == b:
        return False
    ka, kb = kind(a), kind(b)
    if ka == kb and (ka in KINDS_ONE_PER_ARM or is_option(a) or is_option(b)):
        return False
    if any({ka, kb} == pair for pair in EXCLUSIVE_KINDS):
        return False
    for x, y in ((a, b), (b, a)):
        if not is_option(x):
            continue
        scope, option, _ = option_parts(x)
        if scope == "solver" and y.startswith("solver:") and not _config_has("solver", y[7:], option):
            return False
        if scope == "codec" and kind(y) == "codec" and not is_option(y):
            name = "gguf" if y.startswith("gguf:") else y.split(":", 1)[1]
            if not _config_has("codec", name, option):
                return False
    return True


def is_llamacpp_format(config: dict | None) -> bool:
    """A llama.cpp reference point: the codec is a ggml type or a {gguf: ...} mixture, or the arm is a GGUF file."""
    artifact = (config or {}).get("artifact")
    if isinstance(artifact, dict) and "gguf" in artifact:
        return True
    codec = (config or {}).get("codec")
    if not codec:
        return False
    name = next(iter(codec))
    return name == "gguf" or name in GGML_TYPES


# ---- bit budgets ---------------------------------------------------------------------------

def bit_budget(bits_per_weight: float | None) -> int | None:
    """The whole-bit budget a run falls in, from its measured bits per weight: floor(bits + 1/4), at
    most 8. A b-bit format stores b-bit codes plus up to 3/4 bit of scales and metadata (uniform 4-bit
    g128: 4.125; Q4_0: 4.5; Q2_K: 2.625; Q6_K: 6.5625; Q8_0: 8.5, Q8_K: 9.125 -> 8), and a mixture within
    1/4 bit of the next whole bit is that budget (Q3_K_M at 3.88 is a 4-bit point, not a 3-bit one).
    None for 12 bits or more (fp16 and bf16 are no quantization budget) and for no or non-finite bits."""
    if bits_per_weight is None or not math.isfinite(bits_per_weight) or bits_per_weight <= 0 \
            or bits_per_weight >= NO_BUDGET_FROM:
        return None
    budget = min(int(math.floor(bits_per_weight + BUDGET_SLACK + 1e-9)), BUDGETS[-1])
    return budget if budget >= BUDGETS[0] else None


def nominal_bits(codec: Any) -> float | None:
    """Bits per weight a codec config stores, as far as its config says without building it: the
    config's own `nominal_bits_per_weight()` where a codec defines one; a ggml block type's exact
    size (the gguf package's block bytes); else its integer `bits` option (its code bits: scales and
    metadata add less than the budget's slack). None when the config does not say (a gguf mixture,
    aqlm's codebook shapes, fp8, fp16)."""
    own = getattr(codec, "nominal_bits_per_weight", None)
    if callable(own):
        return float(own())
    if codec.name in GGML_TYPES:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[codec.name.upper()]]
        return 8.0 * size / block
    bits = getattr(codec, "bits", None)
    return float(bits) if isinstance(bits, int) and not isinstance(bits, bool) else None


def bits_choices(name: str) -> tuple[int, ...]:
    """The values a codec's integer `bits` option allows (its Literal, or its ge/le range); () if none."""
    cls = registry("codec").get(name)
    field = None if cls is None else cls.model_fields.get("bits")
    if field is None:
        return ()
    if typing.get_origin(field.annotation) is typing.Literal:
        return tuple(sorted(v for v in typing.get_args(field.annotation) if isinstance(v, int)))
    if field.annotation is not int:
        return ()
    lo, hi = BUDGETS[0], BUDGETS[-1]
    for m in field.metadata:
        if getattr(m, "gt", None) is not None:
            lo = max(lo, m.gt + 1)
        if getattr(m, "ge", None) is not None:
            lo = max(lo, m.ge)
        if getattr(m, "le", None) is not None:
            hi = min(hi, m.le)
        if getattr(m, "lt", None) is not None:
            hi = min(hi, m.lt - 1)
    return tuple(range(lo, hi + 1))


def codec_budgets(codec: str | dict, options: dict | None = None) -> dict[int, dict]:
    """Budget -> the codec written as in a spec ({name: options}) that lands there, for the codec's
    config as given (other options kept) over its `bits` option's range; a codec without a `bits`
    option produces only its own budget (a ggml type's). Empty when the config does not say (see
    `nominal_bits`): such a codec gets only the budgets it was measured at."""
    if isinstance(codec, dict):
        (name, options), = codec.items()
    else:
        name = codec
    options = dict(options or {})
    out: dict[int, dict] = {}
    choices = bits_choices(name)
    for bits in choices or (None,):
        opts = options if bits is None else {**options, "bits": bits}
        try:
            cfg = parse_config("codec", {name: opts})
        except ConfigError:
            continue
        budget = bit_budget(nominal_bits(cfg))
        if budget is not None and budget not in out:
            out[budget] = cfg.to_spec()
    return out
