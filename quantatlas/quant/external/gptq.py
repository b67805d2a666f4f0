"""HF GPTQ checkpoints (AutoGPTQ, GPTQModel, AutoRound's auto_gptq export): per Linear `qweight`,
`qzeros`, `scales` and `g_idx`, decoded as the GPTQ kernels define them:

    qweight  int32 [in·b/32, out]   b-bit codes q, packed along the input dimension (packing.py)
    qzeros   int32 [G, out·b/32]    b-bit zero points, packed along the output dimension
    scales   fp16  [G, out]
    g_idx    int32 [in]             the group of each input column (act-order permutes them);
                                    absent: column i is in group i // group_size

    W[o, i] = scales[g, o] · (q[i, o] − z[g, o]),   g = g_idx[i]

`checkpoint_format: gptq` (v1, the default) stores every zero point less one (AutoGPTQ's pack does
`zeros -= 1`; its kernels add the 1 back after unpacking, so a stored 2^b − 1 reads as 2^b):
z = stored + 1. `gptq_v2` (GPTQModel) stores z itself. Computed in float32, which is exact (a
fp16 scale times an integer below 2^9 needs at most 20 significant bits), then held in the model's
dtype.
"""
from __future__ import annotations

import torch

from quantatlas.quant.external.folder import FolderReader
from quantatlas.quant.external.packing import unpack_stream
from quantatlas.quant.external.stored import ArtifactError
from quantatlas.quant.external.reader import Entry

PARTS = ("qweight", "qzeros", "scales", "g_idx")


class GPTQReader(FolderReader):
    def entries(self, model) -> list[Entry]:
        bits = self.listing.decode["bits"]
        out, claimed = [], set()
        for name, t in self.listing.tensors.items():
            if not name.endswith(".qweight"):
                continue
            module = name.removesuffix(".qweight")
            have = {p: f"{module}.{p}" for p in PARTS if f"{module}.{p}" in self.listing.tensors}
            for p in ("qzeros", "scales"):
                if p not in have:
                    raise ArtifactError(f"tensor {name} has no {module}.{p} beside it")
            if len(t.shape) != 2 or t.dtype != "I32" or t.shape[0] * 32 % bits or 0 in t.shape:
                raise ArtifactError(f"tensor {name} is {t.dtype} {list(t.shape)}, not int32 [in·{bits}/32, out]")
            shape = (t.shape[1], t.shape[0] * 32 // bits)    # [out, in]
            self._check_groups(module, shape, bits)
            out.append(Entry(f"{module}.weight", tuple(have.values()), shape, True))
            claimed.update(have.values())
        return out + self.plain_entries(claimed)

    def _check_groups(self, module: str, shape: tuple[int, int], bits: int) -> None:
        """scales [G, out], qzeros [G, out·b/32] and g_idx [in] with values below G, or refused."""
        out_f, in_f = shape
        tensors = self.listing.tensors
        scales, zeros = tensors[f"{module}.scales"], tensors[f"{module}.qzeros"]
        n_groups = scales.shape[0] if len(scales.shape) == 2 else -1
        if scales.shape != (n_groups, out_f) or zeros.shape != (n_groups, -(-out_f * bits // 32)):
            raise ArtifactError(f"tensor {module}.scales {list(scales.shape)} / {module}.qzeros {list(zeros.shape)} "
                                f"do not fit qweight's [{in_f}, {out_f}] at {bits} bits")
        if zeros.dtype != "I32":
            raise ArtifactError(f"tensor {module}.qzeros is {zeros.dtype}, not int32 (packed zero points)")
        if f"{module}.g_idx" in tensors:
            g = self.tensor(f"{module}.g_idx")
            if g.dtype.is_floating_point or g.dtype.is_complex or g.dtype == torch.bool:
                raise ArtifactError(f"tensor {module}.g_idx is {tensors[f'{module}.g_idx'].dtype}, not integer "
                                    "group indices")
            if tuple(g.shape) != (in_f,) or int(g.min()) < 0 or int(g.max()) >= n_groups:
                values = f" with values in [{int(g.min())}, {int(g.max())}]" if g.numel() else ""
                raise ArtifactError(f"tensor {module}.g_idx: {list(g.shape)}{values}, not one group of {n_groups} "
                                    f"for each of {in_f} inputs")
        elif -(-in_f // self._group_size(in_f)) != n_groups:
            raise ArtifactError(f"tensor {module}.scales has {n_groups} groups, group_size "
                                f"{self.listing.decode['group_size']} makes {-(-in_f // self._group_size(in_f))}")

    def _group_size(self, in_f: int) -> int:
        size = self.listing.decode["group_size"]
        return size if size > 0 else in_f   # -1: one group per row

    def decode(self, entry: Entry) -> torch.Tensor:
        if not entry.quantized:
            return super().decode(entry)
        d = self.listing.decode
        bits, out_f, in_f = d["bits"], entry.shape[0], entry.shape[1]
        module = entry.param.removesuffix(".weight")
        q = unpack_stream(self.tensor(f"{module}.qweight"), bits, in_f, dim=0)        # [in, out]
        scales = self.tensor(f"{module}.scales").float()                               # [G, out]
        z = unpack_stream(self.tensor(f"{module}.qzeros"), bits, out_f, dim=1)         # [G, out]
        if d["checkpoint_format"] == "gptq":
            z = z + 1
        if f"{module}.g_idx" in self.listing.tensors:
            g = self.tensor(f"{module}.g_idx").long()
        else:
            g = torch.arange(in_f) // self._group_size(in_f)
        w = scales[g] * (q - z[g]).float()                                              # [in, out]
        return w.t().contiguous()
