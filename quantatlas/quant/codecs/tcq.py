"""Classic trellis-coded quantization (Marcellin & Fischer, "Trellis coded quantization of memoryless
and Gauss-Markov sources", IEEE T-Comm 1990): codec `tcq` (issue 28, part 4).

The codebook. R bits per weight use a scalar codebook of 2^(R+1) levels a_0 < a_1 < ... (twice the
levels an R-bit scalar quantizer has), split Ungerboeck-style into four subsets D_k = {a_j : j ≡ k
(mod 4)}: neighbours lie in different subsets, D0 ∪ D2 (even j) and D1 ∪ D3 (odd j) interleave.
Levels (`levels`): `lloyd_max`, the (R+1)-bit Lloyd-Max quantizer of N(0, 1) (quant/lloyd_max.py)
times a load α_R, as Marcellin & Fischer use for memoryless sources; or `uniform`, Δ_R·(j - (2^(R+1)-1)/2).
α_R and Δ_R are the least-MSE values on i.i.d. N(0, 1) samples (measured once at 8 states, table below).
Or `trained` (R = 1..4): the levels of Marcellin & Fischer's codebook design for N(0, 1), per R and
trellis (`train_levels`: Viterbi-encode a fixed sample of 2^20 N(0, 1) values, move each level to the
mean of the samples it reproduced, repeat until the MSE stops falling; R = 4 stops at the 100-pass cap,
still gaining < 0.01 % a pass), tabulated in tcq_trained.py (written by `python -m
quantatlas.quant.codecs.tcq`, ~10 CPU-minutes), so that encoder and decoder agree on every machine.
Against the Lloyd-Max load training gains ~0 dB at R = 1 (the load is already there), 0.04-0.07 dB at
R = 2, 0.1-0.16 dB at R = 4; it does not remove the ~1.1 dB gap of 256-state TCQ to D(R) at R = 2 for a
Gaussian source (bench/gaussian_mse.py: a fixed-rate trellis's words use the levels equally often).

The trellis. Ungerboeck's rate-½ codes for amplitude modulation ("Trellis-coded modulation with
redundant signal sets", IEEE Comm. Mag. 1987, Table I): parity-check polynomials (h0, h1) per
ν = log2(states), ν = 2..8, 4 to 256 states. We use the feedforward encoder of the same code: a path
is a bit string u (one bit per weight), the state after step t is its last ν bits, and step t's subset
is D_k, k = 2·z1 + z0 with

    z1_t = ⊕_i h0_i u_{t-i},   z0_t = ⊕_i h1_i u_{t-i}     (i = 0..ν; GF(2) convolutions)

so h1·z1 ⊕ h0·z0 = 0 (Ungerboeck's parity check). h1 has no D^0 term, so z0 depends on the state only:
the two branches leaving a state carry D0/D2 or D1/D3, as TCQ requires; h0 has D^0 and D^ν, so
the two branches differ in z1, and so do the two entering a state. The test checks each code's free
distance against Ungerboeck's table.

Storage: per weight one R-bit symbol, the path bit u_t (high bit) and the index of the level inside
its subset (R - 1 low bits; a subset has 2^(R-1) levels): exactly R bits per weight, plus one fp16
scale σ per row and `group` (null: per row). σ = RMS(w)·`scale_factor`; weights are coded as w/σ.
Any symbol string is a valid path, so decoding needs nothing else: z1, z0 from u by the two
convolutions, level index j = 4·(subset index) + 2·z1 + z0.

Tiles. A path covers a tile of T weights: `tile_rows` = r consecutive rows × w = T/r consecutive
columns, read row-major (row 0's w weights, then row 1's, ...), cut and laid back by trellis.py's
`to_tiles` / `from_tiles` (tiles ordered by row block, then column block). r = 1 (the default) is a
1×T tile, T consecutive columns of one row; r = 16, T = 256 is QTIP's 16×16 tile. The rows of a
matrix must be a multiple of r (refused in `for_matrix`, before any search; no padding, which would
cost bits). Scales stay per row: a tile's r rows each have their own σ. Codes as `quantize` returns
them are laid out like the weights ([rows, cols], one symbol per weight); `pack` stores them tile by
tile, each tile's path in order (at r = 1 that is the matrix's row-major order, as before tiles).

Tail handling: each tile is its own trellis path that starts in state 0 (u_{t} = 0 for t < 0:
known to the decoder, nothing stored) and ends in whatever state the best path reaches (no
termination bits, no tail-biting). The fixed start costs the first ν steps some choice; nothing
else differs from an infinite trellis.

The search: Viterbi over the 2^ν states, vectorised over all tiles (rows) at once in torch. Per
step, the nearest level of each subset to x_t (four bucketizes, done up front for the whole tile),
then for every window v = (previous state << 1) | u_t of ν+1 bits the cost of its subset; the new
state v mod 2^ν keeps the cheaper of its two predecessors v >> 1 (top bit of v 0 or 1). Back
pointers are one bool per state and step. Work: T·2^(ν+1) additions per tile.

GPTQ/LDLQ: block_width = w = T/r, so GPTQ hands one column of whole tiles to `quantize` and feeds
its error forward through the block update, as for the bitshift trellis (trellis.py). With 1×T tiles
LDLQ feeds back no error inside the T columns of a path (on a T-column matrix GPTQ is RTN's encode);
with 16×16 tiles it does every 16 columns. For an i.i.d. source the tile shape changes nothing.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from quantatlas._lazy import no_grad, torch
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.codecs.lattice import FP16_MAX, ScaleParams
from quantatlas.quant.codecs.tcq_trained import TRAINED
from quantatlas.quant.codecs.trellis import RowTiles, from_tiles, tile_span, to_tiles
from quantatlas.quant.config import ADDED_LATER, CodecConfig
from quantatlas.quant.lloyd_max import codebook

#: Ungerboeck's rate-½ amplitude-modulation codes: ν -> (h0, h1) parity-check polynomials (octal,
#: bit i = coefficient of D^i)
UNGERBOECK = {2: (0o5, 0o2), 3: (0o13, 0o04), 4: (0o23, 0o04), 5: (0o45, 0o10), 6: (0o103, 0o024),
              7: (0o235, 0o126), 8: (0o515, 0o362)}
#: the least-MSE load of the levels on N(0, 1) per R (measured at 8 states; see the module docstring):
#: lloyd_max: a_j = α_R · (the (R+1)-bit Lloyd-Max level j); uniform: a_j = Δ_R · (j - (2^(R+1) - 1)/2)
LLOYD_MAX_LOAD = {1: 0.7923, 2: 0.8516, 3: 0.8765, 4: 0.8963, 5: 0.9141, 6: 0.9215, 7: 0.9111}
UNIFORM_STEP = {1: 0.7875, 2: 0.4943, 3: 0.2945, 4: 0.1692, 5: 0.0949, 6: 0.0535, 7: 0.0292}
#: bytes of back pointers one Viterbi batch may hold
VITERBI_BYTES = 1 << 27
#: the training of the `trained` levels: its N(0, 1) sample (size, path length, seed), and when it stops
#: (relative MSE drop of one pass below TRAIN_RTOL, or TRAIN_MAX_ITERS passes)
TRAIN_SAMPLES, TRAIN_T, TRAIN_SEED, TRAIN_RTOL, TRAIN_MAX_ITERS = 1 << 20, 256, 0, 1e-6, 100


class TCQConfig(CodecConfig):
    name = "tcq"
    bits: int = Field(ge=1, le=7)                    # R: bits per weight (2^(R+1) levels; Lloyd-Max has up to 8 bits)
    states: int = Field(8, ge=4, le=256)             # 2^ν, ν = 2..8
    levels: Literal["lloyd_max", "uniform", "trained"] = "lloyd_max"   # trained: R = 1..4 (tcq_trained.py)
    T: int = Field(256, ge=1)                        # weights per path (one tile)
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
        if self.states & (self.states - 1):
            raise ValueError(f"states must be a power of two from 4 to 256, got {self.states}")
        if self.T % self.tile_rows:
            raise ValueError(f"tile_rows = {self.tile_rows} must divide the path length T = {self.T}")
        if self.group is not None and self.group % self.tile_width:
            raise ValueError(f"group = {self.group} must be a multiple of the "
                             f"{tile_span(self.T, self.tile_rows, 'path length')}")
        if self.levels == "trained" and (self.bits, self.states) not in TRAINED:
            raise ValueError(f"levels = trained is tabulated for bits 1-4 (got bits = {self.bits}); "
                             f"use lloyd_max or uniform")
        return self

    def build(self):
        return TCQ(self)


# ---- the trellis -------------------------------------------------------------------------------
def parity(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    p = np.zeros_like(x)
    while x.any():
        p ^= x & 1
        x = x >> 1
    return p


@lru_cache(maxsize=None)
def window_subsets(nu: int) -> np.ndarray:
    """The subset k = 2·z1 + z0 of every (ν+1)-bit window v (bit i = u_{t-i}) of the ν-state code."""
    h0, h1 = UNGERBOECK[nu]
    v = np.arange(1 << (nu + 1))
    return 2 * parity(v & h0) + parity(v & h1)


def unit_levels(bits: int, kind: str, states: int | None = None) -> np.ndarray:
    """The 2^(R+1) levels for a unit-variance source, ascending (float64); `trained` ones depend on the trellis."""
    n = 1 << (bits + 1)
    if kind == "lloyd_max":
        return LLOYD_MAX_LOAD[bits] * np.asarray(codebook(bits + 1).levels, dtype=np.float64)
    if kind == "trained":
        return np.asarray(TRAINED[bits, states], dtype=np.float64)
    return UNIFORM_STEP[bits] * (np.arange(n) - (n - 1) / 2)


def subset_nearest(x: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every x and subset k, the index i of the nearest level of D_k = levels[k::4] and its squared
    error: ([..., 4] int64, [..., 4] float32)."""
    idx, err = [], []
    for k in range(4):
        sub = levels[k::4]
        i = torch.bucketize(x, (sub[1:] + sub[:-1]) / 2) if sub.numel() > 1 else torch.zeros_like(x, dtype=torch.int64)
        idx.append(i)
        err.append((x - sub[i]) ** 2)
    return torch.stack(idx, -1), torch.stack(err, -1)


@no_grad
def viterbi(x: torch.Tensor, levels: torch.Tensor, nu: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squared-error TCQ path for each row of x [B, n] (unit scale), starting in state 0.

    Returns (symbols [B, n] int64: path bit << (R-1) | index in the subset, the least cost [B] float32).
    levels: the 2^(R+1) ascending levels (float32, on x's device).
    """
    B, n = x.shape
    S = 1 << nu
    dev = x.device
    sub_of = torch.as_tensor(window_subsets(nu), device=dev)               # [2S] subset of each window
    half = torch.arange(2 * S, device=dev) >> 1                              # predecessor state of each window
    idx, err = subset_nearest(x.float().contiguous(), levels)                # [B, n, 4]
    cost = torch.full((B, S), math.inf, device=dev)
    cost[:, 0] = 0.0
    back = torch.empty(n, B, S, dtype=torch.bool, device=dev)               # top bit of the best window
    for t in range(n):
        cand = cost.index_select(1, half).add_(err[:, t].index_select(1, sub_of))   # [B, 2S], window v = h·S + s
        low, high = cand[:, :S], cand[:, S:]
        torch.lt(high, low, out=back[t])
        cost = torch.minimum(low, high)
    best, state = cost.min(1)
    rows = torch.arange(B, device=dev)
    bits_in_subset = (levels.numel() // 4).bit_length() - 1                   # R - 1
    symbols = torch.empty(B, n, dtype=torch.int64, device=dev)
    for t in range(n - 1, -1, -1):
        v = back[t, rows, state].long() * S + state
        k = sub_of[v]
        symbols[:, t] = ((v & 1) << bits_in_subset) | idx[rows, t, k]
        state = v >> 1
    return symbols, best


def level_indices(symbols: torch.Tensor, bits: int, nu: int) -> torch.Tensor:
    """The level index j = 4·(index in the subset) + subset of each symbol of paths [B, n] (decoder side)."""
    low = (1 << (bits - 1)) - 1
    return 4 * (symbols & low) + path_subsets(symbols >> (bits - 1), nu)


@no_grad
def train_levels(bits: int, states: int, start: np.ndarray | None = None, max_iters: int = TRAIN_MAX_ITERS,
                 samples: int = TRAIN_SAMPLES, seed: int = TRAIN_SEED) -> tuple[np.ndarray, list[float]]:
    """Marcellin & Fischer's codebook design on N(0, 1): Viterbi-encode a fixed sample with the current
    levels, move each level to the mean of the samples it reproduced (the centroid condition, exact for
    the path found), repeat until a pass lowers the MSE by less than TRAIN_RTOL (relative). Each pass can
    only lower the sample MSE: the path stays valid and its levels move to their least-squares values.
    start: the first levels (default: the Lloyd-Max load). Returns (levels, the MSE of each pass); on CPU,
    so the result does not depend on a device."""
    nu = states.bit_length() - 1
    x = torch.randn(samples // TRAIN_T, TRAIN_T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = x.reshape(-1)
    levels = torch.as_tensor(unit_levels(bits, "lloyd_max") if start is None else start, dtype=torch.float64)
    history: list[float] = []
    for _ in range(max_iters):
        symbols, cost = viterbi(x.float(), levels.float(), nu)
        history.append(float(cost.double().sum()) / x.numel())
        j = level_indices(symbols, bits, nu).reshape(-1)
        count = torch.bincount(j, minlength=levels.numel()).double()
        total = torch.bincount(j, weights=flat, minlength=levels.numel())
        levels = torch.where(count > 0, total / count.clamp_min(1), levels)     # a level nobody used stays
        if not bool((levels[1:] > levels[:-1]).all()):
            raise RuntimeError(f"tcq training (bits {bits}, {states} states): the levels left ascending order")
        if len(history) > 1 and history[-2] - history[-1] < TRAIN_RTOL * history[-1]:
            break
    return levels.numpy(), history


def path_subsets(u: torch.Tensor, nu: int) -> torch.Tensor:
    """The subset k_t = 2·z1_t + z0_t of path bits u [B, n] (state 0 before step 0): two GF(2) convolutions."""
    h0, h1 = UNGERBOECK[nu]
    n = u.shape[1]
    z1, z0 = torch.zeros_like(u), torch.zeros_like(u)
    for i in range(nu + 1):
        shifted = torch.nn.functional.pad(u, (i, 0))[:, :n]                  # u_{t-i}, 0 before the start
        z1 ^= shifted * ((h0 >> i) & 1)
        z0 ^= shifted * ((h1 >> i) & 1)
    return 2 * z1 + z0


# ---- the codec -----------------------------------------------------------------------------------
class TCQ(RowTiles, Codec):
    name = "tcq"

    def __init__(self, cfg: TCQConfig):
        super().__init__(cfg)
        self.R, self.T = cfg.bits, cfg.T
        self.nu = cfg.states.bit_length() - 1
        self.tile_rows, self.width = cfg.tile_rows, cfg.tile_width
        self.group_size = cfg.group
        self.block_width = self.width          # GPTQ hands over one column of tiles at a time
        self._levels_cpu = torch.from_numpy(unit_levels(cfg.bits, cfg.levels, cfg.states).astype(np.float32))
        self._levels: dict[str, torch.Tensor] = {}

    def levels(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._levels:
            self._levels[key] = self._levels_cpu.to(device)
        return self._levels[key]

    def group_of(self, cols: int) -> int:
        self.check_cols(cols, "path length")
        return super().group_of(cols)

    def fit(self, w, importance=None):
        scale = w.float().pow(2).mean(1).sqrt() * self.cfg.scale_factor
        return ScaleParams(scale.clamp(max=FP16_MAX).half().float())

    def quantize(self, w, params, col=0):
        rows, c = w.shape
        self.check_block(col, c, "paths")
        self.check_rows(rows)
        scale = params.scale.to(w.device)
        inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        x = to_tiles(w.float() * inv[:, None], self.tile_rows, self.width)     # [tiles, T], each one path
        levels = self.levels(w.device)
        step = max(1, VITERBI_BYTES // (self.T << self.nu))
        symbols = torch.cat([viterbi(x[i:i + step], levels, self.nu)[0] for i in range(0, x.shape[0], step)])
        values = self.unit_values(symbols, rows) * scale[:, None]
        return Quantized(values, from_tiles(symbols, rows, self.tile_rows, self.width))

    def unit_values(self, symbols: torch.Tensor, rows: int) -> torch.Tensor:
        """[tiles, T] paths -> their levels where the weights lie, [rows, cols] (σ = 1)."""
        unit = self.levels(symbols.device)[level_indices(symbols, self.R, self.nu)]
        return from_tiles(unit, rows, self.tile_rows, self.width)

    def pack(self, codes, params):
        rows, cols = codes.shape
        self.group_of(cols)
        self.check_rows(rows)
        if (codes < 0).any() or (codes >> self.R).any():
            raise ValueError(f"tcq.pack: codes must be {self.R}-bit symbols")
        scale = torch.stack([p.scale for p in params], 1)
        paths = to_tiles(codes, self.tile_rows, self.width)                    # [tiles, T]: each path in order
        return Packed(self.name, self.config(), (rows, cols),
                      {"codes": pack_bits(paths, self.R), "scale": scale.half()})

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        self.check_rows(rows)
        scale = packed.data["scale"].float()                                  # [rows, groups]
        symbols = unpack_bits(packed.data["codes"], self.R, rows * cols).reshape(-1, self.T).to(scale.device)
        return self.unit_values(symbols, rows) * scale.repeat_interleave(g, dim=1)


# ---- the table of trained levels ----------------------------------------------------------------------
def write_trained_table(bits=(1, 2, 3, 4), states=(4, 8, 16, 32, 64, 128, 256), log=print) -> None:
    """Train every (bits, states) and write tcq_trained.py (6 decimals: far below the sample's noise)."""
    from pathlib import Path

    rows = []
    for b in bits:
        for s in states:
            levels, history = train_levels(b, s)
            gap = 10 * math.log10(history[-1] / 2.0 ** (-2 * b))
            log(f"bits {b}, {s} states: {len(history)} passes, MSE {history[0]:.5f} -> {history[-1]:.5f} "
                f"({gap:.3f} dB)")
            rows.append(f"    ({b}, {s}): ({', '.join(f'{v:.6f}' for v in levels)}),")
    path = Path(__file__).with_name("tcq_trained.py")
    head = path.read_text().split("TRAINED:")[0]
    path.write_text(head + "TRAINED: dict[tuple[int, int], tuple[float, ...]] = {\n" + "\n".join(rows) + "\n}\n")


if __name__ == "__main__":
    write_trained_table()
