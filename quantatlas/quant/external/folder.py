"""What the HF-folder formats (GPTQ, AWQ, compressed-tensors) share: tensors read from the folder's
safetensors by name, the architecture from config.json, and every stored tensor that is not part of a
quantized matrix taken as the parameter of the same name, with the values it stores."""
from __future__ import annotations

import torch

from quantatlas.quant.external.stored import FLOAT_DTYPES, ArtifactError
from quantatlas.quant.external.reader import Entry, Reader, same_architecture


class FolderReader(Reader):
    def __init__(self, listing):
        super().__init__(listing)
        self._open: dict = {}

    def _file(self, path):
        """The safetensors package's handle on one of the folder's files: opening it checks every header
        entry (a dtype it knows, offsets that tile the data, bytes that fit the shape)."""
        from safetensors import SafetensorError, safe_open

        f = self._open.get(path)
        if f is None:
            try:
                f = self._open[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
        return f

    def tensor(self, name: str) -> torch.Tensor:
        """A stored tensor as it is stored (dtype and shape)."""
        from safetensors import SafetensorError

        t = self.listing.tensors.get(name)
        if t is None:
            raise ArtifactError(f"tensor {name} is not in the artifact")
        f = self._file(t.file)
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{t.file}: tensor {name} cannot be read ({type(e).__name__}: {e})") from None

    def check(self, model, arm) -> None:
        same_architecture(self.listing, model)
        for path in self.listing.files:   # a header the package refuses, refused before anything runs
            self._file(path)

    def plain_entries(self, claimed: set[str]) -> list[Entry]:
        """Stored tensors outside the quantized matrices: each the parameter of its name (a tensor of
        another kind than plain numbers there is a tensor this format does not explain: refused)."""
        out = []
        for name, t in self.listing.tensors.items():
            if name in claimed:
                continue
            if t.dtype not in FLOAT_DTYPES:
                raise ArtifactError(f"tensor {name} ({t.dtype}) belongs to no quantized matrix this "
                                    f"{self.listing.format} reader knows")
            out.append(Entry(name, (name,), t.shape, False))
        return out

    def decode(self, entry: Entry) -> torch.Tensor:
        return self.tensor(entry.stored[0]).float()
