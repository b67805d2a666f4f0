"""AQLM: additive quantization of groups of input weights (Egiazarian et al. 2024).

A row of the matrix is cut into vectors of `group` = g consecutive weights. Each vector is
the sum of one entry from each of M = `codebooks` codebooks of K = 2^`code_bits` entries in
R^g, times the row's scale:

    ŵ_r[v] = s_r · Σ_m C_m[c_{r,v,m}]

The codebooks are shared by the whole matrix (the codec's group is the whole row, so `fit`
sees the matrix); `scales: true` keeps one fp16 scale per output row.

fit(w, importance): s_r = RMS of row r (fp16); the codebooks by residual k-means on the
    normalised vectors w_r/s_r under the importance weights (diag H from GPTQ, 1 without):
    codebook m is fit to what codebooks 0..m-1 leave, k-means++ seeded from the codec's seed.
    The codebooks are then rounded to what is stored (`codebook_bits: 16` fp16, `8` int8 with
    one fp16 scale per codebook).
quantize: beam search over the M codes of each g-column tile (block_width = g, so GPTQ's LDLQ
    step feeds each tile's error back): start from the empty sum; for m = 0..M-1 extend every
    hypothesis by each of the K entries of codebook m and keep the `beam` best (weighted squared
    error); then `passes` more sweeps, each replacing code m of every hypothesis by each entry.
    With beam >= K^(M-1) the first sweep is exhaustive (the brute-force optimum).
The AQLM solver (solvers/aqlm.py) adds Adam on the codebooks and scales against the layer
output error tr((Ŵ−W) H (Ŵ−W)ᵀ) between beam searches.

Bits per weight (AQLM's own estimate, from what is stored):
    M·B / g                                   codes
  + M · (K·g·codebook_bits + [16 if int8]) / (rows·cols)   codebooks
  + 16 / cols                                 row scales (scales: true)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from quantatlas._lazy import torch
from quantatlas.context import RunContext
from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.codecs.gptvq import (FP16_MAX, load_codebook, pack_wide, store_codebook, unpack_wide,
                                           weighted_kmeans)
from quantatlas.quant.config import CodecConfig

#: candidates scored at once in the beam search (vectors × beam × K)
CHUNK = 1 << 22


class AQLMConfig(CodecConfig):
    name = "aqlm"
    seeded = True   # k-means seeding follows the run seed
    codebooks: int = Field(ge=1, le=8)              # M
    code_bits: int = Field(ge=1, le=16)             # B: K = 2^B entries per codebook
    group: int = Field(8, ge=1, le=64)              # g: input weights per vector
    scales: bool = True                             # one fp16 scale per output row
    codebook_bits: Literal[8, 16] = 16
    beam: int = Field(8, ge=1, le=256)
    passes: int = Field(1, ge=0, le=16)             # refinement sweeps after the first
    iters: int = Field(25, ge=0, le=1000)           # k-means steps per codebook at init
    seed: int = Field(0, ge=0, lt=2 ** 63)

    def build(self):
        return AQLM(self)


@dataclass
class AQLMParams:
    stored: torch.Tensor             # [M, K, g] int8 or fp16 (stored)
    cb_scale: torch.Tensor | None    # [M] fp16 (int8 codebooks)
    codebooks: torch.Tensor          # [M, K, g] float32 = load_codebook(stored, cb_scale)
    scale: torch.Tensor              # [rows] float32 (fp16 values; ones without scales)
    h: torch.Tensor                  # [cols] search weights (not stored)


def beam_search(t: torch.Tensor, h: torch.Tensor, C: torch.Tensor, beam: int, passes: int) -> torch.Tensor:
    """Codes [n, M] minimising Σ_j h[n,j] (t[n,j] − Σ_m C[m, c_m, j])² by beam search.

    t, h [n, g]; C [M, K, g]. The first sweep builds the sum codebook by codebook keeping the
    `beam` best hypotheses; each later sweep replaces one code at a time in every hypothesis."""
    n, g = t.shape
    M, K, _ = C.shape
    out = torch.empty(n, M, dtype=torch.int64, device=t.device)
    step = max(1, CHUNK // (beam * K))
    for a in range(0, n, step):
        out[a:a + step] = _beam(t[a:a + step], h[a:a + step], C, beam, passes)
    return out


def _beam(t, h, C, beam, passes):
    n, g = t.shape
    M, K, _ = C.shape
    codes = torch.zeros(n, 1, M, dtype=torch.int64, device=t.device)   # hypotheses [n, b, M]
    recon = torch.zeros(n, 1, g, device=t.device)
    csq = (C * C)                                                        # [M, K, g]
    for sweep in range(1 + passes):
        for m in range(M):
            first = sweep == 0
            base = recon if first else recon - C[m][codes[:, :, m]]      # the sum without code m
            r = t[:, None, :] - base                                     # [n, b, g]
            hr = h[:, None, :] * r
            err = (hr * r).sum(-1, keepdim=True) - 2 * hr @ C[m].T + h[:, None, :] @ csq[m].T   # [n, b, K]
            b = err.shape[1]
            keep = min(beam, b * K)
            best = err.reshape(n, b * K).topk(keep, dim=1, largest=False).indices            # [n, keep]
            src, entry = best // K, best % K
            codes = codes.gather(1, src[..., None].expand(-1, -1, M)).clone()
            codes[:, :, m] = entry
            recon = base.gather(1, src[..., None].expand(-1, -1, g)) + C[m][entry]
    return codes[:, 0]


def residual_kmeans(x: torch.Tensor, h: torch.Tensor, M: int, K: int, iters: int, gen: torch.Generator
                    ) -> torch.Tensor:
    """Codebooks [M, K, g]: codebook m is fit by weighted k-means to the residual of 0..m-1."""
    r = x.clone()
    books = []
    for _ in range(M):
        C, assign = weighted_kmeans(r, h, K, iters, gen)
        books.append(C)
        r = r - C[assign]
    return torch.stack(books)


class AQLM(Codec):
    name = "aqlm"

    def __init__(self, cfg: AQLMConfig):
        super().__init__(cfg)
        self.m, self.b, self.g = cfg.codebooks, cfg.code_bits, cfg.group
        self.k = 1 << cfg.code_bits
        self.group_size = None
        self.block_width = cfg.group
        self.seed = cfg.seed

    def for_run(self, ctx: RunContext) -> "AQLM":
        """Run seed s seeds k-means with `seed + s` (the context's "offset" derivation; run seed 0 is the
        spec's own `seed`); the run codec's config holds it, so its packs decode on their own."""
        seed = ctx.sub_seed("offset", self.seed)
        return self if seed == self.seed else AQLM(self.cfg.model_copy(update={"seed": seed}))

    def group_of(self, cols: int) -> int:
        if cols % self.g:
            raise ValueError(f"aqlm: {cols} columns are not a multiple of the vector size group={self.g}")
        return cols

    # -- parameters ------------------------------------------------------------------------------
    def row_scale(self, w: torch.Tensor) -> torch.Tensor:
        if not self.cfg.scales:
            return torch.ones(w.shape[0], device=w.device)
        s = w.float().pow(2).mean(1).sqrt().clamp(max=FP16_MAX).half().float()
        return torch.where(s > 0, s, torch.ones_like(s))

    def weights(self, importance: torch.Tensor | None, cols: int) -> torch.Tensor:
        if importance is None:
            return torch.ones(cols)
        h = importance.detach().float().cpu().clamp_min(0)
        return h + 1e-6 * float(h.mean()) + 1e-12

    def make_params(self, codebooks: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> AQLMParams:
        """Params holding what is stored: codebooks rounded to codebook_bits, scales to fp16."""
        stored, cb_scale = store_codebook(codebooks.detach().float().cpu(), self.cfg.codebook_bits)
        s = scale.detach().float().cpu()
        if self.cfg.scales:
            s = s.clamp(-FP16_MAX, FP16_MAX).half().float()
        else:
            s = torch.ones_like(s)
        return AQLMParams(stored, cb_scale, load_codebook(stored, cb_scale), s, h)

    def fit(self, w, importance=None):
        w = w.detach().float().cpu()
        rows, cols = w.shape
        s = self.row_scale(w)
        h = self.weights(importance, cols)
        x = (w / s[:, None]).reshape(-1, self.g)
        hv = h.reshape(1, cols // self.g, self.g).expand(rows, -1, -1).reshape(-1, self.g)
        gen = torch.Generator().manual_seed(self.seed)
        books = residual_kmeans(x, hv, self.m, self.k, self.cfg.iters, gen)
        return self.make_params(books, s, h)

    # -- codes -----------------------------------------------------------------------------------
    def search(self, w: torch.Tensor, params: AQLMParams, col: int) -> torch.Tensor:
        """Codes [rows, (c/g)·M] of columns col..col+c (M consecutive codes per vector)."""
        rows, c = w.shape
        if col % self.g or c % self.g:
            raise ValueError(f"aqlm quantizes whole {self.g}-column tiles: got columns {col}..{col + c}")
        dev = w.device
        s = params.scale.to(dev)
        t = (w.float() / s[:, None]).reshape(-1, self.g)
        h = params.h[col:col + c].to(dev).reshape(1, c // self.g, self.g).expand(rows, -1, -1).reshape(-1, self.g)
        codes = beam_search(t, h, params.codebooks.to(dev), self.cfg.beam, self.cfg.passes)
        return codes.reshape(rows, (c // self.g) * self.m)

    def values(self, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """s_r · Σ_m C_m[c] for codes [rows, V·M] (differentiable in codebooks and scale)."""
        rows = codes.shape[0]
        c = codes.reshape(rows, -1, self.m)
        vec = sum(codebooks[m][c[:, :, m]] for m in range(self.m))              # [rows, V, g]
        return vec.reshape(rows, -1) * scale[:, None]

    def quantize(self, w, params, col=0):
        codes = self.search(w, params, col)
        return Quantized(self.values(codes, params.codebooks.to(w.device), params.scale.to(w.device)), codes)

    def pack(self, codes, params):
        rows, n = codes.shape
        cols = n // self.m * self.g
        (p,) = params
        data = pack_wide(codes, self.b)
        data["codebook"] = p.stored
        if p.cb_scale is not None:
            data["codebook_scale"] = p.cb_scale
        if self.cfg.scales:
            data["scale"] = p.scale.half()
        return Packed(self.name, self.config(), (rows, cols), data)

    def decode(self, packed):
        rows, cols = packed.shape
        self.group_of(cols)
        n = rows * cols // self.g * self.m
        codes = unpack_wide(packed.data, self.b, n).reshape(rows, -1)
        books = load_codebook(packed.data["codebook"], packed.data.get("codebook_scale"))
        scale = packed.data["scale"].float() if "scale" in packed.data else torch.ones(rows)
        return self.values(codes.to(books.device), books, scale.to(books.device))
