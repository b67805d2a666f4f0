"""Incoherence processing (QuIP, Chee et al. 2023; QuIP#, Tseng et al. 2024) for the weight solvers.

For a linear layer y = W x (W [rows, cols]) and two random-sign Hadamard rotations
U = H_rows·diag(s_out)/√rows and V = H_cols·diag(s_in)/√cols (quant/hadamard.py's
RandomizedHadamard, sizes m·2^k), the solver works on

    W' = U W Vᵀ,     H' = V H Vᵀ      (and GPTAQ's cross term C' = V C Vᵀ)

which is the same problem: x' = V x gives W' x' = U y, and
tr((Ŵ' - W') H' (Ŵ' - W')ᵀ) = tr((Ŵ - W) H (Ŵ - W)ᵀ) for Ŵ = Uᵀ Ŵ' V, both maps being orthogonal.
After the rotations W' and H' are incoherent (no entry or eigenvector coordinate much larger than
the RMS), so outlier columns/rows are spread over all of them and a per-row or per-group scale
fits. The solver returns Ŵ = Uᵀ Ŵ' V in the original basis and an `IncoherentPacked`: the codec's
Packed of Ŵ' (`inner`) and the seed the signs come from (`seed`, stored as 8 bytes and counted in
the bits). Its `decode()` undoes the rotations. Signs: s_in from `seed`, s_out from `seed + 1`
(mod 2^63); the seed of a run's i-th matrix is the run context's "tensor" derivation.

In a file (eval/bits.py's artifact, a streamed run's shards) the pack is stored under the codec's
name with `"incoherence": true` added to its config and the seed as the stored part
`incoherence_seed`, so `build("codec", {codec: config})` refuses it loudly instead of decoding it
in the rotated basis; `IncoherentPacked.from_parts` reads it back.
"""
from __future__ import annotations

from quantatlas._lazy import torch
from quantatlas.quant.codecs.base import Codec, Packed
from quantatlas.quant.hadamard import RandomizedHadamard, has_hadamard

SEED_KEY = "incoherence_seed"
#: the config key that marks an incoherence pack in a file
FLAG = "incoherence"


class IncoherentPacked(Packed):
    """A codec's pack of U W Vᵀ (`inner`) and the seed of U's and V's signs: decodes to W's basis."""

    def __init__(self, inner: Packed, seed: int):
        super().__init__(inner.codec, {**inner.config, FLAG: True}, inner.shape, inner.data)
        self.inner, self.seed = inner, int(seed)

    def parts(self) -> dict[str, torch.Tensor]:
        return {**self.inner.parts(), SEED_KEY: torch.tensor([self.seed], dtype=torch.int64)}

    @classmethod
    def from_parts(cls, codec, config, shape, parts) -> "IncoherentPacked":
        """The pack whose `parts()` and flagged config a file stores."""
        inner = Packed.from_parts(codec, {k: v for k, v in config.items() if k != FLAG}, shape,
                                  {k: v for k, v in parts.items() if k != SEED_KEY})
        return cls(inner, int(parts[SEED_KEY].reshape(-1)[0]))

    def decode(self) -> torch.Tensor:
        return decode(None, self)


def read_pack(codec: str, config: dict, shape, parts: dict[str, torch.Tensor]) -> Packed:
    """A pack as a file stores it (codec name, config, shape, `parts()`): an IncoherentPacked where
    the config carries the incoherence flag, a FrozenPacked where it carries freeze-dry's
    (quant/freeze_dry.py), else the codec's own Packed."""
    if config.get("freeze_dry") is not None:
        from quantatlas.quant.freeze_dry import FrozenPacked

        return FrozenPacked.from_parts(codec, config, shape, parts)
    return (IncoherentPacked if config.get(FLAG) else Packed).from_parts(codec, config, shape, parts)


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

    def wrap(self, packed: Packed) -> IncoherentPacked:
        """The codec's Packed of W' with the seed: what decodes to Ŵ."""
        return IncoherentPacked(packed, self.seed)


def decode(codec: Codec | None, packed: Packed) -> torch.Tensor:
    """Ŵ in the original basis: an IncoherentPacked's inner pack decoded by `codec` (None: the codec its
    config names) and rotated back; any other pack goes to the codec as it is."""
    if not isinstance(packed, IncoherentPacked):
        return packed.decode() if codec is None else codec.decode(packed)
    inner = packed.inner.decode() if codec is None else codec.decode(packed.inner)
    return Incoherence(*packed.shape, packed.seed).unweight(inner.double()).float()
