"""Q5_K: super-blocks of 256 = 8 sub-blocks of 32 (176 bytes, 5.5 bits per weight).

Layout: fp16 d, fp16 dmin, scales[12] (as Q4_K), qh[32], qs[128]. Low 4 bits of the codes as Q4_K;
bit 4 of the code of weight 64i + 32s + l is bit 2i + s of qh[l]. Value of code q (0..31):
(d*sc_j)*q - (dmin*m_j).

Quantization is Q4_K's with nmax 31; the no-imatrix make_qkx2_quants uses rmin -0.5, rdelta 0.1,
nstep 15; the imatrix path caps the make_qp_quants codes at 63 (quantize_row_q5_K_impl).
"""
from __future__ import annotations

from quantatlas._lazy import torch

from quantatlas.quant.codecs.ggml.block_codec import fp16_bytes, nibbles
from quantatlas.quant.codecs.ggml.q4_k import Q4_K



class Q5_K(Q4_K):
    name = "q5_k"
    type_size = 176
    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    cap_imatrix_codes = True

    def to_bytes(self, codes, fields):
        c = codes.reshape(-1, 4, 2, 32)
        qs = nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)
        high = ((codes >> 4) & 1).reshape(-1, 8, 32)  # [B, 2i + s, l]
        qh = (high << torch.arange(8, dtype=torch.int32, device=codes.device)[:, None]).sum(1).to(torch.uint8)
        return torch.cat([fp16_bytes(fields["d"]), fp16_bytes(fields["dmin"]), fields["scales"], qh, qs], 1)

    def from_bytes(self, blocks):
        qh = blocks[:, 16:48].to(torch.int32)
        high = ((qh[:, None, :] >> torch.arange(8, dtype=torch.int32, device=qh.device)[:, None]) & 1).reshape(-1, 256)
        return self._low_nibbles(blocks[:, 48:176]) | (high << 4), self._fields(blocks)
