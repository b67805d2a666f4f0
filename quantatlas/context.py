"""The run context: the seed, device and threads of one arm x seed run, and the only source of
its randomness.

Every random choice a run makes (calibration windows, rotation signs, k-means starts, recovery's
mini-batches) is drawn from `ctx.rng(tag)`, `ctx.torch_generator(tag)` or `ctx.sub_seed(tag)`,
so one seed names one computation and nothing reads a global random state. The tags that existed
before the context keep their historical derivations (`LEGACY`), so stored results stay exact;
any other tag derives its seed from the run seed and the tag's CRC-32 through a SeedSequence.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np


def _sha256_seed(seed: int, *parts) -> int:
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


#: tag -> (run seed, parts) -> the int or SeedSequence entropy used before the context existed
LEGACY = {
    "calibration": lambda s: s,                                           # numpy default_rng(seed)
    "recovery.windows": lambda s: [s, 0x5EC0],
    "recovery.batches": lambda s: [s, 0x0DE5],
    # the index-th matrix a solver handles (incoherence signs)
    "tensor": lambda s, index: int(np.random.SeedSequence([s, int(index), 0x1C0])
                                   .generate_state(1, np.uint64)[0]) % 2 ** 62,
    # a rotation named by its place (transforms, activation rotations): sha256 of "seed/tag/..."
    "named": _sha256_seed,
    # a config's own seed option shifted by the run seed (turbo signs, k-means starts, KV rotations)
    "offset": lambda s, base: (int(base) + s) % 2 ** 63,
}


@dataclass(frozen=True)
class RunContext:
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def entropy(self, tag: str, *parts):
        """What seeds the generator of `tag` (an int, or a list for a SeedSequence)."""
        if tag in LEGACY:
            return LEGACY[tag](int(self.seed), *parts)
        return [int(self.seed), zlib.crc32(tag.encode()), *(int(p) for p in parts)]

    def sub_seed(self, tag: str, *parts) -> int:
        """An integer seed for `tag` (below 2**63)."""
        e = self.entropy(tag, *parts)
        if isinstance(e, int):
            return e
        return int(np.random.SeedSequence(e).generate_state(1, np.uint64)[0]) % 2 ** 63

    def rng(self, tag: str, *parts) -> np.random.Generator:
        return np.random.default_rng(self.entropy(tag, *parts))

    def torch_generator(self, tag: str, *parts, device=None):
        import torch

        return torch.Generator(device=device or "cpu").manual_seed(self.sub_seed(tag, *parts))
