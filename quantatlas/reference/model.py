"""The reference model's architecture and checkpoint loading."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantatlas.errors import UserError
from quantatlas.reference.corpus import BOS, EOS, VOCAB_SIZE

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"


class MissingCheckpointError(UserError):
    """The spec's `model: reference`, but the committed checkpoint is not there (train it)."""


def reference_config():
    """Qwen3 architecture (q_norm/k_norm, GQA, SwiGLU), byte vocabulary, ~4.8 M parameters."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        attention_dropout=0.0,
    )


def load_reference(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the committed checkpoint (stored fp16) and return the model in eval mode."""
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    weights = CHECKPOINT_DIR / "model.safetensors"
    if not weights.exists():
        raise MissingCheckpointError(
            f"model 'reference': {weights} is missing; train it with `quantatlas reference train`", "model")
    config = Qwen3Config(**json.loads((CHECKPOINT_DIR / "config.json").read_text()))
    model = Qwen3ForCausalLM(config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(dtype=dtype, device=device).eval()
