"""Content-addressed ids: experiments, families, environments, runs.

An experiment id is `cexp_` + the first hex digits of sha256 over the *normalised* spec
without its free text (title, hypothesis, tags, notes). Normalised means:

- validated by `quantatlas.spec` and dumped with every field that equals its *first released*
  default left out (`quantatlas.quant.config.identity_dump`), codec, transform and solver
  options included: writing a default explicitly, or a later version adding a field whose
  default does what was done before, does not change the id. A default that changes is
  declared on its field (`json_schema_extra={"first_default": old}`): the id keeps measuring
  against the old value, so the bare spelling (which now means the new default) gets a new id
  and the old explicit spelling keeps the old one: one id never stands for two computations;
- canonical JSON: keys sorted, no whitespace, integral floats written as integers
  (`bits: 4.0` == `bits: 4`), strings stripped of surrounding whitespace.

Key order and formatting therefore never matter; list order does (transforms and
overrides apply in order).

The family hash is the same hash without `model`: one experiment run on several models. A spec
with `models: [a, b]` is a study, that family: it is never registered itself, each of its models is
(`Spec.for_model`: the spec with `model: a`, whose id is the one that spelling has).
"""
from __future__ import annotations

from quantatlas.canonical import canonical_json, sha256_hex
from quantatlas.spec import SpecError, parse_spec  # pydantic + yaml only: no torch

ID_PREFIX = "cexp_"
ID_HEX_DIGITS = 8          # at least 6; the ledger lengthens an id on a (rare) prefix collision
ENVIRONMENT_FIELDS = ("device", "packages", "git_commit", "hostname")


def normalise_spec(spec: dict) -> tuple[dict, dict]:
    """(full validated spec as stored, the part that identifies it: no free text, no defaults).

    Raises ValueError (naming the field) when the spec does not validate.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"spec must be a mapping, got {type(spec).__name__}")
    try:
        model = parse_spec(spec, "spec")
    except SpecError as e:
        raise ValueError(str(e)) from None
    if model.is_study:
        raise ValueError(f"spec: field models: a study ({', '.join(model.models)}) is registered as one experiment "
                         "per model: the spec with `model: <name>` (Spec.for_model)")
    for name, arm in model.arms.items():   # an artifact arm is identified by its tensors' hash, read where it ran
        artifact = getattr(arm, "artifact", None)
        if artifact is not None and artifact.sha256 is None:
            raise ValueError(f"spec: field arms.{name}.artifact.sha256: missing; an artifact arm is identified by "
                             "the sha256 of its tensors, which `quantatlas run` fills in where the artifact is")
    return model.model_dump(mode="json"), model.identity()


def spec_hash(identity: dict) -> str:
    """Full sha256 of the identifying part of a spec (see `normalise_spec`)."""
    return sha256_hex(canonical_json(identity))


def family_hash(identity: dict) -> str:
    """The spec hash without the model: the same experiment on another model shares it."""
    rest = {k: v for k, v in identity.items() if k != "model"}
    return sha256_hex(canonical_json(rest))


def experiment_id(full_hash: str, digits: int = ID_HEX_DIGITS) -> str:
    return ID_PREFIX + full_hash[:digits]


def environment_key(environment: dict) -> str:
    """What makes an environment distinct: device, package versions, git commit, host."""
    if not isinstance(environment, dict):
        raise ValueError(f"environment must be a mapping, got {type(environment).__name__}")
    return sha256_hex(canonical_json({k: environment.get(k) for k in ENVIRONMENT_FIELDS}))[:16]


def run_id(experiment: str, arm: str, seed: int, env_key: str, contributor: str, model_hash: str,
           eval_fingerprint: str) -> str:
    """Deterministic: the same run imported into another ledger keeps its id."""
    blob = canonical_json([experiment, arm, int(seed), env_key, contributor, model_hash, eval_fingerprint])
    return "run_" + sha256_hex(blob)[:16]
