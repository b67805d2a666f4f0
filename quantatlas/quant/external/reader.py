"""What a format's reader is: which model parameter each stored tensor (or group of tensors) becomes,
its shape, whether it is quantized, and its decoded values (one subclass per format)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantatlas.quant.external.stored import ArtifactError, Listing


@dataclass(frozen=True)
class Entry:
    """One model parameter as the artifact stores it."""
    param: str                  # the model's parameter name ("model.layers.0.self_attn.q_proj.weight")
    stored: tuple[str, ...]     # the artifact's tensors it is decoded from (their bytes are its bits)
    shape: tuple[int, ...]      # the shape it decodes to ([out, in] for a matrix)
    quantized: bool             # stored as codes (its bytes count in bits per weight)


class Reader:
    """A format's reading of a listing against a model (one subclass per format)."""
    #: stored tensors that need no parameter (llama.cpp's rope_freqs: derived from the config)
    free: frozenset[str] = frozenset()

    def __init__(self, listing: Listing):
        self.listing = listing

    def check(self, model, arm) -> None:
        """Raise ArtifactError where the artifact cannot stand for the model (another architecture), or
        holds what this arm would not apply (an activation scheme without `act:`)."""

    def entries(self, model) -> list[Entry]:
        raise NotImplementedError

    def decode(self, entry: Entry) -> torch.Tensor:
        """The parameter's values, float32, `entry.shape`, as the format defines them."""
        raise NotImplementedError


def same_architecture(listing: Listing, model) -> None:
    """An HF folder's config.json model_type against the model's."""
    mine = getattr(getattr(model, "config", None), "model_type", None)
    if listing.arch is not None and mine is not None and listing.arch != mine:
        raise ArtifactError(f"the artifact is a {listing.arch} model (config.json model_type), the spec's model "
                            f"is {mine}")
