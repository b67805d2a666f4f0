"""What every ggml block codec shares: blocks along rows, ggml's bytes per block.

A block is `group_size` consecutive weights of one row (32, or a 256-weight super-block).
A format implements five small pieces:

    fit_blocks(x [B, g], qw [B, g] | None, sigma2 [B] | None) -> BlockFit   ggml's search
    rule_codes(x, fit, col)           ggml's final coding step for weights x (columns col..)
    values(codes, fields, col)        ggml's dequantize_row_* for those codes
    to_bytes(codes, fields)           ggml's block layout, uint8 [B, type_size]
    from_bytes(blocks)                the inverse: (codes, fields)

A format takes no options: defining the class registers a config of that name (`{q4_k: {}}`).
`ggml_type` names its entry in the `gguf` package's GGMLQuantizationType (the one table of
ggml types: export and the web read it from the formats; a test checks the sizes).

`fit` -> `quantize` -> `pack` reproduce ggml's bytes; `encode` does the same in one pass over
all blocks of a matrix (fit_blocks is vectorised over blocks, rows included) and, for the
legacy formats with an imatrix, hands over ggml's whole-row mean of x^2 (`fit` on a lone group
can only use that group's mean). `importance` is llama.cpp's imatrix: per-column mean of x^2.

Source: ggml/src/ggml-quants.c and ggml-common.h of llama.cpp (the quantize_* entry points that
llama-quantize calls: *_ref without an imatrix, *_impl with one; IQ4_NL/IQ4_XS always ntry = 7).
"""
from __future__ import annotations

from dataclasses import dataclass

from quantatlas._lazy import torch

from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.config import CodecConfig
from quantatlas.quant.codecs.ggml.cfloat import fdiv, seq_sum


@dataclass
class BlockFit:
    """The fit of B blocks: stored fields, ggml's codes for the fitted weights, the coding rule."""

    fields: dict[str, torch.Tensor]  # per block (leading dim B): stored fp16 scales, scale bytes, ... (+ derived grid)
    codes: torch.Tensor              # [B, g] int32, the codes ggml stores for the fitted weights
    rule: dict[str, torch.Tensor]    # per block: what `rule_codes` needs to code new weights

    @staticmethod
    def stack(fits: list[BlockFit]) -> BlockFit:
        """One fit per column group (each [rows, ...]) -> one fit over blocks in row-major order."""
        def cat(ts):
            return torch.stack(ts, 1).flatten(0, 1)
        return BlockFit({k: cat([f.fields[k] for f in fits]) for k in fits[0].fields},
                        cat([f.codes for f in fits]),
                        {k: cat([f.rule[k] for f in fits]) for k in fits[0].rule})


def fp16_bytes(h: torch.Tensor) -> torch.Tensor:
    """[B] float16 -> [B, 2] uint8, little-endian as ggml_half is stored."""
    return h.contiguous().view(torch.uint8).reshape(-1, 2)


def bytes_fp16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 -> [B] float16."""
    return b.contiguous().view(torch.float16).reshape(-1)


def nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8)


def per_weight(t: torch.Tensor, g: int, col: int, c: int) -> torch.Tensor:
    """Per-sub-block values [B, nsub] spread over the weights they cover, columns col..col+c."""
    sub = g // t.shape[1]
    if col == 0 and c == g:
        return t.repeat_interleave(sub, dim=1)
    return t[:, torch.arange(col, col + c, device=t.device) // sub]


#: every ggml format by name (each BlockCodec subclass with a `name` adds itself)
FORMATS: dict[str, type[BlockCodec]] = {}


def formats() -> dict[str, type[BlockCodec]]:
    """The ggml formats we implement, by name: the one table of ggml types (block, type_size,
    ggml_type) that export, the web and gguf_mix read."""
    from quantatlas.quant.config import load_families

    load_families()
    return FORMATS


class BlockCodec(Codec):
    """Base of the ggml formats; `group_size` weights per block, `type_size` bytes per block."""

    type_size: int
    #: the GGMLQuantizationType member of this format (upper-case name, e.g. "Q4_K")
    ggml_type: str
    #: ggml's imatrix path for Q4_0/Q4_1/Q5_0/Q5_1 weights with the mean of x^2 over the whole row
    uses_row_sigma2 = False
    #: weights per step of `encode`, to bound temporary memory on large matrices
    encode_chunk = 1 << 20

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a format: register its (option-free) config
            cls.ggml_type = cls.name.upper()
            FORMATS[cls.name] = cls
            type(f"{cls.__name__}Config", (CodecConfig,), {"__module__": cls.__module__, "name": cls.name,
                                                          "build": lambda self, codec=cls: codec(self)})

    def fit_blocks(self, x, qw, sigma2) -> BlockFit:
        raise NotImplementedError

    def rule_codes(self, x, fit: BlockFit, col: int) -> torch.Tensor:
        raise NotImplementedError

    def values(self, codes, fields, col: int) -> torch.Tensor:
        raise NotImplementedError

    def to_bytes(self, codes, fields) -> torch.Tensor:
        raise NotImplementedError

    def from_bytes(self, blocks) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # -- the codec interface --------------------------------------------------------------
    def fit(self, w, importance=None):
        x = w.detach().float()
        if x.dim() != 2 or x.shape[1] != self.group_size:
            raise ValueError(f"{self.name}: fit takes blocks of {self.group_size} columns, got shape "
                             f"{tuple(x.shape)}")
        qw = None if importance is None else self._importance(importance, x.shape[1], x).expand_as(x)
        return self.fit_blocks(x, qw, None)

    def quantize(self, w, params: BlockFit, col=0):
        codes = self.rule_codes(w.detach().float(), params, col)
        return Quantized(self.values(codes, params.fields, col), codes)

    def pack(self, codes, params):
        rows, cols = codes.shape
        g = self.group_of(cols)
        if len(params) != cols // g:
            raise ValueError(f"{self.name}: pack needs one fit per group ({cols // g}), got {len(params)}")
        fit = BlockFit.stack(list(params))
        return self._packed(self.to_bytes(codes.reshape(-1, g), fit.fields), rows, cols)

    def encode(self, w, importance=None):
        w = w.detach().float()
        rows, cols = w.shape
        g = self.group_of(cols)
        nb = cols // g
        imp = None if importance is None else self._importance(importance, cols, w).reshape(1, nb, g)
        row_sigma2 = None
        if imp is not None and self.uses_row_sigma2:  # sum over the row, left to right, / n_per_row
            row_sigma2 = fdiv(seq_sum(w * w), float(cols))
        step = max(1, self.encode_chunk // cols)
        out = []
        for r in range(0, rows, step):
            xr = w[r:r + step]
            n = xr.shape[0]
            qw = None if imp is None else imp.expand(n, nb, g).reshape(n * nb, g)
            s2 = None if row_sigma2 is None else row_sigma2[r:r + n].repeat_interleave(nb)
            fit = self.fit_blocks(xr.reshape(n * nb, g), qw, s2)
            out.append(self.to_bytes(fit.codes, fit.fields).reshape(n, nb * self.type_size))
        return self._packed(torch.cat(out), rows, cols, reshaped=True)

    def decode(self, packed):
        rows, cols = packed.shape
        self.group_of(cols)
        codes, fields = self.from_bytes(packed.data["blocks"].reshape(-1, self.type_size))
        return self.values(codes, fields, 0).reshape(rows, cols)

    # -- helpers ------------------------------------------------------------------------------
    def _importance(self, importance, n, like):
        imp = torch.as_tensor(importance).detach().float().to(like.device).reshape(-1)
        if imp.numel() != n:
            raise ValueError(f"{self.name}: importance has {imp.numel()} entries for {n} columns")
        return imp

    def _packed(self, blocks, rows, cols, reshaped=False):
        blocks = blocks if reshaped else blocks.reshape(rows, -1)
        return Packed(self.name, self.config(), (rows, cols), {"blocks": blocks.to(torch.uint8)})
