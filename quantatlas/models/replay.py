"""Layer replay: run a decoder stack one layer at a time on captured inputs.

Quantization (GPTQ's layer-by-layer pass), layer streaming (evaluation with one layer resident) and
recovery (Block-AP's per-layer training) all need the same three things: what reaches decoder layer
0 (hidden states plus the keyword arguments every layer takes: attention mask, position embeddings),
one layer applied to such an input, and a forward pass that stops early once hooks have seen what
they needed. They are here, once.
"""
from __future__ import annotations

import torch


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the rest of the model is not needed)."""


def layer0_hook(captured: list):
    """A forward pre-hook (with kwargs) for decoder layer 0 that stores (hidden, args, kwargs) and stops."""
    def hook(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        kwargs["use_cache"] = False
        captured.append((hidden, rest, kwargs))
        raise StopForward
    return hook


@torch.no_grad()
def capture_layer_inputs(model, layer0, tokens: torch.Tensor, batch: int, embed=None) -> list:
    """Inputs (hidden states, positional args, keyword args) that reach decoder layer 0, one entry per
    batch of `batch` rows of `tokens` [n, seq]. `embed(tokens)`, when given, supplies the input
    embeddings (a layer-streamed model reads embedding rows from disk)."""
    captured: list = []
    handle = layer0.register_forward_pre_hook(layer0_hook(captured), with_kwargs=True)
    try:
        for i in range(0, tokens.shape[0], batch):
            try:
                if embed is None:
                    dev = next(model.parameters()).device
                    model(tokens[i:i + batch].to(dev), use_cache=False)
                else:
                    model(inputs_embeds=embed(tokens[i:i + batch]), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer, hidden, rest, kwargs) -> torch.Tensor:
    """One decoder layer on one captured input; its hidden-state output."""
    out = layer(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def advance(layer, hidden: list, inputs: list) -> list:
    """Every batch's hidden states through `layer` (the captured args/kwargs of each batch)."""
    return [run_layer(layer, h, r, k) for h, (_, r, k) in zip(hidden, inputs)]
