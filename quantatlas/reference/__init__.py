"""The embedded reference model: a small Qwen3-architecture byte-level LM trained on the
Python standard library, committed with its card so every machine measures the same model,
and the fixed eval / validation / calibration splits it is measured on (reference/data/)."""
from quantatlas.reference.corpus import BOS, EOS, VOCAB_SIZE, corpus_tokens, eval_fingerprint, fixed_tokens
from quantatlas.reference.model import CHECKPOINT_DIR, load_reference, reference_config

__all__ = ["BOS", "EOS", "VOCAB_SIZE", "corpus_tokens", "eval_fingerprint", "fixed_tokens",
           "CHECKPOINT_DIR", "load_reference", "reference_config"]
