"""A GGUF file's tensors as the model's parameters.

Names: llama.cpp's tensor names map back to parameter names through the same table our GGUF writer
uses (quantatlas.export.gguf: the model layout's roles and norm positions, spelled as the `gguf`
package's TENSOR_NAMES), inverted. Values: the `gguf` package's dequantizer for the tensor's ggml
type (every type it implements: F32, F16, BF16, Q4_0 … Q8_0, the k-quants, IQ*, TQ*, MXFP4, ...).
Llama's q/k rows were permuted by convert_hf_to_gguf.py from HF's rotate-half RoPE layout to ggml's
interleaved one; they are permuted back here (the writer's `llama_permute`, inverted).
"""
from __future__ import annotations

import numpy as np
import torch

from quantatlas.quant.external.stored import FLOAT_DTYPES, ArtifactError
from quantatlas.quant.external.reader import Entry, Reader


def llama_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `quantatlas.export.gguf.llama_permute(rows, n_head)` on the leading axis."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class GGUFReader(Reader):
    free = frozenset({"rope_freqs.weight"})   # llama3 RoPE factors: computed from the config, not a parameter

    def __init__(self, listing):
        super().__init__(listing)
        self._file = None
        self._heads: dict[str, int] = {}

    def _tensors(self):
        if self._file is None:
            import gguf

            self._file = {t.name: t for t in gguf.GGUFReader(str(self.listing.path)).tensors}
        return self._file

    def check(self, model, arm) -> None:
        from quantatlas.export.gguf import gguf_arch

        try:
            arch = gguf_arch(model)
        except ValueError:
            raise ArtifactError(f"the spec's model ({getattr(model.config, 'model_type', '?')}) is not an "
                                "architecture whose llama.cpp tensor names quantatlas knows") from None
        if self.listing.arch != arch:
            raise ArtifactError(f"the artifact is a {self.listing.arch!r} model (general.architecture), the spec's "
                                f"model is {arch!r}")

    def entries(self, model) -> list[Entry]:
        from quantatlas.export.gguf import gguf_arch, gguf_tensor_names
        from quantatlas.models.layout import layout

        try:
            names = {g: p for p, g in gguf_tensor_names(model).items()}
        except ValueError as e:   # a parameter the writer's table cannot name (an MoE expert tensor, ...)
            raise ArtifactError(str(e).removeprefix("gguf export: ")) from None
        if gguf_arch(model) == "llama":   # rows the writer permuted, with their head count
            for layer in layout(model).layers:
                for role, heads in (("q", layer.n_heads), ("k", layer.n_kv_heads)):
                    if role in layer.matrices:
                        for suffix in ("weight", "bias"):
                            self._heads[f"{layer.matrices[role].name}.{suffix}"] = heads
        out = []
        for name, t in self.listing.tensors.items():
            if name in names:
                out.append(Entry(names[name], (name,), t.shape, t.dtype not in FLOAT_DTYPES))
                if t.dtype not in FLOAT_DTYPES:
                    self._probe(name)
        return out

    def _probe(self, name: str) -> None:
        """Refuse, before anything runs, a ggml type the gguf package cannot dequantize (one row tried)."""
        import gguf

        t = self._tensors()[name]
        try:
            gguf.quants.dequantize(np.asarray(t.data)[:1], t.tensor_type)
        except NotImplementedError:
            raise ArtifactError(f"tensor {name}: the gguf package cannot dequantize {t.tensor_type.name}") from None

    def decode(self, entry: Entry) -> torch.Tensor:
        import gguf

        t = self._tensors()[entry.stored[0]]
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(entry.shape)
        if entry.param in self._heads:
            values = llama_unpermute(values, self._heads[entry.param])
        return torch.from_numpy(np.array(values, dtype=np.float32))   # a writable copy of the memory-mapped file
