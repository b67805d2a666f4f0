"""The embedded reference models' architectures and checkpoint loading.

The zoo: one byte-level LM per architecture, all trained on the same corpus with the same trainer
and budget (train.py), each committed with its card in its own folder:

| `model:` name     | `--arch`    | architecture                                                        |
|-------------------|-------------|---------------------------------------------------------------------|
| `reference`       | `qwen3`     | Qwen3 (q_norm/k_norm, GQA, SwiGLU, RoPE), ~4.85 M parameters        |
| `reference-llama` | `llama`     | Llama: the same shapes without q/k norms (keys keep outlier channels)|
| `reference-moe`   | `qwen3_moe` | Qwen3-MoE: the same attention, 8 SwiGLU experts of width 256, top-2  |

Every member shares the attention shapes (6 layers, hidden 256, 4 query / 2 KV heads of width 64),
the byte vocabulary and the context, so a finding can be compared across them with only the
architecture changed. The MoE's expert width is 256 (a multiple of llama.cpp's 256-wide k-quant
super-block) and its size keeps the checkpoint under 25 MB in fp16; it is active at ~3.6 M
parameters per token (all 8 experts: ~10.8 M).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantatlas.errors import UserError
from quantatlas.reference.corpus import BOS, EOS, VOCAB_SIZE

HERE = Path(__file__).parent
CHECKPOINT_DIR = HERE / "checkpoint"
ARCHES = ("qwen3", "llama", "qwen3_moe")
#: `model:` name of each architecture's embedded checkpoint
ZOO_NAME = {"qwen3": "reference", "llama": "reference-llama", "qwen3_moe": "reference-moe"}
ZOO_ARCH = {name: arch for arch, name in ZOO_NAME.items()}
#: checkpoint folder of each architecture but qwen3 (whose folder is CHECKPOINT_DIR, read when asked)
_ZOO_FOLDERS = {"llama": "checkpoint-llama", "qwen3_moe": "checkpoint-moe"}
ARCHITECTURE_LINES = {
    "qwen3": "Qwen3ForCausalLM (q_norm/k_norm, GQA, SwiGLU, RoPE)",
    "llama": "LlamaForCausalLM (no q/k norms, GQA, SwiGLU, RoPE)",
    "qwen3_moe": "Qwen3MoeForCausalLM (q_norm/k_norm, GQA, RoPE, mixture of SwiGLU experts, softmax top-k router)",
}


class MissingCheckpointError(UserError):
    """The spec names an embedded model (`model: reference` ...), but its committed checkpoint is not there
    (train it)."""


def is_reference_model(name: str) -> bool:
    """Whether `name` (a spec's `model:`) is one of the embedded byte-level models."""
    return name in ZOO_ARCH


def checkpoint_dir(arch: str = "qwen3") -> Path:
    """The committed checkpoint folder of an architecture."""
    if arch not in ARCHES:
        raise ValueError(f"unknown reference architecture {arch!r}; expected one of {', '.join(ARCHES)}")
    return CHECKPOINT_DIR if arch == "qwen3" else HERE / _ZOO_FOLDERS[arch]


def _common_shapes() -> dict:
    """What every member of the zoo shares: byte vocabulary, attention shapes, context, norms, special tokens."""
    return dict(vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
                attention_dropout=0.0)


def reference_config(arch: str = "qwen3"):
    """qwen3: Qwen3 (q_norm/k_norm, GQA, SwiGLU), byte vocabulary, ~4.8 M parameters; llama: the same shapes
    as Llama (no q/k norms, no biases); qwen3_moe: Qwen3-MoE with every MLP a mixture of 8 experts, top-2."""
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(intermediate_size=768, **_common_shapes())
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=768, attention_bias=False, mlp_bias=False, **_common_shapes())
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        # every layer sparse (decoder_sparse_step 1, no mlp_only_layers); the top-2 weights renormalised to sum
        # to 1 as the released Qwen3-MoE models do. The load-balancing loss (train.load_balancing_loss, per layer)
        # has weight 0.1, not the family's default 0.001: with 0.001 (and transformers' loss, pooled over layers)
        # this small model's routers collapsed in the 1000 steps (an expert of layer 4 got no token of the
        # validation text, two experts of layer 2 got 88 % of them), and with 0.01 per layer four experts still
        # got under 0.1 % of the validation tokens; at 0.1 every expert gets 2-20 % (card.json's check)
        return Qwen3MoeConfig(intermediate_size=768, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                              router_aux_loss_coef=0.1, **_common_shapes())
    raise ValueError(f"unknown reference architecture {arch!r}; expected one of {', '.join(ARCHES)}")


def causal_lm_class(arch: str):
    """The transformers class of an architecture."""
    import transformers

    names = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    if arch not in names:
        raise ValueError(f"unknown reference architecture {arch!r}; expected one of {', '.join(ARCHES)}")
    return getattr(transformers, names[arch])


def config_from_file(arch: str, path: Path):
    """A checkpoint's config.json as the architecture's config class."""
    return type(reference_config(arch))(**json.loads(Path(path).read_text()))


def active_parameters(model) -> int:
    """Parameters one token uses: all of them in a dense model; in a mixture, the router's top-k of each
    layer's experts (each expert the same size, so k / n_experts of the expert tensors)."""
    cfg = model.config
    n_experts = getattr(cfg, "num_experts", None)
    total = sum(p.numel() for p in model.parameters())
    if not n_experts:
        return total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return total - expert + expert * cfg.num_experts_per_tok // n_experts


def reference_weights(name: str = "reference") -> Path:
    """The committed weights file of an embedded model, by its `model:` name."""
    if name not in ZOO_ARCH:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {', '.join(ZOO_ARCH)}")
    return checkpoint_dir(ZOO_ARCH[name]) / "model.safetensors"


def load_reference(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", name: str = "reference"):
    """Load an embedded model's committed checkpoint (stored fp16) by its `model:` name, in eval mode."""
    from safetensors.torch import load_file

    weights = reference_weights(name)
    arch = ZOO_ARCH[name]
    if not weights.exists():
        how = "`quantatlas reference train`" if arch == "qwen3" else f"`quantatlas reference train --arch {arch}`"
        raise MissingCheckpointError(f"model {name!r}: {weights} is missing; train it with {how}", "model")
    config = config_from_file(arch, weights.parent / "config.json")
    model = causal_lm_class(arch)(config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(dtype=dtype, device=device).eval()
