"""Evaluation windows and the cached reference log-probabilities.

Like llama.cpp's perplexity tool: the eval stream is cut into non-overlapping windows of
`ctx` tokens; in each window the logits at positions first .. ctx-2 predict tokens
first+1 .. ctx-1, with first = ctx // 2 by default (only the second half is scored, so
every scored token has at least ctx/2 tokens of context) or 0 with `score: all`.

The reference model's log-softmax over the full vocabulary at every scored position is
computed once per (model hash, eval fingerprint, device, dtype) and kept on disk as a
float32 memmap, so every arm is compared against the same numbers bit for bit.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantatlas.errors import UserError
from quantatlas.reference.corpus import eval_fingerprint


class EvalDataError(UserError):
    """Eval data that cannot make the windows the spec's `data.eval` asks for."""


@dataclass
class EvalSet:
    windows: torch.Tensor   # [n_windows, ctx] int64
    first: int              # first scored logit position in each window
    fingerprint: str

    @property
    def ctx(self) -> int:
        return self.windows.shape[1]

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        return self.windows.shape[0] * self.scored_per_window

    def targets(self) -> torch.Tensor:
        return self.windows[:, self.first + 1:].reshape(-1)


def make_eval_set(tokens: np.ndarray, n_tokens: int, ctx: int, score: str = "second_half",
                  up_to: bool = False) -> EvalSet:
    """Whole windows of `ctx` tokens cut from the first `n_tokens` of the stream (`data.eval.tokens`
    counts these stream tokens, not the scored ones: with `second_half` each window scores
    ctx - 1 - ctx // 2). A stream shorter than `n_tokens` is refused, saying how many it has, unless
    `up_to` (then as many whole windows as it holds)."""
    if ctx < 2:
        raise EvalDataError(f"data.eval.ctx must be at least 2, got {ctx}", "data.eval.ctx")
    if score not in ("second_half", "all"):
        raise EvalDataError(f"data.eval.score must be second_half or all, got {score!r}", "data.eval.score")
    avail = min(len(tokens), n_tokens)
    n_windows = avail // ctx
    if n_windows < 1:
        raise EvalDataError(f"data.eval: {avail} tokens available is shorter than one window of ctx={ctx}",
                            "data.eval")
    first = ctx // 2 if score == "second_half" else 0
    if n_tokens > len(tokens) and not up_to:
        most = len(tokens) // ctx
        raise EvalDataError(f"data.eval.tokens: {n_tokens} tokens asked, but the eval stream has {len(tokens)} "
                            f"(at most {most} windows of ctx {ctx}, {most * (ctx - 1 - first)} tokens scored "
                            f"with score: {score}); ask for at most {len(tokens)}", "data.eval.tokens")
    used = np.ascontiguousarray(tokens[:n_windows * ctx])
    return EvalSet(torch.from_numpy(used.copy()).reshape(n_windows, ctx), first,
                   eval_fingerprint(used, ctx, score == "all"))


@torch.no_grad()
def scored_logits(model, es: EvalSet, batch: int, device) -> "iter[tuple[int, torch.Tensor]]":
    """Yield (offset, logits [b*scored, V]) over the eval set, in order. `model` is a torch module held
    in memory, or a layer-streamed model (`models/stream.py: StreamedModel`, any object that is not a
    module), which passes all windows layer by layer itself."""
    if not isinstance(model, torch.nn.Module):
        yield from model.scored_logits(es, batch)
        return
    off = 0
    for i in range(0, es.windows.shape[0], batch):
        x = es.windows[i:i + batch].to(device)
        out = model(x).logits[:, es.first:-1, :]
        out = out.reshape(-1, out.shape[-1])
        yield off, out
        off += out.shape[0]


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTATLAS_CACHE", Path.home() / ".cache" / "quantatlas"))


def reference_logprobs(model, model_hash: str, es: EvalSet, device, batch: int = 8, progress=None) -> np.ndarray:
    """float32 memmap [n_scored, V] of the reference log-softmax; computed once, then read from disk."""
    module = model if isinstance(model, torch.nn.Module) else model.model  # a streamed model's skeleton
    dtype = str(next(module.parameters()).dtype).replace("torch.", "")
    key = f"{model_hash}-{es.fingerprint}-{torch.device(device).type}-{dtype}"
    d = cache_dir() / "logits"
    path, meta_path = d / f"{key}.f32", d / f"{key}.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return np.memmap(path, dtype=np.float32, mode="r", shape=tuple(meta["shape"]))
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    mm = None
    for off, logits in scored_logits(model, es, batch, device):
        lp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        if mm is None:
            mm = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(es.n_scored, lp.shape[1]))
        mm[off:off + lp.shape[0]] = lp
        if progress:
            progress(lp.shape[0])
    mm.flush()
    shape = mm.shape
    del mm
    os.replace(tmp, path)
    meta_path.write_text(json.dumps({"shape": list(shape), "model_hash": model_hash,
                                     "fingerprint": es.fingerprint}))
    return np.memmap(path, dtype=np.float32, mode="r", shape=shape)
