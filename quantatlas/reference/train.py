"""Train the reference models reproducibly on CPU (or a GPU when there is one).

    quantatlas reference train --steps 1000 --seed 0                   # reference (qwen3)
    quantatlas reference train --arch llama --steps 1000 --seed 0      # reference-llama
    quantatlas reference train --arch qwen3_moe --steps 1000 --seed 0  # reference-moe

Writes <checkpoint>/model.safetensors (fp16), config.json, card.json and CARD.md, where <checkpoint>
is the architecture's folder (model.checkpoint_dir). Every architecture gets the same corpus, batch
order, optimiser and budget; a mixture of experts adds a load-balancing loss (Switch Transformer's, in
each layer: `load_balancing_loss`, weight `router_aux_loss_coef`) to the cross-entropy, as mixtures are
trained, so that no expert is left without tokens. qwen3's files are exactly what this command wrote before the zoo (no new card fields).
Training reads the running interpreter's standard library (train split); the validation
bits per byte are measured on the fixed validation split shipped with the package, so the
number is comparable across machines:

    python -m quantatlas.reference.train validate     # the committed checkpoint's validation bpb
    python -m quantatlas.reference.train validate reference-moe     # a zoo member's
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from quantatlas.environment import check_device
from quantatlas.errors import UserError
from quantatlas.reference.corpus import corpus_files, stdlib_tokens
from quantatlas.reference.model import (ARCHES, ARCHITECTURE_LINES, ZOO_ARCH, ZOO_NAME, active_parameters,
                                        causal_lm_class, checkpoint_dir, reference_config)
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


def check_config(cfg: TrainConfig, arch: str = "qwen3") -> None:
    """Refuse, before anything is built or read, what the training cannot run: a UserError naming the field
    (TrainConfig's; the command line's option is its --dashed name) and its value. seq_len is at most the architecture's context
    (max_position_embeddings): RoPE runs past it without a word, and the card would state a context the
    model was never trained within."""
    if arch not in ARCHES:
        raise UserError(f"field arch: {arch!r} is not one of {', '.join(ARCHES)}", "arch")
    for name in ("steps", "batch_size", "seq_len", "val_tokens"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"field {name}: {value!r} is not a positive integer", name)
    context = reference_config(arch).max_position_embeddings
    if cfg.seq_len > context:
        raise UserError(f"field seq_len: {cfg.seq_len} is more than the {arch} model's context "
                        f"(max_position_embeddings {context})", "seq_len")
    if cfg.val_tokens < cfg.seq_len:
        raise UserError(f"field val_tokens: {cfg.val_tokens} is fewer than seq_len {cfg.seq_len} (validation "
                        "scores whole windows of seq_len tokens)", "val_tokens")
    check_device(cfg.device, "field device")


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def load_balancing_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss in each layer, averaged over the layers: E * sum_i f_i * P_i, with
    f_i the share of the layer's top-k slots routed to expert i (no gradient) and P_i the expert's mean router
    probability; 1 when routing is uniform, up to E when one expert takes everything.

    Per layer, because transformers' `load_balancing_loss_func` pools all layers' counts and probabilities
    before the product: it balances each expert index summed over the layers, so an expert can die in one
    layer while the same index is busy in another (it did, training reference-moe)."""
    losses = []
    for logits in router_logits:                                   # [tokens, experts] per layer
        probs = torch.softmax(logits.float(), dim=-1)
        n_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        share = torch.nn.functional.one_hot(chosen, n_experts).float().sum(dim=(0, 1)) / chosen.numel()
        losses.append(n_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


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


def train(cfg: TrainConfig, out_dir: Path | None = None, progress=None, arch: str = "qwen3") -> dict:
    """Train the `arch` member of the zoo with `cfg` and write its checkpoint and card to `out_dir`
    (default: the architecture's committed folder). A configuration it cannot run is refused first
    (`check_config`)."""
    from safetensors.torch import save_file

    check_config(cfg, arch)
    out_dir = checkpoint_dir(arch) if out_dir is None else Path(out_dir)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    config = reference_config(arch)
    model = causal_lm_class(arch)(config).to(device)
    mixture = bool(getattr(config, "num_experts", 0))
    n_params = sum(p.numel() for p in model.parameters())
    train_tokens = stdlib_tokens("train")
    val_tokens = fixed_tokens("validation", cfg.val_tokens + 1)
    rng = np.random.default_rng(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    t0 = time.time()
    loads = []   # the machine's 1-minute load average every 50 steps (where the OS gives it), for the card
    model.train()
    for step in range(cfg.steps):
        if step % 50 == 0 and hasattr(os, "getloadavg"):
            loads.append(os.getloadavg()[0])
        starts = rng.integers(0, len(train_tokens) - cfg.seq_len - 1, size=cfg.batch_size)
        x = torch.from_numpy(np.stack([train_tokens[s:s + cfg.seq_len + 1] for s in starts])).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        if mixture:
            out = model(x[:, :-1], labels=None, output_router_logits=True)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss = loss + config.router_aux_loss_coef * load_balancing_loss(out.router_logits,
                                                                            config.num_experts_per_tok)
        else:
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
        "architecture": ARCHITECTURE_LINES[arch],
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
    if arch != "qwen3":   # the zoo's cards say more; reference's card keeps the fields it was committed with
        card = _zoo_card(card, arch, config, model, loads, val_tokens, device)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "CARD.md").write_text(_card_markdown(card))
    return card


def _machine(loads: list[float]) -> str:
    """Where the training ran, in words: CPU model and cores (or the GPU), and the machine's mean load
    average while it trained (other jobs slow a shared machine's wall time)."""
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {platform.system()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {sum(loads) / len(loads):.1f} while training" if loads else ""
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{load}"


def train_command(arch: str, cfg: TrainConfig) -> str:
    """The command that reproduces a checkpoint (steps and seed always; other options where not at their default)."""
    parts = ["quantatlas reference train"] + ([f"--arch {arch}"] if arch != "qwen3" else [])
    parts += [f"--steps {cfg.steps}", f"--seed {cfg.seed}"]
    default = TrainConfig()
    parts += [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("batch_size", "seq_len", "device")
              if getattr(cfg, k) != getattr(default, k)]
    return " ".join(parts)


#: validation tokens of a card's quick check (the first 8 windows of 512): what a test recomputes in a second
CHECK_TOKENS = 4096


def _zoo_card(card: dict, arch: str, config, model, loads: list[float], val_tokens: np.ndarray, device) -> dict:
    """A zoo member's card: reference's fields, and its name, expert shapes, active parameters, machine and
    command, and a quick check (bits per byte of the first CHECK_TOKENS validation tokens, what a test
    recomputes from the checkpoint; for a mixture also the share of routed tokens each expert got there)."""
    out = {"model": ZOO_NAME[arch], "arch": arch, **card}
    seq_len = card["train"]["seq_len"]
    check = val_tokens[:CHECK_TOKENS + 1]
    out["validation_check"] = {"tokens": CHECK_TOKENS, "seq_len": seq_len,
                               "bits_per_byte": round(bits_per_byte(model, check, seq_len, device), 4)}
    if getattr(config, "num_experts", 0):
        out["config"].update({k: getattr(config, k) for k in ("num_experts", "num_experts_per_tok",
                                                              "moe_intermediate_size", "norm_topk_prob",
                                                              "router_aux_loss_coef")})
        del out["config"]["intermediate_size"]   # no dense MLP in any layer
        share = expert_token_share(model, check, seq_len, device)
        out["validation_check"]["expert_token_share"] = {"min": round(float(share.min()), 4),
                                                         "max": round(float(share.max()), 4),
                                                         "uniform": round(1 / config.num_experts, 4)}
    out["active_parameters"] = active_parameters(model)
    out["machine"] = _machine(loads)
    out["command"] = train_command(arch, TrainConfig(**card["train"]))
    return out


@torch.no_grad()
def expert_token_share(model, tokens: np.ndarray, seq_len: int, device) -> torch.Tensor:
    """[layers, experts]: the share of a mixture's routed (token, slot) pairs each expert receives over
    non-overlapping windows of `tokens` (each row sums to 1; uniform routing gives 1 / experts)."""
    cfg = model.config
    n = (len(tokens) - 1) // seq_len
    x = torch.from_numpy(np.stack([tokens[j * seq_len:(j + 1) * seq_len] for j in range(n)])).to(device)
    router_logits = model(x, output_router_logits=True).router_logits    # per layer [tokens, experts]
    counts = torch.stack([torch.bincount(r.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1),
                                         minlength=cfg.num_experts) for r in router_logits]).double()
    return counts / counts.sum(dim=1, keepdim=True)


def _fixed_source() -> str:
    from quantatlas.reference import data

    return data.manifest()["built_from"]


def _fixed_sha256(name: str) -> str:
    from quantatlas.reference import data

    return data.manifest()["files"][name]["sha256"]


def validation_bpb(model=None, val_tokens: int | None = None, seq_len: int | None = None,
                   name: str = "reference") -> float:
    """Bits per byte of `model` (default: the committed checkpoint of the embedded model `name`) on the fixed
    validation split, with that checkpoint card's val_tokens and seq_len unless given."""
    from quantatlas.reference.model import load_reference

    card = json.loads((checkpoint_dir(ZOO_ARCH[name]) / "card.json").read_text())
    val_tokens = val_tokens or card["train"]["val_tokens"]
    seq_len = seq_len or card["train"]["seq_len"]
    model = model if model is not None else load_reference(name=name)
    return bits_per_byte(model, fixed_tokens("validation", val_tokens + 1), seq_len, "cpu")


def _card_markdown(card: dict) -> str:
    if "model" in card:
        return _zoo_card_markdown(card)
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


def _zoo_card_markdown(card: dict) -> str:
    c = card["config"]
    t = card["train"]
    if "num_experts" in c:
        mlp = (f"every MLP a mixture of {c['num_experts']} SwiGLU experts of width {c['moe_intermediate_size']}, "
               f"top-{c['num_experts_per_tok']} softmax router (top-k weights renormalised: {c['norm_topk_prob']}; "
               f"load-balancing loss weight {c['router_aux_loss_coef']} in training)")
    else:
        mlp = f"MLP {c['intermediate_size']}"
    return f"""# quantatlas reference model `{card['model']}`

- Architecture: {card['architecture']}; {c['num_hidden_layers']} layers, hidden {c['hidden_size']},
  {mlp}, {c['num_attention_heads']} query heads / {c['num_key_value_heads']} KV heads of
  width {c['head_dim']}, context {c['max_position_embeddings']}, untied embeddings.
- Vocabulary: {c['vocab_size']} tokens (256 bytes, BOS=256, EOS=257).
- Parameters: {card['parameters']:,} ({card['active_parameters']:,} active per token);
  stored as {card['stored_dtype']} safetensors.
- Corpus: {card['corpus']}.
- Training: {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens = {card['training_tokens']:,} tokens,
  AdamW (lr {t['lr']} cosine to {t['min_lr']}, warmup {t['warmup']}, wd {t['weight_decay']}), seed {t['seed']},
  on {card['device']} in {card['train_seconds']} s (wall) with torch {card['torch']};
  machine: {card['machine']}.
- Validation: {card['validation_bits_per_byte']} bits per byte over {card['validation_tokens_scored']:,} tokens
  of the fixed validation split shipped in `quantatlas/reference/data/` (the fp16 weights as stored;
  `python -m quantatlas.reference.train validate {card['model']}` measures it).

Reproduce: `{card['command']}`.
"""


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["validate"] or len(sys.argv) > 3 or sys.argv[2:] and sys.argv[2] not in ZOO_ARCH:
        print(f"usage: python -m quantatlas.reference.train validate [{'|'.join(ZOO_ARCH)}]", file=sys.stderr)
        raise SystemExit(2)
    _name = sys.argv[2] if len(sys.argv) > 2 else "reference"
    _card = json.loads((checkpoint_dir(ZOO_ARCH[_name]) / "card.json").read_text())
    print(f"{'' if _name == 'reference' else _name + ': '}validation bits per byte: "
          f"{validation_bpb(name=_name):.4f} over {_card['train']['val_tokens']:,} tokens "
          f"of the fixed validation split (seq_len {_card['train']['seq_len']})")
