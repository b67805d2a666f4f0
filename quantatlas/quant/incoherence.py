"""Incoherence processing (QuIP, Chee et al. 2023; QuIP#, Tseng et al. 2024) for the weight solvers.

For a linear layer y = W x (W [rows, cols]) and two random-sign Hadamard rotations
U = H_rows·diag(s_out)/√rows and V = H_cols·diag(s_in)/√cols (quant/hadamard.py's
RandomizedHadamard, sizes m·2^k), the solver works on

    W' = U W Vᵀ,     H' = V H Vᵀ      (and GPTAQ's cross term C' = V C Vᵀ)

which is the same problem: x' = V x gives W' x' = U y, and
tr((Ŵ' - W') H' (Ŵ' - W')ᵀ) = tr((Ŵ - W) H (Ŵ - W)ᵀ) for Ŵ = Uᵀ Ŵ' V, both maps being orthogonal.
After the rotations W' and H' are incoherent (no entry or eigenvector coordinate much larger than
the RMS), so outlier columns/rows are spread over all of them and a per-row or per-group scale
fits. The solver returns Ŵ = Uᵀ Ŵ' V in the original basis; the Packed holds the codec's codes
of Ŵ' plus the 8-byte seed the signs come from (counted in its bits), and `decode` undoes the
rotations. Signs: s_in from `seed`, s_out from `seed + 1` (mod 2^63). The Packed keeps the codec's
name and adds `"incoherence": true` to its config, so `build("codec", {codec: config})` refuses it
loudly instead of decoding it in the rotated basis: decode it with `decode(codec, packed)` below.
"""
from __future__ import annotations

import numpy as np

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed
from quantatlas.quant.hadamard import RandomizedHadamard, has_hadamard

SEED_KEY = "incoherence_seed"


def tensor_seed(run_seed: int, index: int) -> int:
    """The seed of the `index`-th matrix a solver handles in a run with experiment seed `run_seed`."""
    return int(np.random.SeedSequence([int(run_seed), int(index), 0x1C0]).generate_state(1, np.uint64)[0]) % 2 ** 62


class Incoherence:
    def __init__(self, rows: int, cols: int, seed: int):
        for what, n in (("rows", rows), ("columns", cols)):
            if not has_hadamard(n):
                raise ValueError(f"incoherence: no Hadamard matrix of order {n} ({what} of the weight); "
                                 f"sizes must be m·2^k with a known base order m")
        self.seed = int(seed)
        self.inp = RandomizedHadamard(cols, self.seed)                  # V
        self.out = RandomizedHadamard(rows, (self.seed + 1) % 2 ** 63)  # U

    def weight(self, W: torch.Tensor) -> torch.Tensor:
        """U W Vᵀ."""
        return self.out.rotate(self.inp.rotate(W).T).T.contiguous()

    def unweight(self, W: torch.Tensor) -> torch.Tensor:
        """Uᵀ W V (the inverse of `weight`)."""
        return self.out.unrotate(self.inp.unrotate(W).T).T.contiguous()

    def hessian(self, H: torch.Tensor) -> torch.Tensor:
        """V H Vᵀ (input side; also for a non-symmetric cross term)."""
        return self.inp.rotate(self.inp.rotate(H).T).T.contiguous()

    def wrap(self, packed: Packed) -> Packed:
        """The codec's Packed of W' plus the seed: what `decode` needs to give Ŵ."""
        return Packed(packed.codec, {**packed.config, "incoherence": True}, packed.shape,
                      {**packed.data, SEED_KEY: torch.tensor([self.seed], dtype=torch.int64)})


def decode(codec: Codec, packed: Packed) -> torch.Tensor:
    """Ŵ in the original basis from a Packed that `Incoherence.wrap` made (any other goes to the codec)."""
    if SEED_KEY not in packed.data:
        return codec.decode(packed)
    data = {k: v for k, v in packed.data.items() if k != SEED_KEY}
    config = {k: v for k, v in packed.config.items() if k != "incoherence"}
    inner = Packed(packed.codec, config, packed.shape, data)
    inc = Incoherence(*packed.shape, int(packed.data[SEED_KEY][0]))
    return inc.unweight(codec.decode(inner).double()).float()
