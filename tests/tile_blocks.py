"""Helpers shared by the tests of the 2-D tile codecs (tests/test_trellis.py, tests/test_tcq.py): a matrix
quantized as GPTQ hands it to a codec, and one tile's sequence built by hand."""
from __future__ import annotations

import torch


def quantize_block_by_block(codec, w: torch.Tensor):
    """(group size, params per group, codes, values) of `w`: each group fitted once, then quantized block_width
    columns at a time with `col` the block's offset in its group, as GPTQ does; codes and values concatenated."""
    cols = w.shape[1]
    g = codec.group_of(cols)
    params = [codec.fit(w[:, c:c + g]) for c in range(0, cols, g)]
    bw = codec.block_width
    qs = [codec.quantize(w[:, c:c + bw], params[c // g], c % g) for c in range(0, cols, bw)]
    return g, params, torch.cat([q.codes for q in qs], 1), torch.cat([q.values for q in qs], 1)


def hand_tile(w: torch.Tensor, scale: torch.Tensor, r0: int, c0: int, tile_rows: int, width: int) -> torch.Tensor:
    """One tile's sequence [T] built weight by weight: rows r0 .., columns c0 .., row-major, each weight divided by
    its row's σ as the codecs do (w · (1/σ): the float32 product, exact in float64, rounded to float32)."""
    seq = [float(w[r, c]) * float(torch.tensor(1.0) / scale[r]) for r in range(r0, r0 + tile_rows)
           for c in range(c0, c0 + width)]
    return torch.tensor(seq, dtype=torch.float64).float()
