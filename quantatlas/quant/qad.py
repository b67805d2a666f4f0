"""QAD's trainable view of one packed matrix: weights re-rounded on the pack's own, frozen scales.

    recovery: {method: qad, steps: 100, lr: 1e-4, samples: 64, seq_len: 256, batch: 4}

Quantization-aware distillation (NVIDIA Model Optimizer's QAD; Kurtić et al., "Quantization-Aware
Distillation for NVFP4 Inference Accuracy Recovery", NVIDIA 2026): start from a PTQ checkpoint, keep its
quantizer configuration and scales, and train the weights of the fake-quantized student through the
straight-through estimator on KL(P_teacher ‖ P_student) over the vocabulary, the fp model as teacher.
The loop and loss are kd_ste's (quant/recovery.py); only what trains differs:

    kd_ste, train: weights   every step the codec re-fits its scales to the latent (`fake_quantize`), and
                             the final pack is `encode(latent)`: new scales, new codes
    qad                      the pack's stored scales stay as they are, bit for bit (uniform: the fp16
                             `scale` and `zero` per group; NVFP4: the E4M3 block scales and the fp32
                             tensor scale, a fused q/k/v or gate/up scale included); each step rounds the
                             latent on that fixed grid, and the final pack changes only its codes

Forward: W = q(latent) exactly (the STE term latent − latent.detach() is 0); backward: ∂W/∂latent = I
(saturated values included, as Model Optimizer's STE). The latent starts from the fp weights (in the
pack's basis under solver incoherence). At the end the model's weight is decode(pack), which equals
q(latent) bit for bit (tests/test_roste_qad.py).

Model Optimizer's own NVFP4 weight quantizer recomputes the E4M3 block scales from the weights in every
forward ("dynamic" blocks) and freezes only the calibrated global amax; that variant is kd_ste with
train: weights here (the fused tensor scale is kept there too: `bind_stored_tensor_scale`). `qad` freezes
every stored scale, which is what "quantizer scales frozen" says and what a int4 group-scale checkpoint
does. Codecs: uniform and nvfp4 (their decode is a fixed elementwise grid times the stored scales).
"""
from __future__ import annotations

from quantatlas._lazy import nn, no_grad, torch

#: codecs whose pack QAD can re-round on its own scales
QAD_CODECS = ("uniform", "nvfp4")


def bind_stored_tensor_scale(codec, packed):
    """`codec` bound to the amax that reproduces `packed`'s stored fp32 tensor scale bit for bit (NVFP4
    `tensor_scale: fused`: the scale q/k/v or gate/up of a layer share, quant/fused.py), so that re-encoding
    a tuned matrix keeps the shared scale instead of taking the matrix's own amax; other codecs: unchanged."""
    if not getattr(codec, "shares_tensor_scale", False) or "tensor_scale" not in packed.data:
        return codec
    t = packed.data["tensor_scale"].float().reshape(-1)[0]

    def scale_of(a):
        return codec.with_amax(a).tensor_scales(1, t.device)[0]

    if bool(scale_of(torch.zeros(())) == t):   # an all-zero group stores t = 1
        return codec.with_amax(0.0)
    a = t / scale_of(torch.ones(()))            # t is linear in the amax up to fp32 rounding: walk the last ulps
    for _ in range(16):
        s = scale_of(a)
        if bool(s == t):
            return codec.with_amax(a)
        a = torch.nextafter(a, torch.tensor(float("inf") if s < t else float("-inf")))
    raise ValueError(f"recovery: no amax reproduces the stored tensor scale {float(t)!r} of a {packed.codec} pack")


class FrozenGrid:
    """Round a [rows, cols] matrix on a pack's stored grid: `values(w)` and `codes(w)` of the codec's format."""

    def __init__(self, codec, packed):
        if packed.codec not in QAD_CODECS:
            raise ValueError(f"recovery.method: qad re-rounds weights on the pack's own scales, which it does "
                             f"for codecs {', '.join(QAD_CODECS)}; got {packed.codec} (use kd_ste with train: weights)")
        self.codec, self.packed = codec, packed
        rows, cols = packed.shape
        self.g = codec.group_of(cols)
        data = packed.data
        if packed.codec == "uniform":
            from quantatlas.quant.codecs.uniform import UniformParams

            zero = data["zero"].float().reshape(-1) if "zero" in data else None
            self.params = UniformParams(data["scale"].float().reshape(-1), zero)   # one per (row, group)
        else:
            from quantatlas.quant.codecs.minifloat import E4M3
            from quantatlas.quant.codecs.nvfp4 import NVFP4Params

            t = data["tensor_scale"].float().reshape(-1, 1)                    # [1, 1] or [rows, 1]
            s = E4M3.decode(data["scales"]).float()                            # [rows, cols / block]
            t = t.expand_as(s)
            # t · s and (1 / t) / s, in the order the codec's quantizer and decode compute them
            self.params = NVFP4Params(s.reshape(-1), (t * s).reshape(-1), ((1.0 / t) / s).reshape(-1))

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().reshape(-1, self.g)     # one row per (row, group), row-major as the pack stores them

    def quantized(self, w: torch.Tensor):
        """(values [rows, cols], codes [rows, cols]) of w on the frozen grid."""
        q = self.codec.quantize(self._blocks(w), self.params, 0)
        return q.values.reshape(w.shape), q.codes.reshape(w.shape)

    def pack(self, w: torch.Tensor):
        """The pack of w: the stored scales as they were, new codes."""
        from quantatlas.quant.codecs.base import pack_bits

        _, codes = self.quantized(w.detach())
        bits = self.codec.bits if self.packed.codec == "uniform" else 4
        data = {**self.packed.data, "codes": pack_bits(codes.to(torch.int64), bits)}
        return type(self.packed)(self.packed.codec, self.packed.config, self.packed.shape, data)


class FrozenScaleLatent:
    """A matrix under QAD: W = STE(q_frozen(latent)) in the pack's basis; `finalize()` -> the re-coded pack.

    The same interface as recovery.py's trainable views (`params`, `weight()`, `finalize()`, `decode()`)."""

    def __init__(self, packed, codec, inner, rot, w_fp: torch.Tensor):
        self.packed, self.codec, self.inner, self.rot = packed, codec, inner, rot
        self.grid = FrozenGrid(codec, inner)
        w = w_fp.float()
        self.latent = nn.Parameter((w if rot is None else rot.weight(w)).clone())
        self.params = [self.latent]

    def weight(self) -> torch.Tensor:
        values, _ = self.grid.quantized(self.latent.detach())
        w = values + (self.latent - self.latent.detach())     # = values in the forward, identity gradient
        return w if self.rot is None else self.rot.unweight(w)

    @no_grad
    def finalize(self):
        inner = self.grid.pack(self.latent)
        return inner if self.rot is None else self.rot.wrap(inner)

    def decode(self, packed) -> torch.Tensor:
        from quantatlas.quant.incoherence import decode

        return decode(self.codec, packed)
