"""The embedded reference models: small byte-level LMs trained on the Python standard library,
one per architecture (`reference`: Qwen3; `reference-llama`: Llama; `reference-moe`: Qwen3-MoE; see
model.py), each committed with its card so every machine measures the same model,
and the fixed eval / validation / calibration splits it is measured on (reference/data/;
`reference.splits` gives the token streams by split; it is not imported here, so that
`python -m quantatlas.reference.data` runs a module the package has not loaded yet)."""
from quantatlas.reference.corpus import BOS, EOS, VOCAB_SIZE, eval_fingerprint
from quantatlas.reference.model import (CHECKPOINT_DIR, ZOO_ARCH, is_reference_model, load_reference,
                                        reference_config)

__all__ = ["BOS", "EOS", "VOCAB_SIZE", "eval_fingerprint", "CHECKPOINT_DIR", "ZOO_ARCH", "is_reference_model",
           "load_reference", "reference_config"]
