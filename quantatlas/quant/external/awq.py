"""AutoAWQ checkpoints in its GEMM layout (AutoAWQ, AutoRound's auto_awq export, transformers'
AwqConfig version "gemm"): per Linear

    qweight  int32 [in, out/8]      4-bit codes, packed along the output dimension, eight per word in
                                    AWQ's order: nibble i holds column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]
    qzeros   int32 [G, out/8]       4-bit zero points, packed the same way
    scales   fp16  [G, out]         G = in / group_size; input row i is in group i // group_size

    W[o, i] = (q[i, o] − z[g, o]) · scales[g, o],   g = i // group_size

(AutoAWQ's `dequantize_gemm`: unpack, undo the order, subtract, scale; its zeros are stored as they
are.) Computed in float32, exact, then held in the model's dtype.
"""
from __future__ import annotations

import torch

from quantatlas.quant.external.folder import FolderReader
from quantatlas.quant.external.packing import awq_columns, unpack_stream
from quantatlas.quant.external.stored import ArtifactError
from quantatlas.quant.external.reader import Entry


class AWQReader(FolderReader):
    def entries(self, model) -> list[Entry]:
        group = self.listing.decode["group_size"]
        out, claimed = [], set()
        tensors = self.listing.tensors
        for name, t in tensors.items():
            if not name.endswith(".qweight"):
                continue
            module = name.removesuffix(".qweight")
            parts = [f"{module}.{p}" for p in ("qweight", "qzeros", "scales")]
            if any(p not in tensors for p in parts):
                raise ArtifactError(f"tensor {name} has no {module}.qzeros and {module}.scales beside it")
            if len(t.shape) != 2 or t.dtype != "I32" or 0 in t.shape:
                raise ArtifactError(f"tensor {name} is {t.dtype} {list(t.shape)}, not int32 [in, out/8]")
            in_f, out_f = t.shape[0], t.shape[1] * 8
            n_groups = -(-in_f // group) if group > 0 else 1
            zeros, scales = tensors[parts[1]], tensors[parts[2]]
            if zeros.shape != (n_groups, t.shape[1]) or scales.shape != (n_groups, out_f):
                raise ArtifactError(f"tensor {module}.qzeros {list(zeros.shape)} / {module}.scales "
                                    f"{list(scales.shape)} do not fit qweight's [{in_f}, {out_f}] in groups of {group}")
            if zeros.dtype != "I32":
                raise ArtifactError(f"tensor {module}.qzeros is {zeros.dtype}, not int32 (packed zero points)")
            out.append(Entry(f"{module}.weight", tuple(parts), (out_f, in_f), True))
            claimed.update(parts)
        return out + self.plain_entries(claimed)

    def decode(self, entry: Entry) -> torch.Tensor:
        if not entry.quantized:
            return super().decode(entry)
        out_f, in_f = entry.shape
        group = self.listing.decode["group_size"]
        module = entry.param.removesuffix(".weight")
        q = awq_columns(unpack_stream(self.tensor(f"{module}.qweight"), 4, out_f, dim=1))    # [in, out]
        z = awq_columns(unpack_stream(self.tensor(f"{module}.qzeros"), 4, out_f, dim=1))     # [G, out]
        scales = self.tensor(f"{module}.scales").float()                                      # [G, out]
        g = torch.arange(in_f) // (group if group > 0 else in_f)
        w = (q - z[g]).float() * scales[g]
        return w.t().contiguous()
