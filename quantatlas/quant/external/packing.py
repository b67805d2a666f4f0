"""Integer codes packed into int32 words, as GPTQ and AWQ checkpoints store them.

Both pack b-bit unsigned values into consecutive 32-bit words as one little-endian bit stream:
value i occupies bits [i·b, (i+1)·b) of the stream, word w holding stream bits [32w, 32w + 32).
For b = 2, 4, 8 that is 32/b values per word, value j of a word at bit j·b; for b = 3 (GPTQ) a
value may straddle two words (AutoGPTQ's pack loop writes exactly this stream: ten values, then
the low bits of the eleventh in the word's top two bits and its high bit at bit 0 of the next).
GPTQ packs qweight along the input dimension (rows of [in, out]) and qzeros along the output
dimension (columns); AWQ packs both along the output dimension and permutes the values inside
each word (`AWQ_ORDER`).
"""
from __future__ import annotations

import torch

#: AutoAWQ's GEMM order: nibble i of a word holds column 8c + AWQ_ORDER[i] of the word's eight columns
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_stream(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """The `count` b-bit values packed along `dim` of the int32 tensor `words` (int64, unsigned)."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed codes are int32, got {words.dtype}")
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF          # [n_words, ...] as unsigned
    if count * bits > 32 * w.shape[0]:
        raise ValueError(f"{w.shape[0]} words hold {32 * w.shape[0] // bits} values of {bits} bits, not {count}")
    start = torch.arange(count, device=w.device) * bits
    word, offset = start // 32, start % 32
    shape = (count,) + (1,) * (w.dim() - 1)
    low = w[word] >> offset.view(shape)
    # the bits past the word's end come from the next word (3-bit codes); elsewhere that term is 0
    spill = (offset + bits > 32).view(shape)
    nxt = w[torch.clamp(word + 1, max=w.shape[0] - 1)] << (32 - offset).view(shape)
    values = torch.where(spill, low | nxt, low) & ((1 << bits) - 1)
    return values.movedim(0, dim)


def awq_columns(stream: torch.Tensor) -> torch.Tensor:
    """Columns in their order from values in AWQ's packed order (along the last dim, eight per word)."""
    n = stream.shape[-1]
    reverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)], device=stream.device)
    cols = (torch.arange(n, device=stream.device) // 8) * 8 + reverse.repeat(n // 8)
    return stream[..., cols]
