"""Train the reference model reproducibly on CPU (or a GPU when there is one).

    quantatlas reference train --steps 1000 --seed 0

Writes checkpoint/model.safetensors (fp16), checkpoint/config.json and checkpoint/CARD.md.
Training reads the running interpreter's standard library (train split); the validation
bits per byte are measured on the fixed validation split shipped with the package, so the
number is comparable across machines:

    python -m quantatlas.reference.train validate     # the committed checkpoint's validation bpb
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from quantatlas.reference.corpus import corpus_files, stdlib_tokens
from quantatlas.reference.model import CHECKPOINT_DIR, reference_config
from quantatlas.reference.splits import fixed_tokens


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_tokens: int = 131072
    device: str = "cpu"


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def bits_per_byte(model, tokens: np.ndarray, seq_len: int, device) -> float:
    """Mean NLL in bits over every predicted token of non-overlapping windows."""
    n = (len(tokens) - 1) // seq_len
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = [tokens[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(n, i + 8))]
        x = torch.from_numpy(np.stack(rows)).to(device)
        logits = model(x[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total / count / math.log(2)


def train(cfg: TrainConfig, out_dir: Path = CHECKPOINT_DIR, progress=None) -> dict:
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    config = reference_config()
    model = Qwen3ForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    train_tokens = stdlib_tokens("train")
    val_tokens = fixed_tokens("validation", cfg.val_tokens + 1)
    rng = np.random.default_rng(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        starts = rng.integers(0, len(train_tokens) - cfg.seq_len - 1, size=cfg.batch_size)
        x = torch.from_numpy(np.stack([train_tokens[s:s + cfg.seq_len + 1] for s in starts])).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = model(x[:, :-1], labels=None).logits.float()
        loss = torch.nn.functional.cross_entropy(loss.reshape(-1, loss.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if progress is not None:
            progress(step + 1, cfg.steps, loss.item())
    seconds = time.time() - t0
    model.eval()
    model = model.to(torch.float16).to(torch.float32)  # evaluate exactly what is stored
    val_bpb = bits_per_byte(model, val_tokens, cfg.seq_len, device)

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config.to_diff_dict(), indent=2, sort_keys=True) + "\n")
    card = {
        "architecture": "Qwen3ForCausalLM (q_norm/k_norm, GQA, SwiGLU, RoPE)",
        "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "max_position_embeddings")},
        "parameters": n_params,
        "train": asdict(cfg),
        "training_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "corpus": f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library sources "
                  f"({len(corpus_files('train'))} train / {len(corpus_files('validation'))} validation / "
                  f"{len(corpus_files('eval'))} eval files), byte tokens, BOS/EOS around each file; "
                  f"validation and eval are the fixed splits shipped in quantatlas/reference/data "
                  f"(cut from {_fixed_source()})",
        "train_corpus_tokens": int(len(train_tokens)),
        "validation_bits_per_byte": round(val_bpb, 4),
        "validation_tokens_scored": int(((len(val_tokens) - 1) // cfg.seq_len) * cfg.seq_len),
        "validation_split_sha256": _fixed_sha256("validation"),
        "train_seconds": round(seconds, 1),
        "device": str(device),
        "torch": torch.__version__,
        "stored_dtype": "float16",
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "CARD.md").write_text(_card_markdown(card))
    return card


def _fixed_source() -> str:
    from quantatlas.reference import data

    return data.manifest()["built_from"]


def _fixed_sha256(name: str) -> str:
    from quantatlas.reference import data

    return data.manifest()["files"][name]["sha256"]


def validation_bpb(model=None, val_tokens: int | None = None, seq_len: int | None = None) -> float:
    """Bits per byte of `model` (default: the committed checkpoint) on the fixed validation split,
    with the card's val_tokens and seq_len unless given."""
    from quantatlas.reference.model import load_reference

    card = json.loads((CHECKPOINT_DIR / "card.json").read_text())
    val_tokens = val_tokens or card["train"]["val_tokens"]
    seq_len = seq_len or card["train"]["seq_len"]
    model = model if model is not None else load_reference()
    return bits_per_byte(model, fixed_tokens("validation", val_tokens + 1), seq_len, "cpu")


def _card_markdown(card: dict) -> str:
    c = card["config"]
    t = card["train"]
    return f"""# quantatlas reference model

- Architecture: {card['architecture']}; {c['num_hidden_layers']} layers, hidden {c['hidden_size']},
  MLP {c['intermediate_size']}, {c['num_attention_heads']} query heads / {c['num_key_value_heads']} KV heads of
  width {c['head_dim']}, context {c['max_position_embeddings']}, untied embeddings.
- Vocabulary: {c['vocab_size']} tokens (256 bytes, BOS=256, EOS=257).
- Parameters: {card['parameters']:,}; stored as {card['stored_dtype']} safetensors.
- Corpus: {card['corpus']}.
- Training: {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens = {card['training_tokens']:,} tokens,
  AdamW (lr {t['lr']} cosine to {t['min_lr']}, warmup {t['warmup']}, wd {t['weight_decay']}), seed {t['seed']},
  on {card['device']} in {card['train_seconds']} s with torch {card['torch']}.
- Validation: {card['validation_bits_per_byte']} bits per byte over {card['validation_tokens_scored']:,} tokens
  of the fixed validation split shipped in `quantatlas/reference/data/` (the fp16 weights as stored;
  `python -m quantatlas.reference.train validate` measures it).

Reproduce: `quantatlas reference train --steps {t['steps']} --seed {t['seed']}`.
"""


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["validate"]:
        print("usage: python -m quantatlas.reference.train validate", file=sys.stderr)
        raise SystemExit(2)
    _card = json.loads((CHECKPOINT_DIR / "card.json").read_text())
    print(f"validation bits per byte: {validation_bpb():.4f} over {_card['train']['val_tokens']:,} tokens "
          f"of the fixed validation split (seq_len {_card['train']['seq_len']})")
