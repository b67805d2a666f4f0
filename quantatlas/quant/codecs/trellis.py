"""QTIP's bitshift trellis codec (Tseng et al. 2024, "QTIP: Quantization with Trellises and
Incoherence Processing"; the same trellis is exllamav3's EXL3 format).

The trellis. A tile of T weights (`tile_rows` rows × T/tile_rows columns, read row-major: Tiles,
below) is read as n = T/V steps of V weights. A path through the trellis is a cyclic bit string b
of n·K·V bits (K bits per weight); step i is in state

    s_i = b[i·KV .. i·KV + L)  (L bits, most significant first, indices mod n·KV),

so s_{i+1} = ((s_i << KV) mod 2^L) | (KV new bits): each step shifts K·V new bits in. The
reconstruction of step i is a fixed function of the state, c(s_i) ∈ R^V, times the scale σ of
the row (or group). Storage is exactly the string b: K bits per weight, plus the fp16 scales.
Because the string is cyclic ("tail-biting"), the last state's low L-KV bits equal the first
state's high L-KV bits, and nothing else is stored.

Codes c(s) (QTIP's `bitshift.py` definitions, re-derived here):
  * `1mad` (V = 1): x = (34038481·s + 76625530) mod 2³²; c = (sum of x's four bytes − 510) / 147.800537109375
    (the sum of four uniform bytes is close to Gaussian; 147.8 ≈ its standard deviation).
  * `3inst` (V = 1): x = (89226354·s + 64248484) mod 2³²; y = (x AND 0x8FFF8FFF) XOR 0x3B603B60;
    c = fp16(high 16 bits of y) + fp16(low 16 bits), the sum rounded to fp16.
  * `hyb` (V = 2): a table of 2^Q two-dimensional points (k-means centroids of a 2-D Gaussian,
    rescaled to per-coordinate RMS √(15/16) = 0.968245836…), indexed by bits Q..1 above bit
    16−Q−1 of h = s(s+1): c = table[(h >> (16−Q−1)) mod 2^Q], first coordinate negated when bit 15
    of h is set. Q = 9 in QTIP. The centroids are a fixed function of Q (seeded k-means, below).
  * `gaussian` (V = 1 or 2): a plain table of 2^L i.i.d. N(0, 1) vectors drawn from `table_seed`.
No table is stored: every code is a function of the config (as a codebook is for lloyd_max).

The search. Viterbi over the 2^L states, vectorised over many tiles at once in torch (CPU or
CUDA): the predecessors of s are {(s >> KV) | h << (L−KV)}, shared by the 2^KV states with the same
s >> KV, so one step is "min over h of cost viewed as [2^KV, 2^(L−KV), tiles]" plus the new errors
viewed as [2^(L−KV), 2^KV, tiles]: reshapes, no gathers. Only those minima are kept (no back
pointers); the traceback recomputes the 2^KV candidate costs of each step on the path.
Tail-biting as QTIP does it: a first, unconstrained Viterbi on the tile rotated by n/2 steps gives
the state at the original step 0 and so its high L−KV bits o; a second Viterbi on the tile itself
is constrained to start in a state whose high bits are o and to end in one whose low bits are o.
(This is QTIP's heuristic, not the best tail-biting path; tests compare both with brute force.)
The cost of a step is ‖σ⁻¹w − c(s)‖² (the constant ‖σ⁻¹w‖² dropped), in float32.

Work grows as T·2^L per tile: L = 12 quantizes the 4.8 M-parameter reference model on CPU in a
few minutes; L = 16 (QTIP's and EXL3's setting) is 16× slower and meant for a GPU.

Scales. One fp16 σ per row and `group` columns (null: per row; otherwise a multiple of the tile
width T/tile_rows): σ = RMS(w) / RMS(c) · `scale_factor` (QTIP's Wscale, with its scale_override),
so that σ⁻¹w has the codebook's RMS. Bits per weight: K + 16·groups/cols.

Tiles. A tile is `tile_rows` = r consecutive rows × w = T/r consecutive columns of the matrix, one
trellis sequence of T weights in row-major order (row 0's w weights, then row 1's, ...; with V = 2 a
step is two neighbours in a row, so w is a multiple of V). r = 1 (the default) is a 1×T tile: T
consecutive columns of one row. QTIP's own setting is r = 16, T = 256: 16×16 tiles (td_x × td_y in
its lib/algo/ldlq.py, which quantizes WXWXᵀ.reshape(−1, td_x·td_y), rows-by-16 of a 16-column
block; its `_PERMUTE` of the 256 weights is only the storage order its CUDA kernel reads, not
done here: our sequence is the plain row-major one). The codec's block_width is w: GPTQ/LDLQ
quantizes w columns at a time and feeds each block's error forward to the columns after it, so a
1×256 tile gets no error feedback inside its 256 columns (on a 256-column matrix GPTQ is plain
rounding) while a 16×16 tile gets it every 16 columns. For plain rounding of an i.i.d. source the
tile shape changes nothing (the same trellis over T weights); inside LDLQ it does.
The rows of a matrix must be a multiple of r (refused otherwise, when the codec is bound to the
matrix: `for_matrix`, the first thing `encode` and GPTQ do; no padding, which would cost bits).
Scales stay per row: a tile's r rows each have their own σ.

Codes as `quantize` returns them: the states s_i, one per V weights, laid out like the weights
([rows, cols/V] int32: the state of the step each weight position is in), exactly the path the
Viterbi found. `pack` cuts them into tiles (tiles ordered by row block, then column block), checks
that each is a tail-biting path and stores each tile's bit string in turn: K bits per weight.
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from quantatlas._lazy import no_grad, torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import ADDED_LATER, CodecConfig

FP16_MAX = 65504.0
#: QTIP's HYB table RMS per coordinate (tlut / std · 0.9682458365518543 = √(15/16))
HYB_RMS = 0.9682458365518543
#: k-means of the HYB table: samples, iterations, seed
HYB_SAMPLES, HYB_ITERS, HYB_SEED = 1 << 17, 40, 0
#: bytes of best path costs (float32) one Viterbi batch may hold, and the most `workspace` keeps on CPU
VITERBI_BYTES = 1 << 28


class TrellisConfig(CodecConfig):
    name = "trellis"
    bits: int = Field(ge=1, le=8)                   # K: bits per weight
    L: int = Field(16, ge=2, le=16)                  # state bits
    V: int = Field(1, ge=1, le=2)                    # weights per step
    T: int = Field(256, ge=2)                        # weights per tile (one trellis sequence)
    code: Literal["1mad", "3inst", "hyb", "gaussian"] = "1mad"
    Q: int = Field(9, ge=1, le=15)                   # HYB table bits
    table_seed: int = Field(0, ge=0, lt=2 ** 63)     # the `gaussian` table's seed
    group: int | None = Field(None, gt=0)            # columns per fp16 scale; null: one per row
    scale_factor: float = Field(1.0, gt=0, allow_inf_nan=False)
    #: rows per tile: a tile is tile_rows × T/tile_rows columns (QTIP: 16 × 16); 1: T columns of one row
    tile_rows: int = Field(1, ge=1, json_schema_extra={ADDED_LATER: True})

    @property
    def tile_width(self) -> int:
        """Columns per tile, T / tile_rows: the codec's block_width."""
        return self.T // self.tile_rows

    @model_validator(mode="after")
    def _consistent(self):
        kv = self.bits * self.V
        if self.code in ("1mad", "3inst") and self.V != 1:
            raise ValueError(f"code {self.code} has V = 1 (one weight per state), got V = {self.V}")
        if self.code == "hyb" and self.V != 2:
            raise ValueError(f"code hyb has V = 2 (two weights per state), got V = {self.V}")
        if kv >= self.L:
            raise ValueError(f"bits·V = {kv} must be below L = {self.L} (the state must remember something)")
        if self.T % self.V:
            raise ValueError(f"T = {self.T} must be a multiple of V = {self.V}")
        if self.T % self.tile_rows or self.tile_width % self.V:
            raise ValueError(f"tile_rows = {self.tile_rows} must divide T = {self.T} into rows of a multiple of "
                             f"V = {self.V} columns")
        if self.T * self.bits < self.L or self.T // self.V < 2:
            raise ValueError(f"T = {self.T} is too short: a tile must store at least L = {self.L} bits "
                             f"(T·bits = {self.T * self.bits}) over at least two steps")
        if self.group is not None and self.group % self.tile_width:
            raise ValueError(f"group = {self.group} must be a multiple of the {tile_span(self.T, self.tile_rows)}")
        return self

    def build(self):
        return Trellis(self)


# ---- codes: c(s) for every state ----------------------------------------------------------------
def _lcg(states: np.ndarray, a: int, b: int) -> np.ndarray:
    return (states.astype(np.uint64) * np.uint64(a) + np.uint64(b)) & np.uint64(0xFFFFFFFF)


def code_1mad(states: np.ndarray) -> np.ndarray:
    x = _lcg(states, 34038481, 76625530)
    total = sum((x >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)).astype(np.int64)
    return ((total - 510).astype(np.float32) / np.float32(147.800537109375))[None, :]


def code_3inst(states: np.ndarray) -> np.ndarray:
    y = (_lcg(states, 89226354, 64248484) & np.uint64(0x8FFF8FFF)) ^ np.uint64(0x3B603B60)
    hi = (y >> np.uint64(16)).astype(np.uint16).view(np.float16)
    lo = (y & np.uint64(0xFFFF)).astype(np.uint16).view(np.float16)
    return (hi + lo).astype(np.float32)[None, :]          # the sum in fp16, as the decoder adds it


def code_hyb(states: np.ndarray, Q: int) -> np.ndarray:
    h = states.astype(np.int64) * (states.astype(np.int64) + 1)
    idx = (h >> (16 - Q - 1)) & ((1 << Q) - 1)
    sign = 1.0 - 2.0 * ((h >> 15) & 1)
    out = hyb_table(Q)[idx].T.copy()                     # [2, states]
    out[0] *= sign
    return out.astype(np.float32)


@lru_cache(maxsize=None)
def hyb_table(Q: int) -> np.ndarray:
    """2^Q centroids of a 2-D standard Gaussian (Lloyd's k-means from a seeded start), scaled to
    per-coordinate RMS HYB_RMS and rounded to fp16. Cached under $QUANTATLAS_CACHE/trellis."""
    root = Path(os.environ.get("QUANTATLAS_CACHE", Path.home() / ".cache" / "quantatlas")) / "trellis"
    path = root / f"hyb_Q{Q}_n{HYB_SAMPLES}_it{HYB_ITERS}_s{HYB_SEED}.npy"
    if path.exists():
        table = np.load(path)
        if table.shape == (1 << Q, 2):
            return table
    table = _kmeans_gaussian(Q)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, path)
    except OSError:
        pass
    return table


@no_grad
def _kmeans_gaussian(Q: int) -> np.ndarray:
    g = torch.Generator().manual_seed(HYB_SEED)
    data = torch.randn(HYB_SAMPLES, 2, generator=g, dtype=torch.float64)
    centers = torch.randn(1 << Q, 2, generator=g, dtype=torch.float64)
    data32, chunk = data.float(), 1 << 14
    for _ in range(HYB_ITERS):
        c32 = centers.float()
        c2 = c32.pow(2).sum(1)
        assign = torch.cat([torch.addmm(c2, data32[i:i + chunk], c32.T, alpha=-2.0).argmin(1)
                            for i in range(0, len(data), chunk)])
        sums = torch.zeros_like(centers).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=len(centers)).to(data.dtype)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
    centers = centers / centers.pow(2).mean().sqrt() * HYB_RMS
    return centers.numpy().astype(np.float16).astype(np.float32)


@lru_cache(maxsize=32)
def codebook_values(code: str, L: int, V: int, Q: int = 9, table_seed: int = 0) -> np.ndarray:
    """c(s) for s = 0 .. 2^L − 1 as float32 [V, 2^L]."""
    states = np.arange(1 << L, dtype=np.int64)
    if code == "1mad":
        return code_1mad(states)
    if code == "3inst":
        return code_3inst(states)
    if code == "hyb":
        return code_hyb(states, Q)
    if code == "gaussian":
        g = torch.Generator().manual_seed(table_seed)
        return torch.randn(1 << L, V, generator=g).T.contiguous().numpy()
    raise ValueError(f"unknown trellis code {code!r}")


# ---- the search -------------------------------------------------------------------------------
#: tiles whose path costs the forward pass updates together on CPU: [2^L, 64] float32 fits a core's
#: cache at L = 12, and 64 tiles fill the vector lanes along the innermost dim
CHUNK_TILES = 64
#: the CPU buffer `workspace` keeps between calls, and the lock of whoever is using it
_kept: torch.Tensor | None = None
_kept_lock = threading.Lock()


@contextmanager
def workspace(numel: int, device):
    """A float32 buffer of at least `numel` elements for `viterbi`. On CPU one buffer of at most
    VITERBI_BYTES is kept between calls: GPTQ quantizes a matrix 256 columns at a time, and fresh
    memory costs a page fault per 4 KiB on its first write. `release_workspace()` frees it. CUDA's
    caching allocator reuses memory by itself; a second user at the same time gets its own."""
    global _kept
    device = torch.device(device)
    if device.type != "cpu" or 4 * numel > VITERBI_BYTES or not _kept_lock.acquire(blocking=False):
        yield torch.empty(numel, dtype=torch.float32, device=device)
        return
    try:
        if _kept is None or _kept.numel() < numel:
            _kept = None                                          # free the smaller one first
            _kept = torch.empty(numel, dtype=torch.float32)
        yield _kept[:numel]
    finally:
        _kept_lock.release()


def release_workspace() -> None:
    """Free the CPU buffer that `workspace` keeps (made again when next needed)."""
    global _kept
    with _kept_lock:
        _kept = None


def chunking(B: int, device) -> tuple[int, int]:
    """(chunks, tiles per chunk) of the forward pass for B tiles: about CHUNK_TILES on CPU, one chunk on
    a GPU (where bigger kernels are better)."""
    chunks = 1 if torch.device(device).type != "cpu" else max(1, -(-B // CHUNK_TILES))
    return chunks, -(-B // chunks)


@no_grad
def viterbi(x: torch.Tensor, lut: torch.Tensor, kv: int, start: torch.Tensor | None = None,
            end: torch.Tensor | None = None) -> torch.Tensor:
    """Minimum-cost state sequences for x [B, n, V] over the bitshift trellis with codebook lut [V, 2^L].

    cost = Σ_i ‖x_i − lut[:, s_i]‖², s_{i+1} = ((s_i << kv) mod 2^L) | d. With `start` [B], s_0 must
    have high L−kv bits start[b]; with `end` [B], s_{n−1} must have low L−kv bits end[b].
    Returns the states [B, n] (int64).

    Path costs, with R = 2^(L−kv) and D = 2^kv: C_0(s) = e_0(s), C_t(s) = e_t(s) + M_t(s >> kv), where
    e_t(s) = ‖x_t − lut[:, s]‖² and M_t(r) = min_h C_{t−1}(h·R + r) over the D predecessors of r·D + d.
    C_t is held as [2^L, tiles] (tiles innermost), so M_t is a min over the first dim of C as
    [D, R, tiles] and adding it a broadcast over the middle dim of [R, D, tiles]. The forward pass
    keeps the M_t (a D-th of the path costs; in `workspace`) and no back pointers: an argmin is several
    times slower than a min in torch. The traceback recomputes the D costs C_{t−1} into the state on
    the path with the same float operations and takes their argmin: the first minimum, so ties go to
    the lowest h (and, at the end, to the lowest state).
    """
    B, n, V = x.shape
    S = lut.shape[1]
    D, R = 1 << kv, S >> kv
    dev = x.device
    chunks, b = chunking(B, dev)
    pad = chunks * b - B                                               # zero tiles that fill the last chunk
    lut = lut.to(dev, torch.float32)
    xs = torch.nn.functional.pad(x.to(torch.float32).permute(2, 1, 0), (0, pad)).contiguous()  # [V, n, B + pad]
    start, end = [None if e is None else torch.nn.functional.pad(e.to(dev), (0, pad)) for e in (start, end)]
    cols = torch.arange(b, device=dev)
    last = torch.empty(chunks, b, dtype=torch.int64, device=dev)

    def errors(c, y, out=None):     # ‖c − y‖² over dim 0 (V): the same float operations forward and back
        out = torch.sub(c[0], y[0], out=out).square_()
        for v in range(1, V):
            diff = c[v] - y[v]
            out.addcmul_(diff, diff)
        return out

    with workspace(chunks * n * R * b, dev) as buffer:
        best = buffer.view(chunks, n, R, b)                            # best[k, t] = M_t of chunk k
        cost = torch.empty(S, b, device=dev)                           # C_t of one chunk
        for k in range(chunks):
            part = slice(k * b, (k + 1) * b)
            errors(lut[:, :, None], xs[:, 0, None, part], cost)
            if start is not None:                                      # only the states s >> kv = start
                allowed = cost.view(R, D, b)[start[part], :, cols]
                cost.fill_(math.inf)
                cost.view(R, D, b)[start[part], :, cols] = allowed
            for t in range(1, n):
                m = best[k, t]
                torch.amin(cost.view(D, R, b), 0, out=m)
                errors(lut[:, :, None], xs[:, t, None, part], cost).view(R, D, b).add_(m[:, None, :])
            if end is not None:                                        # only the states s mod R = end
                last[k] = cost.view(D, R, b)[:, end[part], cols].argmin(0) * R + end[part]
            else:
                last[k] = cost.argmin(0)

        s = last.flatten()
        rows = torch.arange(chunks * b, device=dev)[:, None]
        k, j = rows // b, rows % b                                     # each tile's chunk and column in best
        heads = torch.arange(D, device=dev) * R
        path = [s]
        for t in range(n - 1, 0, -1):
            prev = heads + (s >> kv)[:, None]                          # [tiles, D] in the order h = 0 .. D−1
            c = errors(lut[:, prev], xs[:, t - 1, :, None])             # C_{t−1}(prev), as above
            if t > 1:
                c.add_(best[k, t - 1, prev >> kv, j])
            elif start is not None:
                c.masked_fill_((prev >> kv) != start[:, None], math.inf)
            s = prev.gather(1, c.argmin(1, keepdim=True))[:, 0]
            path.append(s)
    return torch.stack(path[::-1], 1)[:B]


def tail_biting(x: torch.Tensor, lut: torch.Tensor, kv: int) -> torch.Tensor:
    """QTIP's tail-biting search on x [B, n, V]: Viterbi on the sequence rotated by n/2 steps fixes the
    high L−kv bits o of state 0; a second Viterbi starts at high bits o and ends at low bits o."""
    shift = x.shape[1] // 2
    overlap = viterbi(torch.roll(x, shift, dims=1), lut, kv)[:, shift] >> kv
    return viterbi(x, lut, kv, start=overlap, end=overlap)


def batched_tail_biting(x: torch.Tensor, lut: torch.Tensor, kv: int) -> torch.Tensor:
    """tail_biting over B sequences in batches whose best costs M_t fit in VITERBI_BYTES (CUDA: more)."""
    B, n, _ = x.shape
    if B == 0:
        return torch.empty(0, n, dtype=torch.int64, device=x.device)
    budget = VITERBI_BYTES
    if x.device.type == "cuda":
        budget = max(budget, min(8 << 30, torch.cuda.mem_get_info(x.device)[0] // 4))
    step = max(1, budget // (4 * n * (lut.shape[1] >> kv)))
    if step > CHUNK_TILES:
        step -= step % CHUNK_TILES                   # whole chunks: no batch needs more than the budget
    return torch.cat([tail_biting(x[i:i + step], lut, kv) for i in range(0, B, step)])


# ---- tiles ---------------------------------------------------------------------------------------
def to_tiles(m: torch.Tensor, tile_rows: int, width: int) -> torch.Tensor:
    """[rows, cols] -> [tiles, tile_rows·width]: tile (i, j) is rows i·tile_rows .. and columns j·width ..
    read row-major; tiles ordered by i, then j. (tile_rows = 1: m.reshape(−1, width).)"""
    rows, cols = m.shape
    return (m.reshape(rows // tile_rows, tile_rows, cols // width, width).permute(0, 2, 1, 3)
            .reshape(-1, tile_rows * width))


def from_tiles(t: torch.Tensor, rows: int, tile_rows: int, width: int) -> torch.Tensor:
    """The inverse of `to_tiles`: [tiles, tile_rows·width] -> [rows, cols]."""
    cols = t.numel() // rows
    return (t.reshape(rows // tile_rows, cols // width, tile_rows, width).permute(0, 2, 1, 3)
            .reshape(rows, cols))


def tile_span(T: int, tile_rows: int, whole: str = "tile") -> str:
    """A tile's columns as messages name them: '<whole> T = 256' (1 × T tiles), else 'tile width T / tile_rows = 16'."""
    return f"{whole} T = {T}" if tile_rows == 1 else f"tile width T / tile_rows = {T // tile_rows}"


class RowTiles:
    """What a codec of 2-D tiles (`tile_rows` rows × `width` columns; trellis, tcq) checks of a matrix: its rows
    fill whole tiles, refused in `for_matrix` (what encode, GPTQ and fake quantization call first), before any
    search; its columns, and each block handed to `quantize`, are whole tiles' columns. The codec sets `name`,
    `T`, `tile_rows` and `width`."""

    def check_cols(self, cols: int, whole: str) -> None:
        if cols % self.width:
            raise ValueError(f"{self.name}: {cols} columns are not a multiple of the "
                             f"{tile_span(self.T, self.tile_rows, whole)}")

    def check_block(self, col: int, cols: int, wholes: str) -> None:
        """Columns col .. col + cols, handed to `quantize`, must be whole tiles' columns (GPTQ's block_width)."""
        if col % self.width or cols % self.width or cols == 0:
            what = f"T = {self.T} columns" if self.tile_rows == 1 else f"{self.width} columns (T / tile_rows)"
            raise ValueError(f"{self.name} quantizes whole {wholes} of {what}: got columns {col}..{col + cols} "
                             f"(a solver must pass block_width = {self.width} columns)")

    def check_rows(self, rows: int) -> None:
        if rows % self.tile_rows:
            raise ValueError(f"codec.tile_rows: {self.name} tiles of {self.tile_rows} rows × {self.width} columns "
                             f"need a matrix whose rows are a multiple of {self.tile_rows}; got {rows} rows")

    def for_matrix(self, w):
        """Itself, once the rows of `w` are found to fill whole tiles."""
        self.check_rows(w.shape[0])
        return self


# ---- the codec -----------------------------------------------------------------------------------
@dataclass
class TrellisParams:
    scale: torch.Tensor   # [rows] σ, rounded to fp16 (stored)


class Trellis(RowTiles, Codec):
    name = "trellis"

    def __init__(self, cfg: TrellisConfig):
        super().__init__(cfg)
        self.K, self.L, self.V, self.T = cfg.bits, cfg.L, cfg.V, cfg.T
        self.kv = self.K * self.V
        self.n = self.T // self.V
        self.tile_rows, self.width = cfg.tile_rows, cfg.tile_width
        self.group_size = cfg.group
        self.block_width = self.width          # GPTQ hands over one column of tiles at a time
        values = codebook_values(cfg.code, cfg.L, cfg.V, cfg.Q, cfg.table_seed)
        self._lut_cpu = torch.from_numpy(np.ascontiguousarray(values))
        self._luts: dict[str, torch.Tensor] = {}
        self.rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))

    def lut(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._luts:
            self._luts[key] = self._lut_cpu.to(device)
        return self._luts[key]

    # -- the steps -------------------------------------------------------------------------------
    def group_of(self, cols: int) -> int:
        self.check_cols(cols, "tile")
        return super().group_of(cols)

    def tiles(self, m: torch.Tensor, per_weight: int = 1) -> torch.Tensor:
        """[rows, c] weights (per_weight = 1) or states (per_weight = V) -> [tiles, T / per_weight]."""
        return to_tiles(m, self.tile_rows, self.width // per_weight)

    def untile(self, t: torch.Tensor, rows: int, per_weight: int = 1) -> torch.Tensor:
        return from_tiles(t, rows, self.tile_rows, self.width // per_weight)

    def fit(self, w, importance=None):
        rms = w.float().pow(2).mean(1).sqrt()
        scale = rms / self.rms * self.cfg.scale_factor
        return TrellisParams(scale.clamp(max=FP16_MAX).half().float())

    def quantize(self, w, params, col=0):
        rows, c = w.shape
        self.check_block(col, c, "tiles")
        self.check_rows(rows)
        scale = params.scale.to(w.device)
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        x = self.tiles(w.float() * inv[:, None]).reshape(-1, self.n, self.V)
        states = batched_tail_biting(x, self.lut(w.device), self.kv)          # [tiles, n]
        values = self._unit_values(states, rows) * scale[:, None]
        return Quantized(values, self.untile(states, rows, self.V).to(torch.int32))

    def _unit_values(self, states: torch.Tensor, rows: int) -> torch.Tensor:
        """[tiles, n] states -> their codewords c(s) where the weights lie, [rows, cols] (σ = 1)."""
        lut = self.lut(states.device)
        return self.untile(lut[:, states.long()].permute(1, 2, 0).reshape(states.shape[0], -1), rows)

    def pack(self, codes, params):
        rows, m = codes.shape
        cols = m * self.V
        self.group_of(cols)
        self.check_rows(rows)
        states = self.tiles(codes.to(torch.int64), self.V)           # [tiles, n], each a cyclic path
        low = (1 << (self.L - self.kv)) - 1
        if (states < 0).any() or (states >> self.L).any():
            raise ValueError(f"trellis.pack: states must be in [0, 2^{self.L})")
        if ((torch.roll(states, -1, dims=1) >> self.kv) != (states & low)).any():
            raise ValueError("trellis.pack: the codes are not tail-biting trellis paths (a state's low L−KV bits "
                             "must be the next state's high bits, cyclically)")
        symbols = states >> (self.L - self.kv)                     # each step's first KV bits of the string
        per_weight = torch.stack([(symbols >> (self.K * (self.V - 1 - v))) & ((1 << self.K) - 1)
                                  for v in range(self.V)], -1)    # [tiles, n, V] K-bit pieces, high first
        scale = torch.stack([p.scale for p in params], 1)          # [rows, groups]
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": pack_bits(per_weight, self.K), "scale": scale.half()})

    def unpack_states(self, packed: Packed) -> torch.Tensor:
        """The states [tiles, n] of a pack, tiles in stored order (`untile(·, rows, V)` lays them out like
        the weights): each state is L bits of the tile's cyclic bit string."""
        rows, cols = packed.shape
        tiles = rows * cols // self.T
        pieces = unpack_bits(packed.data["codes"], self.K, rows * cols).reshape(tiles, self.n, self.V)
        symbols = sum(pieces[..., v] << (self.K * (self.V - 1 - v)) for v in range(self.V))   # [tiles, n]
        m = -(-self.L // self.kv)                                  # symbols that cover L bits
        window = sum(torch.roll(symbols, -j, dims=1) << (self.kv * (m - 1 - j)) for j in range(m))
        return window >> (m * self.kv - self.L)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        scale = packed.data["scale"].float()                       # [rows, groups]
        states = self.unpack_states(packed).to(scale.device)
        return self._unit_values(states, rows) * scale.repeat_interleave(g, dim=1)

    def bits_per_weight(self, shape):
        """From an actual pack of a valid path (all states 0), without running the search."""
        rows, cols = shape
        g = self.group_of(cols)
        zero = TrellisParams(torch.zeros(rows))
        return self.pack(torch.zeros(rows, cols // self.V, dtype=torch.int32), [zero] * (cols // g)).bits_per_weight
