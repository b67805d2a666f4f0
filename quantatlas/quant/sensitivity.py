"""Sensitivity of each tensor group to its codec, and its price in bits (issue 17, part 1).

For a base recipe (an arm: solver, codec, transforms, overrides) and candidate codecs:

1. the model is quantized once with the base codec and once per candidate (the arm's solver,
   transforms and overrides each time; only the arm's codec changes): every quantized tensor
   then has one weight and one packed size per option;
2. on calibration tokens (never the eval tokens) the fp model gives reference log-probs, and
   the all-base model gives per-token KLD_base;
3. for each group g (role x layer by default: "down.3"; or role: "down"; or layer: "layer.3")
   and candidate c, only g's tensors take c's weights; per-token KLD_gc gives
       ΔKLD(g, c) = mean_t (KLD_gc,t - KLD_base,t)   ± SE of those per-token differences
       Δbits(g, c) = stored bits of g's tensors under c - under the base codec.

Forward passes of the calibration set: 2 + groups x candidates (the fp reference, the base,
then one per group and candidate). ROI = -ΔKLD / Δbpw, Δbpw = Δbits / (weights in all
quantized tensors): KLD bought per added bit per weight of the whole model; higher is a better
buy. Caveats, written here rather than hidden: each candidate's tensors come from a model
quantized entirely with that candidate (with GPTQ's sequential propagation a tensor's update saw
inputs of earlier layers at the candidate, not at the base), and the per-token SE ignores the
correlation of neighbouring tokens (it is a lower bound).

Torch is used only inside functions (this module is imported by the CLI and the allocator).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from quantatlas._lazy import no_grad, torch

GROUPINGS = ("role_layer", "role", "layer")
#: an MoE model's routed experts are grouped like any role: role_layer puts all experts of one role in one
#: layer in a group ("expert_down.3"), role all of them across layers ("expert_down"), so an allocation
#: can give experts fewer or more bits than attention at the same total


def matrix_weights(model):
    from quantatlas.models.roles import matrix_weights as weights

    return weights(model)


def group_of(role: str, layer: int | None, grouping: str = "role_layer") -> str:
    if grouping == "role_layer":
        return role if layer is None else f"{role}.{layer}"
    if grouping == "role":
        return role
    if grouping == "layer":
        return "other" if layer is None else f"layer.{layer}"
    raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")


def codec_label(cfg) -> str:
    """A short stable name of a codec config: `q4_k`, `uniform(bits=3,group=64)`."""
    if cfg is None:
        return "fp16"
    opts = cfg.options(exclude_defaults=True)
    return cfg.name if not opts else f"{cfg.name}(" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")"


@dataclass
class GroupCost:
    group: str
    tensors: list[str]       # parameter names ("model.layers.3.mlp.down_proj.weight")
    weights: int             # quantized weights in the group
    bits: dict[str, int]     # codec label -> stored bits of the group's tensors
    #: codec label -> bits of the group's tensors after `Sensitivity.compressor`, each compressed alone
    zbits: dict[str, int] = field(default_factory=dict)


@dataclass
class Sensitivity:
    base: str                                  # the base codec's label
    candidates: list[str]
    grouping: str
    groups: list[GroupCost]
    kld_base: float                            # mean KLD of the all-base model on the calibration tokens
    delta_kld: dict[str, dict[str, float]]     # group -> candidate -> ΔKLD
    delta_kld_se: dict[str, dict[str, float]]
    total_weights: int
    calib_tokens: int
    forward_passes: int
    seed: int = 0
    configs: dict[str, Any] = field(default_factory=dict)  # label -> codec as written in a spec
    other_bits: int = 0          # stored bits of quantized tensors outside the groups (overrides, ...)
    other_weights: int = 0       # their weights
    fp16_params: int = 0         # parameters not quantized at all (embeddings, norms, ...), at 16 bits
    compressor: str | None = None  # when set: `zbits` per group and `other_zbits` (for a bytes target)
    other_zbits: int = 0           # the rest of the artifact file (other tensors, fp16 rest, header), compressed

    def rows(self) -> list[dict]:
        """The ROI table: one row per group and candidate, best buy first (ΔKLD per added bit per weight)."""
        out = []
        for g in self.groups:
            for c in self.candidates:
                dbits = g.bits[c] - g.bits[self.base]
                dbpw = dbits / self.total_weights
                dk = self.delta_kld[g.group][c]
                roi = -dk / dbpw if dbpw else (math.inf if dk < 0 else -math.inf if dk > 0 else 0.0)
                out.append({"group": g.group, "candidate": c, "delta_kld": dk, "delta_kld_se": self.delta_kld_se[g.group][c],
                            "delta_bits": dbits, "delta_bpw": dbpw, "roi": roi, "weights": g.weights})
        return sorted(out, key=lambda r: -r["roi"])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        d = dict(d)
        d["groups"] = [GroupCost(**g) for g in d["groups"]]
        return cls(**d)


def format_roi(s: Sensitivity, limit: int | None = None) -> str:
    from quantatlas.tables import plain_table, render

    table = plain_table(("rank", "right"), ("group", "left"), ("candidate", "left"), ("ΔKLD", "right"),
                        ("± SE", "right"), ("Δbits/wt", "right"), ("ROI", "right"))
    for i, r in enumerate(s.rows()[:limit], 1):
        table.add_row(str(i), r["group"], r["candidate"], f"{r['delta_kld']:+.3e}", f"{r['delta_kld_se']:.2e}",
                      f"{r['delta_bpw']:+.4f}", f"{r['roi']:.4g}")
    return (f"base {s.base}: KLD {s.kld_base:.5g} on {s.calib_tokens} calibration tokens, "
            f"{s.forward_passes} forward passes; ROI = -ΔKLD per added bit per weight (whole model)\n"
            + render(table))


def role_summary(s: Sensitivity, candidate: str | None = None) -> list[dict]:
    """Per role: the summed ΔKLD over layers of moving that role to `candidate` (default: the first),
    the bits it costs, and ROI: the role ranking behind OpenQuant's "down_proj is the most sensitive"."""
    c = candidate or s.candidates[0]
    by_role: dict[str, dict] = {}
    for g in s.groups:
        role = g.group.split(".")[0]
        r = by_role.setdefault(role, {"role": role, "delta_kld": 0.0, "var": 0.0, "delta_bits": 0})
        r["delta_kld"] += s.delta_kld[g.group][c]
        r["var"] += s.delta_kld_se[g.group][c] ** 2
        r["delta_bits"] += g.bits[c] - g.bits[s.base]
    out = []
    for r in by_role.values():
        dbpw = r["delta_bits"] / s.total_weights
        out.append({"role": r["role"], "candidate": c, "delta_kld": r["delta_kld"], "delta_kld_se": math.sqrt(r["var"]),
                    "delta_bpw": dbpw, "roi": -r["delta_kld"] / dbpw if dbpw else math.nan})
    return sorted(out, key=lambda r: -r["roi"] if not math.isnan(r["roi"]) else math.inf)


# ---- measurement --------------------------------------------------------------------------------

def _variant(lm, arm, codec_cfg, calib, seed: int, compressor: str | None = None, keep: list | None = None):
    """The model quantized by `arm` with its codec replaced: ({param name: weight}, {param name: bits},
    recipe, {param name: compressed bits} when `compressor`); `keep` gets (model, packed)."""
    from quantatlas.context import RunContext
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.quant.steps.transforms import apply_transforms

    variant = arm.model_copy(update={"codec": codec_cfg})
    recipe = build_recipe(variant, "sensitivity")
    model = copy.deepcopy(lm.model)
    ctx = RunContext(seed)
    apply_transforms(model, variant, calib, ctx)
    packed = quantize_model(model, recipe, calib if recipe.needs_calibration else None, ctx)
    params = matrix_weights(model)   # fused MoE experts as their experts' matrices, as packed
    weights = {n: params[n].detach().clone() for n in packed}
    zbits = {}
    if compressor is not None:
        from quantatlas.eval.bits import compressed_size

        zbits = {n: 8 * compressed_size(p.to_bytes(), compressor) for n, p in packed.items()}
        if keep is not None:
            keep.append((model, packed))
    return weights, {n: 8 * p.nbytes for n, p in packed.items()}, recipe, zbits


@no_grad
def _per_token_kld(model, calib, ref_logprobs, batch: int = 8):
    """Per-token KL(P_fp || P_model) at every position of the calibration windows but the last."""
    from quantatlas.eval.kld import token_metrics

    out = []
    for i in range(0, calib.shape[0], batch):
        x = calib[i:i + batch]
        logits = model(x).logits[:, :-1].float().reshape(-1, ref_logprobs[0].shape[-1])
        tgt = x[:, 1:].reshape(-1)
        out.append(torch.from_numpy(token_metrics(ref_logprobs[i // batch], logits, tgt).kld))
    return torch.cat(out)


def _mean_se(d) -> tuple[float, float]:
    n = d.numel()
    return float(d.mean()), (float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0)


@no_grad
def measure_sensitivity(lm, arm, candidates: list, calib, seed: int = 0, grouping: str = "role_layer",
                        only: list[str] | None = None, progress=None, compressor: str | None = None) -> Sensitivity:
    """ΔKLD and Δbits of moving each group of `arm`'s base-codec tensors to each candidate codec.

    `lm`: a LoadedModel; `arm`: a spec Arm whose `codec` is the base; `candidates`: codec configs
    (typed, as `parse_config("codec", ...)` gives); `calib`: [samples, seq_len] calibration tokens;
    `only`: regexes, groups whose name none matches are left out; `compressor` (zstd-22, brotli-11):
    also each tensor's packed bytes compressed alone, and the rest of the artifact file, for an
    allocation against compressed bytes (sums of separately compressed parts: an estimate that
    the run then checks against the real file)."""
    if arm.codec is None:
        raise ValueError("sensitivity: the arm has no codec (the base every group moves from)")
    kept: list = []
    base_w, base_bits, recipe, base_z = _variant(lm, arm, arm.codec, calib, seed, compressor, kept)
    base_label = codec_label(arm.codec)
    labels = [codec_label(c) for c in candidates]
    if base_label in labels or len(set(labels)) != len(labels):
        raise ValueError(f"sensitivity: candidates must differ from each other and from the base {base_label!r}")
    variants = {}
    for lab, c in zip(labels, candidates):
        w, b, _, z = _variant(lm, arm, c, calib, seed, compressor)
        variants[lab] = (w, b, z)

    # groups: tensors whose codec is the arm's (not an override's) and which every variant stores
    from quantatlas.models.roles import find_roles

    model = copy.deepcopy(lm.model)
    plan = {p.name + ".weight": p for p in recipe.plan(find_roles(model), model)}
    params = matrix_weights(model)   # fused MoE experts as their experts' matrices, as packed
    calib = calib.to(next(iter(params.values())).device)   # the forwards below run on the model's device
    groups: dict[str, GroupCost] = {}
    for name in base_w:
        p = plan.get(name)
        if p is None or p.codec is not recipe.codec or any(name not in v[0] for v in variants.values()):
            continue
        gname = group_of(p.role, p.layer, grouping)
        if only and not any(re.search(o, gname) for o in only):
            continue
        g = groups.setdefault(gname, GroupCost(gname, [], 0, {lab: 0 for lab in [base_label, *labels]}))
        g.tensors.append(name)
        g.weights += params[name].numel()
        g.bits[base_label] += base_bits[name]
        for lab in labels:
            g.bits[lab] += variants[lab][1][name]
        if compressor is not None:
            g.zbits[base_label] = g.zbits.get(base_label, 0) + base_z[name]
            for lab in labels:
                g.zbits[lab] = g.zbits.get(lab, 0) + variants[lab][2][name]
    if not groups:
        raise ValueError("sensitivity: no tensor group to measure")

    # fp reference on the calibration tokens
    batch = 8
    ref = []
    for i in range(0, calib.shape[0], batch):
        logits = model(calib[i:i + batch]).logits[:, :-1].float()
        ref.append(torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1]))
    for name, w in base_w.items():  # the all-base model
        params[name].data.copy_(w)
    kld_base = _per_token_kld(model, calib, ref, batch)
    passes = 2
    dk, se = {}, {}
    for g in groups.values():
        dk[g.group], se[g.group] = {}, {}
        for lab in labels:
            for name in g.tensors:
                params[name].data.copy_(variants[lab][0][name])
            d = _per_token_kld(model, calib, ref, batch) - kld_base
            dk[g.group][lab], se[g.group][lab] = _mean_se(d)
            passes += 1
            if progress:
                progress(1)
        for name in g.tensors:
            params[name].data.copy_(base_w[name])
    total = sum(params[n].numel() for n in base_w)
    grouped = {n for g in groups.values() for n in g.tensors}
    other = [n for n in base_w if n not in grouped]
    other_z = 0
    if compressor is not None:  # the file without the grouped tensors' data: header, other tensors, fp16 rest
        from quantatlas.eval.bits import artifact_of, compressed_size

        qmodel, qpacked = kept[0]
        art = artifact_of(qmodel, qpacked)
        for n in grouped:
            art.rest.pop(n, None)
        art.packed = {n: p for n, p in qpacked.items() if n not in grouped}
        other_z = 8 * compressed_size(art.to_bytes(seed), compressor)
    return Sensitivity(base_label, labels, grouping, list(groups.values()), float(kld_base.mean()), dk, se, total,
                       int(kld_base.numel()), passes, seed,
                       {lab: c.to_spec() for lab, c in zip([base_label, *labels],      # read back as configs
                                                           [arm.codec, *candidates])},
                       sum(base_bits[n] for n in other), sum(params[n].numel() for n in other),
                       lm.n_params - total, compressor, other_z)


def allocated_arm(lm, arm, calib, seed: int = 0):
    """`arm` with its `allocate:` block resolved into per-tensor overrides: (the arm to quantize,
    what to write with the run: {"assignment": group -> codec as in a spec, ...}). With
    `allocate.assignment` given nothing is measured."""
    from quantatlas.models.roles import find_roles
    from quantatlas.quant.allocate import choose
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.quant.overrides import Override

    a = arm.allocate
    base_arm = arm.model_copy(update={"allocate": None})
    if a.assignment is not None:
        assignment = {g: c.to_spec() for g, c in a.assignment.items()}   # in full: read back as a config
        info = {"measured": False}
    else:
        sens = measure_sensitivity(lm, base_arm, list(a.candidates), calib, seed, a.grouping,
                                   compressor=a.target.compressor if a.target.bytes is not None else None)
        labels, alloc = choose(sens, a.target, lm.n_params)
        assignment = {g: sens.configs[lab] for g, lab in labels.items()}
        weights = sum(g.weights for g in sens.groups)
        bits = sum(g.bits[labels[g.group]] for g in sens.groups)
        info = {"measured": True, "method": alloc.method, "bits": bits, "groups_bits_per_weight": bits / weights,
                "predicted_delta_kld": alloc.loss, "kld_base_calib": sens.kld_base,
                "forward_passes": sens.forward_passes, "sensitivity": sens.to_dict()}
        if a.target.bytes is not None:  # the estimate the allocation worked to; the run measures the file
            info["predicted_bytes"] = (alloc.bits + sens.other_zbits) / 8
    recipe = build_recipe(base_arm, "allocate")
    model = lm.model
    base = arm.codec.to_spec()
    overrides = list(arm.overrides)
    for p in recipe.plan(find_roles(model), model):
        if p.codec is None or p.codec is not recipe.codec or p.is_vector:
            continue
        c = assignment.get(group_of(p.role, p.layer, a.grouping))
        if c is not None and c != base:
            overrides.append(Override(match="^" + re.escape(p.name) + "$", codec=c))
    info["assignment"] = assignment
    return base_arm.model_copy(update={"overrides": overrides}), info
