"""GPTVQ: vector quantization of d consecutive columns inside the GPTQ loop (van Baalen et al. 2024).

Each row of a column group is cut into vectors of `dim` = d ∈ {1, 2, 4} consecutive weights.
A codebook of K = 2^(bits·d) centroids in R^d serves one group of `rows` rows × `group`
columns (rows: null = all rows of the matrix), so a weight costs `bits` bits of index.

fit (per column group, with the current weights as GPTQ hands them over):
    importance h [group] (diag H from GPTQ; 1 without it) weights each coordinate:
    minimise Σ_vectors Σ_k h_k (x_k − c_k)² over the centroids c, by k-means: k-means++
    seeding (D² sampling under the same weighted distance) drawn from the codec's seed,
    then Lloyd steps (assign to the weighted-nearest centroid; each centroid coordinate
    becomes the h-weighted mean of its members) until the assignment is stable or `iters`.
    An empty cluster moves to the vector with the largest weighted error.
    The codebook is then rounded to what is stored: `codebook_bits: 8` → int8 codes and one
    fp16 scale per codebook (scale = max|c| / 127), `16` → fp16. Those stored values are the
    centroids that quantize and decode use.
quantize: each d-column tile goes to its h-weighted nearest stored centroid (block_width = d,
    so GPTQ's LDLQ step feeds each tile's error back into the columns after it).

Stored per matrix: the indices (bits·d each, bit-packed), every codebook (K·d values at
codebook_bits, plus its fp16 scale at 8 bits). Bits per weight
    = bits + n_codebooks · (K·d·codebook_bits + [16 if int8]) / (rows·cols),
    n_codebooks = (cols / group) · ceil(rows / row_block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from quantatlas._lazy import torch
from quantatlas.context import RunContext
from quantatlas.quant.codecs.base import Codec, Packed, Quantized, pack_bits, unpack_bits
from quantatlas.quant.config import CodecConfig

FP16_MAX = 65504.0
#: largest index width (bits · dim): 4096 centroids
MAX_INDEX_BITS = 12


class GPTVQConfig(CodecConfig):
    name = "gptvq"
    seeded = True   # k-means seeding follows the run seed
    bits: int = Field(ge=1, le=8)                      # index bits per weight: K = 2^(bits·dim)
    dim: Literal[1, 2, 4] = 2
    group: int | None = Field(256, gt=0)               # columns per codebook (null: whole rows)
    rows: int | None = Field(None, gt=0)               # rows per codebook (null: all rows)
    codebook_bits: Literal[8, 16] = 8
    iters: int = Field(30, ge=0, le=1000)              # Lloyd steps
    seed: int = Field(0, ge=0, lt=2 ** 63)

    @model_validator(mode="after")
    def _shape(self):
        if self.bits * self.dim > MAX_INDEX_BITS:
            raise ValueError(f"bits · dim = {self.bits * self.dim} gives 2^{self.bits * self.dim} centroids; "
                             f"at most {MAX_INDEX_BITS} index bits")
        if self.group is not None and self.group % self.dim:
            raise ValueError(f"group {self.group} is not a multiple of dim {self.dim}")
        return self

    def build(self):
        return GPTVQ(self)


# ---- shared helpers (also used by aqlm.py) -------------------------------------------------------
def weighted_sq_dist(x: torch.Tensor, h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """[n, K] Σ_k h[n,k] (x[n,k] − C[K,k])² for x, h [n, d] and C [K, d]."""
    hx = h * x
    return (hx * x).sum(1, keepdim=True) - 2 * hx @ C.T + h @ (C * C).T


def weighted_kmeans(x: torch.Tensor, h: torch.Tensor, k: int, iters: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], assignment [n]) minimising Σ_n Σ_j h[n,j] (x[n,j] − c[a_n, j])².

    k-means++ seeding under the weighted distance (from `generator`), then Lloyd steps until the
    assignment repeats or `iters` steps. With n <= k every vector is its own centroid."""
    x, h = x.float(), h.float()
    n, d = x.shape
    if n <= k:
        extra = x[torch.randint(0, n, (k - n,), generator=generator)] if k > n else x[:0]
        C = torch.cat([x, extra])
        return C, torch.arange(n)
    first = int(torch.randint(0, n, (1,), generator=generator))
    C = x[first:first + 1].clone()
    best = weighted_sq_dist(x, h, C)[:, 0].clamp_min(0)
    for _ in range(1, k):
        total = best.sum()
        if float(total) <= 0:
            i = int(torch.randint(0, n, (1,), generator=generator))
        else:
            i = int(torch.multinomial(best / total, 1, generator=generator))
        C = torch.cat([C, x[i:i + 1]])
        best = torch.minimum(best, weighted_sq_dist(x, h, x[i:i + 1])[:, 0].clamp_min(0))
    assign = weighted_sq_dist(x, h, C).argmin(1)
    hx = h * x
    for _ in range(iters):
        num = torch.zeros(k, d).index_add_(0, assign, hx)
        den = torch.zeros(k, d).index_add_(0, assign, h)
        C = torch.where(den > 0, num / den.clamp_min(1e-30), C)
        counts = torch.bincount(assign, minlength=k)
        dist = weighted_sq_dist(x, h, C)
        if bool((counts == 0).any()):  # empty clusters take the worst-served vectors
            err = dist.gather(1, assign[:, None])[:, 0].clone()
            for c in torch.nonzero(counts == 0).flatten().tolist():
                i = int(err.argmax())
                C[c] = x[i]
                err[i] = -1
            dist = weighted_sq_dist(x, h, C)
        new = dist.argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return C, assign


def pack_wide(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Codes of up to 16 bits as bit streams: the low 8 bits and the rest (pack_bits takes <= 8)."""
    codes = codes.reshape(-1).to(torch.int64)
    if bits <= 8:
        return {"codes": pack_bits(codes, bits)}
    return {"codes": pack_bits(codes & 0xFF, 8), "codes_hi": pack_bits(codes >> 8, bits - 8)}


def unpack_wide(data: dict, bits: int, count: int) -> torch.Tensor:
    if bits <= 8:
        return unpack_bits(data["codes"], bits, count)
    return unpack_bits(data["codes"], 8, count) | (unpack_bits(data["codes_hi"], bits - 8, count) << 8)


def store_codebook(C: torch.Tensor, codebook_bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored values: int8 or fp16, fp16 scale or None) for centroids C [..., K, d]; the scale is
    one per leading index."""
    if codebook_bits == 16:
        return C.clamp(-FP16_MAX, FP16_MAX).half(), None
    amax = C.abs().flatten(-2).amax(-1)
    scale = (amax / 127).clamp(max=FP16_MAX).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(C / s[..., None, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def load_codebook(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 centroids that stored values represent (exactly as `decode` computes them)."""
    if scale is None:
        return q.float()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return q.float() * s[..., None, None]


# ---- the codec ------------------------------------------------------------------------------------
@dataclass
class GPTVQParams:
    stored: torch.Tensor               # [blocks, K, d] int8 or fp16 (stored)
    scale: torch.Tensor | None         # [blocks] fp16 (stored, int8 codebooks only)
    centroids: torch.Tensor            # [blocks, K, d] float32 = load_codebook(stored, scale)
    h: torch.Tensor                    # [group] assignment weights (not stored)


class GPTVQ(Codec):
    name = "gptvq"

    def __init__(self, cfg: GPTVQConfig):
        super().__init__(cfg)
        self.bits, self.dim, self.group_size, self.row_block = cfg.bits, cfg.dim, cfg.group, cfg.rows
        self.codebook_bits, self.iters, self.seed = cfg.codebook_bits, cfg.iters, cfg.seed
        self.block_width = cfg.dim
        self.k = 1 << (cfg.bits * cfg.dim)

    def for_run(self, ctx: RunContext) -> "GPTVQ":
        """Run seed s seeds k-means with `seed + s` (the context's "offset" derivation; run seed 0 is the
        spec's own `seed`); the run codec's config holds it, so its packs decode on their own."""
        seed = ctx.sub_seed("offset", self.seed)
        return self if seed == self.seed else GPTVQ(self.cfg.model_copy(update={"seed": seed}))

    def group_of(self, cols: int) -> int:
        g = super().group_of(cols)
        if g % self.dim:
            raise ValueError(f"gptvq: group width {g} is not a multiple of dim {self.dim}")
        return g

    def _blocks(self, rows: int) -> list[slice]:
        r = self.row_block or rows
        return [slice(a, min(a + r, rows)) for a in range(0, rows, r)]

    def fit(self, w, importance=None):
        w = w.detach().float().cpu()
        rows, g = w.shape
        d = self.dim
        if importance is None:
            h = torch.ones(g)
        else:
            h = importance.detach().float().cpu().clamp_min(0)
            h = h + 1e-6 * float(h.mean()) + 1e-12   # dead columns keep a tiny weight
        gen = torch.Generator().manual_seed(self.seed)
        cents = []
        for b in self._blocks(rows):
            x = w[b].reshape(-1, d)
            hv = h.reshape(1, g // d, d).expand(b.stop - b.start, -1, -1).reshape(-1, d)
            C, _ = weighted_kmeans(x, hv, self.k, self.iters, gen)
            cents.append(C)
        stored, scale = store_codebook(torch.stack(cents), self.codebook_bits)
        return GPTVQParams(stored, scale, load_codebook(stored, scale), h)

    def _assign(self, w: torch.Tensor, params: GPTVQParams, col: int) -> torch.Tensor:
        rows, c = w.shape
        d = self.dim
        if col % d or c % d:
            raise ValueError(f"gptvq quantizes whole {d}-column tiles: got columns {col}..{col + c}")
        h = params.h[col:col + c].to(w.device)
        codes = torch.empty(rows, c // d, dtype=torch.int64, device=w.device)
        for bi, b in enumerate(self._blocks(rows)):
            x = w[b].reshape(-1, d)
            hv = h.reshape(1, c // d, d).expand(b.stop - b.start, -1, -1).reshape(-1, d)
            C = params.centroids[bi].to(w.device)
            codes[b] = weighted_sq_dist(x, hv, C).argmin(1).reshape(b.stop - b.start, c // d)
        return codes

    def _values(self, codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        rows, m = codes.shape
        out = torch.empty(rows, m * self.dim, device=codes.device)
        for bi, b in enumerate(self._blocks(rows)):
            out[b] = centroids[bi].to(codes.device)[codes[b]].reshape(b.stop - b.start, m * self.dim)
        return out

    def quantize(self, w, params, col=0):
        codes = self._assign(w.float(), params, col)
        return Quantized(self._values(codes, params.centroids), codes)

    def pack(self, codes, params):
        rows, m = codes.shape
        cols = m * self.dim
        self.group_of(cols)
        data = pack_wide(codes, self.bits * self.dim)
        data["codebook"] = torch.stack([p.stored for p in params])          # [groups, blocks, K, d]
        if self.codebook_bits == 8:
            data["codebook_scale"] = torch.stack([p.scale for p in params])  # [groups, blocks] fp16
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        g = self.group_of(cols)
        d = self.dim
        codes = unpack_wide(packed.data, self.bits * d, rows * cols // d).reshape(rows, cols // d)
        cents = load_codebook(packed.data["codebook"], packed.data.get("codebook_scale"))
        per = g // d
        return torch.cat([self._values(codes[:, i * per:(i + 1) * per], cents[i]) for i in range(cols // g)], 1)
