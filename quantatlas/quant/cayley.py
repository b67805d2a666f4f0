"""Cayley SGD on the Stiefel manifold (Li, Li & Todorovic, ICLR 2020, Algorithm 1), as SpinQuant
trains its rotations with it.

A parameter X [n, p] has orthonormal columns (XᵀX = I; a rotation is the square case). With G the
Euclidean gradient of the loss at X and β the momentum, one step is

    M  ← β M − G                                     momentum, a descent direction
    Ŵ  = M Xᵀ − ½ X (Xᵀ M Xᵀ)
    W  = Ŵ − Ŵᵀ                                      skew-symmetric: W X is M projected on the tangent space
    M  ← W X                                         the momentum kept in the tangent space
    α  = min(lr, 2q / (‖W‖₁ + ε))                    q = ½: ‖α/2 · W‖₂ ≤ ½, a bound on the step's angle
    X  ← (I − α/2 · W)⁻¹ (I + α/2 · W) X             the Cayley transform of α W, applied to X

(I − A)⁻¹(I + A) is orthogonal for every skew-symmetric A, so X stays on the manifold to rounding.
The paper approximates the inverse by two fixed-point iterations Y ← X + α/2 · W (X + Y); here it
is one linear solve in float64 (n is a hidden size or a head width), so the columns stay
orthonormal to ~1e-14 however many steps are taken. ‖·‖₁ is the largest column sum, an upper
bound of the spectral norm of a skew-symmetric matrix. For a square X and no momentum the step
direction is W X = −½ (G − X Gᵀ X): the negative Riemannian gradient under the canonical metric,
so a small enough step lowers the loss.
"""
from __future__ import annotations

import torch

#: q of the step bound α ≤ 2q / ‖W‖ (the paper's default)
STEP_BOUND_Q = 0.5
EPS = 1e-8


def cayley_transform(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """(I − α/2 · W)⁻¹ (I + α/2 · W) X for a skew-symmetric W [n, n] and X [n, p], in float64."""
    x, w = x.double(), w.double()
    eye = torch.eye(w.shape[0], dtype=torch.float64, device=w.device)
    half = 0.5 * alpha * w
    return torch.linalg.solve(eye - half, x + half @ x)


def skew_direction(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W = Ŵ − Ŵᵀ with Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ): the skew-symmetric generator of the step along M."""
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    return w_hat - w_hat.T


def orthogonality_error(x: torch.Tensor) -> float:
    """max |XᵀX − I|: how far X is from having orthonormal columns."""
    x = x.detach().double()
    return float((x.T @ x - torch.eye(x.shape[1], dtype=torch.float64, device=x.device)).abs().max())


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum on the Stiefel manifold; every parameter is a float64 matrix with
    orthonormal columns (module docstring). `lr` is the largest step; a scheduler may change it."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] < p.shape[1] or p.dtype != torch.float64:
                    raise ValueError(f"CayleySGD takes float64 matrices [n, p] with n ≥ p, got {p.dtype} "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m = state.get("momentum")
                m = -p.grad if m is None else beta * m - p.grad
                w = skew_direction(p, m)
                state["momentum"] = w @ p
                alpha = min(lr, 2 * STEP_BOUND_Q / (float(w.abs().sum(0).max()) + EPS))
                p.copy_(cayley_transform(p, w, alpha))
        return loss
