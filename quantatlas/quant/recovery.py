"""Finetune recovery: a recipe step after the weights, with the fp model as teacher.

    recovery: {method: kd_ste, train: scales, steps: 200, lr: 0.001, samples: 64, seq_len: 256, batch: 4}

Methods (loss on calibration tokens only; the eval tokens are never seen, see `check_disjoint`):

    kd_ste    the whole model, loss KL(P_fp ‖ P_q) over the vocabulary at every calibration position
    block_ap  EfficientQAT's Block-AP: decoder layer by layer, loss MSE between the quantized layer's
              output on the quantized prefix's hidden states (already tuned) and the fp layer's output
              on the fp prefix's hidden states (the target the whole model should reproduce)
    pv_lite   kd_ste's loss; Adam steps on the scales (and norms) alternate with discrete steps: every
              `discrete_every` steps each matrix moves at most `fraction` of its integer codes by ±1,
              the moves with the largest first-order gain −g·Δ first (g: the KL gradient w.r.t. the
              dequantized weight, summed since the last discrete step); a discrete step that raises
              the loss on the current batch is taken back; uniform codec only. Superseded by pv_tuning
              and kept unchanged so that specs and stored results that name it read and reproduce
              (it is not a special case of pv_tuning: ±1 moves by the summed gradient's sign, undone
              when the batch loss rises, vs rounding a straight-through buffer)
    pv_tuning PV-Tuning (quant/pv_tuning.py): Adam P-steps on the pack's continuous parameters (scales;
              AQLM's codebooks) and a straight-through buffer; every `discrete_every` steps a V-step
              re-encodes the `fraction` (τ) of code groups whose buffer moved most, with the codec's
              own search (uniform rounding, e8p/d4/e8 nearest point, aqlm beam search: `beam`),
              bounded by `trust_ratio`; buffer lr `v_lr` × the matrix's RMS; codebooks' lr `codebook_lr`
    qad       kd_ste's loss and loop, train: weights on the pack's frozen scales: NVIDIA's quantization-aware
              distillation (quant/qad.py says how it differs from kd_ste with train: weights)
    roste     RoSTE: QAT through the STE on the weights, the arm's activation and KV quantizers in the loop,
              each layer's value-path and down_proj rotation chosen (identity or Hadamard) by the lower
              weight + activation quantization error; kd_ste's KL loss (quant/roste.py)

What trains (`train`):

    scales        codes fixed; each pack's fp16 `scale` [rows, groups] (or [rows]) is trainable, as
                  s0 · m with m trained from 1 (so `lr` is a relative step). Supported where decode is linear in that scale: uniform (both grids), e8p,
                  d4, e8, trellis, sparse24, turbo, lloyd_max, aqlm, ... (checked on the pack itself;
                  llama.cpp's block formats store no such tensor and are refused with a clear error)
    scales_norms  the same, and the fp16 norm gains (RMSNorm weights) that are not quantized
    weights       every weight re-rounded: a latent fp matrix (starting from the fp weights in the pack's
                  basis) goes through the codec's `fake_quantize` with a straight-through estimator
                  (any codec); at the end encode(latent) is packed and decoded

Incoherence packs (`incoherence: true`) are tuned in their rotated basis: the scales and the latent
live there, and the forward weight is Uᵀ (·) V, so the stored format stays the codec's own.

Mixture-of-experts blocks whose experts are fused 3-D tensors (transformers 5: `experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I], or stored transposed) are tuned expert by expert, as the
weights step packs them (`<experts>.<e>.gate_proj.weight` ...): each expert matrix gets its own trainable
view above, and every step's forward gets each fused parameter assembled from its experts' current
weights (models/moe.py `FusedExpertWeights`: gate and up rows placed as the layout reads them, experts
left unquantized as the model holds them), so the gradient reaches each expert's view through the
assembly; at the end each expert's slice of the fused parameter is set to decode(Packed). The assembled
tensors live for one step, as the Linears' forward weights do. A router is trained only where the recipe
packs it (by default it stays fp16, as the recipe left it), also where it is no nn.Linear (transformers 5).

The result is always exactly the codec's format: after tuning every matrix is re-packed (same
tensors, same dtypes, same shapes: the bits do not change) and the model's weight is set to
decode(Packed), which is what is evaluated. Trained norms are rounded to fp16, as stored.
A seed fixes the calibration draw and the order of mini-batches.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from quantatlas._lazy import nn, no_grad, torch
from quantatlas.context import RunContext
from quantatlas.quant.config import ADDED_LATER
from quantatlas.quant.pv_tuning import codec_of_pack, kl_to_teacher, split_basis, trainable_matrices


class RecoveryConfig(BaseModel):
    """The `recovery:` block of an arm."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    seeded: ClassVar[bool] = True  # the calibration draw and the data order come from the seed

    method: Literal["kd_ste", "block_ap", "pv_lite", "qad", "roste", "pv_tuning"]
    train: Literal["scales", "scales_norms", "weights"] = "scales"
    steps: int = Field(200, ge=1)          # optimizer steps (block_ap: per decoder layer)
    lr: float = Field(1e-3, gt=0, le=1)
    samples: int = Field(64, ge=1)         # calibration windows drawn (seeded) from data.calib's source
    seq_len: int = Field(256, ge=2)
    batch: int = Field(4, ge=1)            # windows per step
    fraction: float = Field(0.01, gt=0, le=1)  # pv_lite: most codes of a matrix one discrete step moves
    discrete_every: int = Field(20, ge=1)      # pv_lite: Adam steps between discrete steps
    # pv_tuning (quant/pv_tuning.py; `fraction` is its τ, `discrete_every` its P-steps between V-steps):
    #: the straight-through buffer's Adam lr, times each matrix's RMS
    v_lr: float = Field(1e-2, gt=0, le=1, json_schema_extra={ADDED_LATER: True})
    #: a V-step's change ‖ΔW‖ ≤ trust_ratio·‖W‖ per matrix (null: only τ limits it)
    trust_ratio: float | None = Field(None, gt=0, json_schema_extra={ADDED_LATER: True})
    #: AQLM's beam width when a V-step re-encodes (null: the codec's own `beam`)
    beam: int | None = Field(None, ge=1, le=256, json_schema_extra={ADDED_LATER: True})
    #: the P-step's Adam lr on AQLM's shared codebooks (null: `lr`; 0 freezes them). Absolute, in the
    #: codebooks' units (weights / row scale); quant/pv_tuning.py says why `lr` itself is too large
    codebook_lr: float | None = Field(None, ge=0, le=1, json_schema_extra={ADDED_LATER: True})

    @model_serializer(mode="wrap")
    def _later_options_at_default(self, handler):
        """Options marked ADDED_LATER are left out while at their default, so configs, arm keys and ids
        stored before they existed read as before."""
        out = handler(self)
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get(ADDED_LATER) and getattr(self, name) == field.default:
                out.pop(name, None)
        return out

    @model_validator(mode="after")
    def _pv_tuning_options(self):
        if self.method == "pv_tuning" and self.train == "weights":
            raise ValueError("pv_tuning needs train: scales or scales_norms (its P-step tunes the pack's scales and "
                             "codebooks, its V-step re-encodes codes)")
        for name in ("v_lr", "trust_ratio", "beam", "codebook_lr"):
            if self.method != "pv_tuning" and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name} is an option of method pv_tuning, not {self.method}")
        return self

    #: roste: each layer's value-path and down_proj rotation (quant/roste.py); adaptive is the paper's rule
    rotation: Literal["adaptive", "none", "hadamard"] = Field("adaptive", json_schema_extra={ADDED_LATER: True})

    @model_validator(mode="before")
    @classmethod
    def _qat_trains_weights(cls, data):
        """qad and roste train the weights through the STE: `train` may be left out (it is weights)."""
        if isinstance(data, dict) and data.get("method") in ("qad", "roste") and "train" not in data:
            return {**data, "train": "weights"}
        return data

    @model_validator(mode="after")
    def _qat_options(self):
        if self.method in ("qad", "roste") and self.train != "weights":
            raise ValueError(f"{self.method} trains the weights through the straight-through estimator: "
                             f"train must be weights (or left out), not {self.train}")
        if self.method != "roste" and self.rotation != "adaptive":
            raise ValueError(f"rotation is roste's option (its per-layer rotation choice); method {self.method} "
                             "has none")
        return self

    @model_validator(mode="after")
    def _pv_moves_codes(self):
        if self.method == "pv_lite" and self.train == "weights":
            raise ValueError("pv_lite needs train: scales or scales_norms (it moves codes and tunes scales); "
                             "train: weights is for kd_ste and block_ap")
        return self


# -- disjointness of the training and evaluation tokens ------------------------------------------

def check_disjoint(calib_stream: np.ndarray, starts: np.ndarray, seq_len: int, eval_stream: np.ndarray,
                   eval_used: int) -> None:
    """Raise ValueError if a calibration window [s, s + seq_len) of `calib_stream` overlaps the eval tokens.

    The eval set uses the first `eval_used` tokens of `eval_stream`. When both streams are the same
    token sequence (same source and split, or two copies), windows are compared by position; the
    reference corpus's calib and eval splits are different files (corpus.split_of), hence disjoint.
    """
    same = calib_stream is eval_stream or (len(calib_stream) == len(eval_stream)
                                           and np.array_equal(calib_stream, eval_stream))
    if not same:
        return
    starts = np.asarray(starts)
    bad = starts[starts < eval_used]
    if len(bad):
        raise ValueError(f"recovery: calibration window at token {int(bad[0])} (+{seq_len}) overlaps the eval tokens "
                         f"[0, {eval_used}) of the same stream ({len(bad)} of {len(starts)} windows); "
                         f"use a data.calib.source different from data.eval.source")


def draw_windows(stream: np.ndarray, samples: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`samples` windows of `seq_len` tokens at seeded random offsets: (tokens [samples, seq_len], starts)."""
    if len(stream) < seq_len + 1:
        raise ValueError(f"recovery.seq_len: the calibration stream has {len(stream)} tokens, fewer than {seq_len}")
    rng = RunContext(int(seed)).rng("recovery.windows")
    starts = rng.integers(0, len(stream) - seq_len, size=samples)
    return np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64), starts


def batch_order(cfg: RecoveryConfig, seed: int) -> list[int]:
    """The mini-batch of each step: the pool is cut into batches of `batch` consecutive windows (the
    pool itself is a seeded draw), visited in a seeded random order, epoch after epoch."""
    rng = RunContext(int(seed)).rng("recovery.batches")
    n = math.ceil(cfg.samples / cfg.batch)
    out: list[int] = []
    while len(out) < cfg.steps:
        out.extend(int(i) for i in rng.permutation(n))
    return out[:cfg.steps]


def _chunk(windows: torch.Tensor, i: int, batch: int) -> torch.Tensor:
    return windows[i * batch:(i + 1) * batch]


# -- trainable views of one packed matrix ---------------------------------------------------------

def _expand(scale: torch.Tensor, cols: int) -> torch.Tensor:
    s = scale if scale.dim() == 2 else scale.reshape(scale.shape[0], -1)
    return s.repeat_interleave(cols // s.shape[1], 1)


class _Tuned:
    """A matrix being tuned: `weight()` (differentiable, original basis) and `finalize()` -> Packed."""

    def __init__(self, packed, codec, rot):
        self.packed, self.codec, self.rot = packed, codec, rot
        self.inner, _ = split_basis(packed)

    def _out(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.rot is None else self.rot.unweight(w)

    def _wrap(self, inner):
        return inner if self.rot is None else self.rot.wrap(inner)

    def decode(self, packed) -> torch.Tensor:
        from quantatlas.quant.incoherence import decode

        return decode(self.codec, packed)


def check_scales_trainable(codec, cols: int) -> None:
    """The ValueError `train: scales` would raise on `codec`'s packs of a `cols`-column matrix (no fp16 scale, or
    a decode not linear in it), found on the codec's probe (one group)."""
    _Scales(codec.probe(cols), codec, None)


class _Scales(_Tuned):
    """Codes fixed; W = B ⊙ expand(S) in the codec's basis, S the pack's fp16 scale, trainable."""

    def __init__(self, packed, codec, rot):
        super().__init__(packed, codec, rot)
        data = self.inner.data
        if "scale" not in data or not data["scale"].is_floating_point():
            raise ValueError(f"recovery.train: scales needs a pack with a per-row/group fp16 `scale`; codec "
                             f"{packed.codec} stores {sorted(data)} (use train: weights)")
        rows, cols = packed.shape
        s16 = data["scale"]
        if s16.numel() % rows or cols % max(1, s16.numel() // rows):
            raise ValueError(f"recovery.train: scales: {packed.codec}'s scale {tuple(s16.shape)} is not per row/group")
        ones = type(self.inner)(self.inner.codec, self.inner.config, self.inner.shape,
                                {**data, "scale": torch.ones_like(s16)})
        self.base = codec.decode(ones).float()
        ref = codec.decode(self.inner).float()
        if not torch.allclose(self.base * _expand(s16.float(), cols), ref, rtol=1e-4, atol=1e-6 * ref.abs().max()):
            raise ValueError(f"recovery.train: scales: {packed.codec}'s decode is not linear in its `scale` "
                             f"(use train: weights)")
        self.s0 = s16.float().clone()
        self.mult = nn.Parameter(torch.ones_like(self.s0))  # trained from 1: lr is a relative step
        self.params = [self.mult]

    @property
    def scale(self) -> torch.Tensor:
        return self.s0 * self.mult

    def rotated(self) -> torch.Tensor:
        return self.base * _expand(self.scale, self.packed.shape[1])

    def weight(self) -> torch.Tensor:
        return self._out(self.rotated())

    @no_grad
    def finalize(self):
        data = {**self.inner.data, "scale": self.scale.detach().to(self.inner.data["scale"].dtype)
                .reshape(self.inner.data["scale"].shape)}
        return self._wrap(type(self.inner)(self.inner.codec, self.inner.config, self.inner.shape, data))


class _UniformCodes(_Scales):
    """The uniform codec's integer codes q (W = (q − z)·s), which pv_lite's discrete steps move by ±1."""

    def __init__(self, packed, codec, rot):
        if packed.codec != "uniform":
            raise ValueError(f"recovery.method: pv_lite moves integer codes of the uniform codec; got {packed.codec}")
        super().__init__(packed, codec, rot)
        from quantatlas.quant.codecs.base import unpack_bits

        rows, cols = packed.shape
        self.lo, self.hi = codec.levels()
        self.q = unpack_bits(self.inner.data["codes"], codec.bits, rows * cols).reshape(rows, cols).float() + self.lo
        self.zero = self.q - self.base  # base = q − z
        self.grad = torch.zeros_like(self.base)
        self.moved = torch.zeros_like(self.base, dtype=torch.bool)
        self._w = None
        self._undo = None

    def weight(self) -> torch.Tensor:
        w = self.rotated()
        if w.requires_grad:
            w.retain_grad()
            self._w = w
        return self._out(w)

    @no_grad
    def accumulate(self):
        if self._w is not None and self._w.grad is not None:
            self.grad += self._w.grad
        self._w = None

    @no_grad
    def discrete_step(self, fraction: float) -> int:
        """Move at most ⌊fraction·n⌋ codes by ±1 where −g·Δ is largest and positive; returns how many moved."""
        s = _expand(self.scale.detach(), self.q.shape[1])
        direction = -torch.sign(self.grad * s)
        gain = (self.grad * s).abs()
        target = self.q + direction
        ok = (direction != 0) & (target >= self.lo) & (target <= self.hi) & (gain > 0)
        k = min(int(math.floor(fraction * self.q.numel())), int(ok.sum()))
        self.grad.zero_()
        self._undo = None
        if k == 0:
            return 0
        idx = torch.topk(torch.where(ok, gain, torch.full_like(gain, -1.0)).reshape(-1), k).indices
        self._undo = (idx, self.q.view(-1)[idx].clone(), self.moved.view(-1)[idx].clone())
        self.q.view(-1)[idx] = target.view(-1)[idx]
        self.moved.view(-1)[idx] = True
        self.base = self.q - self.zero
        return k

    @no_grad
    def undo(self) -> None:
        """Take the last discrete step back."""
        if self._undo is not None:
            idx, q, moved = self._undo
            self.q.view(-1)[idx] = q
            self.moved.view(-1)[idx] = moved
            self.base = self.q - self.zero
            self._undo = None

    @no_grad
    def finalize(self):
        from quantatlas.quant.codecs.base import pack_bits

        packed = super().finalize()
        inner, _ = split_basis(packed)
        data = {**inner.data, "codes": pack_bits((self.q - self.lo).to(torch.int64), self.codec.bits)}
        return self._wrap(type(inner)(inner.codec, inner.config, inner.shape, data))


class _Latent(_Tuned):
    """All weights re-rounded: W = STE(fake_quantize(latent)) in the codec's basis, any codec."""

    def __init__(self, packed, codec, rot, w_fp: torch.Tensor):
        super().__init__(packed, codec, rot)
        w = w_fp.float()
        self.latent = nn.Parameter((w if rot is None else rot.weight(w)).clone())
        self.params = [self.latent]

    def weight(self) -> torch.Tensor:
        q = self.codec.fake_quantize(self.latent.detach())
        return self._out(self.latent + (q - self.latent).detach())

    @no_grad
    def finalize(self):
        return self._wrap(self.codec.encode(self.latent.detach()))


def _make(kind: str, packed, w_fp: torch.Tensor | None):
    from quantatlas.quant.qad import FrozenScaleLatent, bind_stored_tensor_scale

    inner, rot = split_basis(packed)
    codec = bind_stored_tensor_scale(codec_of_pack(packed), inner)   # an NVFP4 fused tensor scale stays shared
    if kind == "frozen":
        return FrozenScaleLatent(packed, codec, inner, rot, w_fp)
    if kind == "weights":
        return _Latent(packed, codec, rot, w_fp)
    if kind == "codes":
        return _UniformCodes(packed, codec, rot)
    return _Scales(packed, codec, rot)


# -- the step ------------------------------------------------------------------------------------

@no_grad
def mean_kl(model, teacher, windows, batch: int = 8) -> float:
    """Mean KL(P_fp ‖ P_q) over every position of `windows`, `batch` windows at a time."""
    total = 0.0
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        total += float(kl_to_teacher(model(x, use_cache=False).logits, teacher(x, use_cache=False).logits)) * x.shape[0]
    return total / windows.shape[0]


class Recovery:
    """Tune a quantized model in place against its fp teacher; returns the re-packed tensors."""

    def __init__(self, cfg: RecoveryConfig, seed: int):
        self.cfg, self.seed = cfg, int(seed)
        self.tuned: dict[str, _Tuned] = {}
        self.rejected = 0  # pv_lite's discrete steps taken back
        self.experts = self.fp_experts = None   # models.moe.FusedExpertWeights of the model and teacher (`run`)

    def _tunables(self, model, teacher, packed: dict, names=None) -> dict:
        cfg = self.cfg
        kind = "weights" if cfg.train == "weights" else ("codes" if cfg.method == "pv_lite" else "scales")
        if cfg.method == "qad":
            kind = "frozen"   # weights re-rounded on the pack's own scales (quant/qad.py)
        fp = dict(teacher.named_parameters())
        out = {}
        for pname in trainable_matrices(model, packed, self.experts):
            if names is not None and pname not in names:
                continue
            w_fp = None
            if kind in ("weights", "frozen"):   # the latent starts from the teacher's matrix
                w_fp = self.fp_experts.matrix(pname).float() if pname in self.experts else fp[pname].detach()
            out[pname] = _make(kind, packed[pname], w_fp)
        return out

    def _norms(self, model, packed: dict, layer: int | None = None) -> dict[str, torch.Tensor]:
        """The fp16-stored norm gains (not quantized) that `scales_norms` trains."""
        if self.cfg.train != "scales_norms":
            return {}
        from quantatlas.models.roles import find_roles

        params = dict(model.named_parameters())
        out = {}
        for t in find_roles(model):
            name = t.name + ".weight"
            if t.kind == "norm" and name not in packed and name in params and (layer is None or t.layer == layer):
                out[name] = nn.Parameter(params[name].detach().float().clone())
        return out

    def run(self, model, teacher, packed: dict, windows: torch.Tensor, progress=None) -> tuple[dict, dict]:
        """Tune `model` in place on `windows` [samples, seq_len]; returns (packed, info)."""
        import time

        from quantatlas.models.moe import FusedExpertWeights

        cfg = self.cfg
        if cfg.method == "roste":
            raise ValueError("recovery.method: roste trains with the arm's act and kv quantizers in the loop: "
                             "run it through quant.roste.recover_roste")
        if windows.shape[0] != cfg.samples:
            raise ValueError(f"recovery: {windows.shape[0]} windows, expected samples={cfg.samples}")
        for p in list(model.parameters()) + list(teacher.parameters()):
            p.requires_grad_(False)
        t0 = time.process_time()
        self.experts = FusedExpertWeights(model)   # fused 3-D expert tensors: trained per expert, assembled per step
        self.fp_experts = FusedExpertWeights(teacher) if self.experts.roles else None
        order = batch_order(cfg, self.seed)
        probe = windows[:32]  # the training loss before and after, on (up to) 32 of the training windows
        before = self.kl(model, teacher, probe)
        if cfg.method == "block_ap":
            new, extra = self._block_ap(model, teacher, packed, windows, order, progress)
        elif cfg.method == "pv_tuning":
            new, extra = self._pv_tuning(model, teacher, packed, windows, order, progress)
        else:
            new, extra = self._kd(model, teacher, packed, windows, order, progress)
        after = self.kl(model, teacher, probe)
        info = {"recovery_cpu_s": time.process_time() - t0, "recovery_train_kl_before": before,
                "recovery_train_kl_after": after, **extra}
        return {**packed, **new}, info

    def kl(self, model, teacher, windows, batch: int = 8) -> float:
        """Mean KL(P_fp ‖ P_q) over every position of `windows` (`mean_kl`)."""
        return mean_kl(model, teacher, windows, batch)

    def _apply(self, model, tuned: dict, norms: dict, new: dict) -> None:
        """Re-pack every tuned matrix and set the model's weights to decode(Packed); norms to fp16."""
        params = dict(model.named_parameters())
        self.tuned.update(tuned)  # kept for inspection (tests: the latent, the codes moved)
        with torch.no_grad():
            for name, t in tuned.items():
                new[name] = t.finalize()
                w = self.experts.matrix(name) if name in self.experts else params[name]   # an expert: a view
                w.copy_(t.decode(new[name]).to(w.dtype).reshape(w.shape))
            for name, v in norms.items():
                params[name].copy_(v.detach().half().to(params[name].dtype))

    def _kd(self, model, teacher, packed, windows, order, progress):
        from torch.func import functional_call

        cfg = self.cfg
        tuned = self._tunables(model, teacher, packed)
        norms = self._norms(model, packed)
        if not tuned and not norms:
            raise ValueError("recovery: the arm stores no weight matrix (Linear or expert) through a codec: nothing to tune")
        opt = torch.optim.Adam([p for t in tuned.values() for p in t.params] + list(norms.values()), lr=cfg.lr)
        moved = tokens = 0
        for step, i in enumerate(order):
            x = _chunk(windows, i, cfg.batch)
            tokens += x.numel()
            with torch.no_grad():
                target = teacher(x, use_cache=False).logits
            weights = {name: t.weight() for name, t in tuned.items()}
            logits = functional_call(model, self.experts.parameters({**weights, **norms}), (x,),
                                     {"use_cache": False}).logits
            loss = kl_to_teacher(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cfg.method == "pv_lite":
                for t in tuned.values():
                    t.accumulate()
                if (step + 1) % cfg.discrete_every == 0:
                    moved += self._discrete(model, tuned, norms, x, target)
            if progress:
                progress(1)
        new: dict = {}
        self._apply(model, tuned, norms, new)
        extra = {"recovery_tokens": tokens}   # through the model in training
        if cfg.method == "pv_lite":
            n = sum(t.q.numel() for t in tuned.values())
            extra.update(recovery_codes_moved=float(sum(int(t.moved.sum()) for t in tuned.values()) / max(n, 1)),
                         recovery_discrete_rejected=float(self.rejected))
        return new, extra

    @no_grad
    def _discrete(self, model, tuned: dict, norms: dict, x, target) -> int:
        """One discrete step on every matrix, kept only if it lowers the loss on this batch (a first-order
        move of many codes at once can overshoot; PV-tuning bounds it by a trust region)."""
        from torch.func import functional_call

        def loss():
            weights = {name: t.weight() for name, t in tuned.items()}
            logits = functional_call(model, self.experts.parameters({**weights, **norms}), (x,),
                                     {"use_cache": False}).logits
            return float(kl_to_teacher(logits, target))

        before = loss()
        moved = sum(t.discrete_step(self.cfg.fraction) for t in tuned.values())
        if moved and loss() > before:
            for t in tuned.values():
                t.undo()
            self.rejected += 1
            return 0
        return moved

    def _pv_tuning(self, model, teacher, packed, windows, order, progress):
        from quantatlas.quant.pv_tuning import pv_matrices, pv_tune

        matrices = pv_matrices(model, packed, self.cfg.beam, self.experts)
        norms = self._norms(model, packed)
        extra = pv_tune(model, teacher, matrices, norms, windows, order, self.cfg, progress, self.experts)
        new: dict = {}
        self._apply(model, matrices, norms, new)
        return new, extra

    def _block_ap(self, model, teacher, packed, windows, order, progress):
        from torch.func import functional_call

        from quantatlas.models.roles import decoder_layers
        from quantatlas.models.replay import advance, capture_layer_inputs

        cfg = self.cfg
        layers, fp_layers = decoder_layers(model), decoder_layers(teacher)
        q_in = capture_layer_inputs(model, layers[0], windows, cfg.batch)   # one entry per batch of windows
        fp_in = capture_layer_inputs(teacher, fp_layers[0], windows, cfg.batch)
        q_h = [h for h, _, _ in q_in]
        fp_h = [h for h, _, _ in fp_in]
        new: dict = {}
        tokens = trained = 0   # tokens through a decoder layer in training, summed over the layers
        prefix = {li: f"{name}." for name, m in model.named_modules() for li, layer in enumerate(layers) if m is layer}
        for li, (layer, fp_layer) in enumerate(zip(layers, fp_layers)):
            with torch.no_grad():
                target = advance(fp_layer, fp_h, fp_in)
            pre = prefix[li]
            names = {n for n in packed if n.startswith(pre)}
            tuned = self._tunables(model, teacher, packed, names)
            norms = self._norms(model, packed, li)
            trainable = [p for t in tuned.values() for p in t.params] + list(norms.values())
            if trainable:
                trained += 1
                opt = torch.optim.Adam(trainable, lr=cfg.lr)
                for i in order:
                    _, rest, kwargs = q_in[i]
                    tokens += q_h[i].shape[0] * q_h[i].shape[1]
                    weights = self.experts.parameters({n: t.weight() for n, t in tuned.items()})
                    local = {n[len(pre):]: w for n, w in weights.items()}
                    local.update({n[len(pre):]: v for n, v in norms.items()})
                    out = functional_call(layer, local, (q_h[i], *rest), kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = torch.nn.functional.mse_loss(out, target[i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if progress:
                        progress(1)
            self._apply(model, tuned, norms, new)
            with torch.no_grad():
                q_h = advance(layer, q_h, q_in)
            fp_h = target
        if not trained:
            raise ValueError("recovery: the arm stores no weight matrix (Linear or expert) through a codec: nothing to tune")
        return new, {"recovery_tokens": tokens}

    def total_steps(self, model) -> int:
        if self.cfg.method == "block_ap":
            from quantatlas.models.roles import decoder_layers

            return self.cfg.steps * len(decoder_layers(model))
        return self.cfg.steps


def recover(model, teacher, packed: dict, cfg: RecoveryConfig, seed: int, calib_stream: np.ndarray,
            eval_stream: np.ndarray, eval_used: int, progress=None) -> tuple[dict, dict]:
    """The recipe's recovery step: draw the seeded calibration windows, check they miss the eval
    tokens, tune `model` in place against `teacher`; returns (re-packed tensors, metrics)."""
    windows, starts = draw_windows(calib_stream, cfg.samples, cfg.seq_len, seed)
    check_disjoint(calib_stream, starts, cfg.seq_len, eval_stream, eval_used)
    dev = next(model.parameters()).device
    return Recovery(cfg, seed).run(model, teacher, packed, torch.from_numpy(windows).to(dev), progress)
