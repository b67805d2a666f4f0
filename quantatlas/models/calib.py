"""Calibration capture: statistics of the inputs that reach chosen modules.

For each module we accumulate, in fp32 and in chunks (so memory stays at one [in, in]
matrix per module), the Hessian proxy H = (2/N) sum_n x_n x_n^T of GPTQ, the mean |x| per
input channel (AWQ/SmoothQuant) and the mean x^2 per channel (llama.cpp's imatrix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    hessian: torch.Tensor   # [in, in] = (2/N) sum x x^T
    abs_mean: torch.Tensor | None  # [in] (None: an accumulator without channel sums)
    sq_mean: torch.Tensor | None   # [in]  (llama-imatrix's per-column mean of x^2)
    count: int              # N, the number of input vectors seen


class InputAccumulator:
    """Running sums for one module; `add` takes any [..., in] activation batch."""

    #: elements per chunk of the per-channel sums (bounds their temporaries on wide inputs)
    CHUNK = 1 << 22

    def __init__(self, width: int, device, hessian: bool = True, channel_sums: bool = True):
        """`channel_sums`: also the per-channel sums of |x| and x² (AWQ, imatrix); GPTQ reads only H, and
        the float64 sums cost about a quarter of a Hessian collection pass."""
        self.width, self.device, self.hessian = width, device, hessian
        self.xx = None   # [in, in], allocated at the first add (after the forward's own temporaries are freed)
        self.abs_sum = torch.zeros(width, device=device, dtype=torch.float64) if channel_sums else None
        self.sq_sum = torch.zeros(width, device=device, dtype=torch.float64) if channel_sums else None
        self.count = 0

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add the rows of `x` [..., in]. `weight` [rows], when given, weighs row n's terms by weight_n^2
        (H gets w_n^2 x_n x_n^T, the per-channel sums w_n^2 x^2 and |w_n x|): the rows of an MoE expert
        scaled as the forward pass scales its output (quantize.py's `moe.weighting: routing`); the count
        stays the number of rows."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if weight is not None:
            x = x * weight.detach().reshape(-1, 1).to(x)
        if self.hessian:
            if self.xx is None:
                self.xx = torch.zeros(self.width, self.width, device=self.device, dtype=torch.float32)
            self.xx.addmm_(x.T, x)
        rows = max(1, self.CHUNK // max(x.shape[1], 1))
        for a in range(0, x.shape[0] if self.sq_sum is not None else 0, rows):
            part = x[a:a + rows]
            self.abs_sum += part.abs().sum(0, dtype=torch.float64)
            self.sq_sum += (part * part).sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def result(self) -> InputStats:
        """The statistics. The Hessian is the running sum scaled in place (no second [in, in] matrix),
        so this is called once, after the last `add`."""
        n = max(self.count, 1)
        h = None
        if self.hessian:
            if self.xx is None and self.count:
                raise RuntimeError("InputAccumulator.result: called twice (the first call handed the Hessian over)")
            h = self.xx if self.xx is not None else torch.zeros(self.width, self.width, device=self.device)
            h = h.mul_(2.0 / n)
            self.xx = None
        if self.sq_sum is None:
            return InputStats(h, None, None, self.count)
        return InputStats(h, (self.abs_sum / n).float(), (self.sq_sum / n).float(), self.count)


def _input_width(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    w = getattr(module, "weight", None)
    if w is not None and type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return w.shape[0]
    if w is not None and w.dim() == 2:
        return w.shape[1]
    raise ValueError(f"cannot tell the input width of {type(module).__name__}")


def attach_accumulators(modules: dict[str, torch.nn.Module], hessian: bool = True):
    """Register forward pre-hooks; returns (accumulators, handles). Remove handles when done."""
    accs, handles = {}, []
    for name, m in modules.items():
        dev = next(m.parameters()).device
        acc = InputAccumulator(_input_width(m), dev, hessian)
        accs[name] = acc
        handles.append(m.register_forward_pre_hook(lambda mod, args, acc=acc: acc.add(args[0])))
    return accs, handles


@torch.no_grad()
def accumulate_inputs(model: torch.nn.Module, modules: dict[str, torch.nn.Module], tokens: torch.Tensor,
                      batch_size: int = 8, hessian: bool = True) -> dict[str, InputAccumulator]:
    """Run `tokens` [n, seq] through `model`; the running sums of each module's inputs."""
    accs, handles = attach_accumulators(modules, hessian)
    try:
        dev = next(model.parameters()).device
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i:i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
    return accs


def input_statistics(model: torch.nn.Module, modules: dict[str, torch.nn.Module], tokens: torch.Tensor,
                     batch_size: int = 8, hessian: bool = True) -> dict[str, InputStats]:
    """Run `tokens` [n, seq] through `model` and return the input statistics of each module."""
    return {k: a.result() for k, a in accumulate_inputs(model, modules, tokens, batch_size, hessian).items()}
