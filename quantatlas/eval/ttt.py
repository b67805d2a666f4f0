"""Test-time training (TTT), score-first: an evaluation mode, beside the standard one.

    arms:
      int3_ttt: {solver: gptq, codec: {uniform: {bits: 3}},
                 ttt: {params: norms, lr: 0.001, steps_per_window: 1, optimizer: adam}}

The eval windows (eval/windows.py) are visited in stream order. Window i is first SCORED with the
parameters θ_i, and only THEN used for `steps_per_window` optimizer steps on its own tokens, which
give θ_{i+1}:

    score(window i | θ_i)      then      θ_{i+1} = step^k(θ_i, CE(window i))

so no token is scored by a model that has trained on it (parameter-golf's "score-first" TTT). θ_0 is
the model as it is: the first window's TTT scores are its standard scores.

The loss is the next-token cross-entropy of the model on the window's own tokens, every position of
the window (ctx - 1 predictions; with `score: second_half` the first half is context that nobody
scores, and it is already in the past of every later window). TTT has NO teacher: at test time only
the text is there, not the fp model, so it is not KL to the fp model (recovery.py's KD-STE is; it
trains on calibration tokens before the eval).

Both sides adapt. The fp model (as loaded) runs the same TTT (same parameters, optimizer, seed) in
lockstep, so that every `<metric>_ttt` is the standard metric with both models under TTT:

    kld_mean_ttt   KL(P_fp+TTT ‖ P_q+TTT) per scored token (0 for an fp16 arm, as kld_mean)
    bpb_ttt        bpb of the quantized model under TTT;  bpb_base_ttt: of the fp model under TTT
    delta_bpb_ttt  bpb_ttt - bpb_base_ttt: the post-quantization damage gap when both adapt

TTT also helps the fp model, so measuring q+TTT against the fp model WITHOUT TTT (parameter-golf's
framing: pre-quant, post-quant, post-quant + TTT) credits TTT's own gain to recovery; those numbers
are `<metric>_ttt_vs_fp` (VS_FP_KEYS): delta_bpb_ttt_vs_fp = bpb_ttt - bpb_base, and
kld_mean_ttt_vs_fp = KL(P_fp ‖ P_q+TTT), which grows when TTT fits the text away from the fp model.
For `scales` the fp side trains the same per-(row, group) multipliers on its fp weights.

What trains (`params`), each initialised so that θ_0 is the quantized model exactly:

    norms    the RMSNorm gains that are not quantized (every decoder layer's, q/k norms, the final norm)
    scales   a multiplier m [rows, groups] on every quantized Linear weight, one per stored scale of the
             pack (W = Ŵ ⊙ expand(m), m from 1): for the codecs whose decode is linear in their fp16
             scale (uniform, e8p, ...) this is training that scale; packs with no `scale` tensor
             (llama.cpp's block formats) and incoherence packs (their scales live in a rotated basis)
             are refused
    lora     W = Ŵ + B A on every Linear of the decoder layers (head excluded), A [rank, in] ~ N(0, 1/in)
             drawn from the seed, B [out, rank] = 0

The optimizer (Adam or plain SGD) keeps its state across windows. The model itself is never written:
the trained values enter through `torch.func.functional_call`, so the quantized model, its standard
metrics and everything measured after are untouched (tests/test_ttt.py checks both).

Bits: TTT's trained values are not in the artifact (they are recomputed from the eval text at test
time); `bits_per_weight` and the artifact bytes are the quantized model's. TTT is reported as an
eval-time method with its cost (`ttt_cpu_s`: the quantized model's TTT; `ttt_fp_cpu_s`: the fp side's),
in metrics with the suffix `_ttt` (TTT_KEYS), never replacing the standard ones.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantatlas._lazy import nn, torch
from quantatlas.context import RunContext

if TYPE_CHECKING:
    from quantatlas.eval.kld import TokenMetrics

#: the suffix of every metric measured under test-time training
TTT_SUFFIX = "_ttt"
LORA_RANK = 4
#: standard metrics reported again under TTT (as `<key>_ttt`)
TTT_KEYS = ("kld_mean", "kld_se", "kld_median", "kld_p99", "kld_max", "same_top", "rms_dp", "ppl", "ppl_base",
            "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_se", "bpb", "bpb_base", "delta_bpb")
#: metrics reported against the fp model WITHOUT TTT (as `<key>_ttt_vs_fp`): parameter-golf's framing
VS_FP_KEYS = ("kld_mean", "kld_se", "same_top", "ln_ppl_ratio", "delta_bpb")


class TTTConfig(BaseModel):
    """The `ttt:` block of an arm: evaluate it a second time with score-first test-time training."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    params: Literal["norms", "scales", "lora"]
    lr: float = Field(1e-3, gt=0, le=1)
    steps_per_window: int = Field(1, ge=1)     # optimizer steps on each window once it is scored
    rank: int | None = Field(None, ge=1)       # lora only: the adapters' rank (LORA_RANK when not given)
    optimizer: Literal["adam", "sgd"] = "adam"

    seeded_params: ClassVar[tuple[str, ...]] = ("lora",)   # the adapters' random A comes from the seed

    @model_validator(mode="before")
    @classmethod
    def _lora_rank_written_out(cls, data):
        """A LoRA arm always carries its rank, so `rank: 4` written and left out are one arm (one id)."""
        if isinstance(data, dict) and data.get("params") == "lora" and data.get("rank") is None:
            return {**data, "rank": LORA_RANK}
        return data

    @model_validator(mode="after")
    def _rank_is_for_lora(self):
        if self.rank is not None and self.params != "lora":
            raise ValueError(f"rank is the LoRA adapters' rank; params is {self.params} (use params: lora)")
        return self

    @property
    def seeded(self) -> bool:
        return self.params in self.seeded_params

    @property
    def lora_rank(self) -> int:
        return LORA_RANK if self.rank is None else self.rank


# -- what trains ----------------------------------------------------------------------------------

class Trainable:
    """The trained values and how they make the weights the forward pass sees: `overrides()` is a dict
    parameter name -> tensor for `functional_call`, equal to the model's own weights at the start."""

    def __init__(self, params: list, build):
        self.params, self._build = params, build

    def overrides(self) -> dict:
        return self._build()

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.params)


def norm_params(model) -> dict[str, "torch.Tensor"]:
    """Every norm gain of the model (decoder layers, q/k norms, final norm): name -> its weight."""
    from quantatlas.models.roles import find_roles

    params = dict(model.named_parameters())
    return {t.name + ".weight": params[t.name + ".weight"] for t in find_roles(model)
            if t.kind == "norm" and t.name + ".weight" in params}


def trainable(model, cfg: TTTConfig, packed: dict, seed: int) -> Trainable:
    """The values `cfg.params` trains on `model` (quantized as `packed`), at their identity start."""
    weights = dict(model.named_parameters())
    if cfg.params == "norms":
        gains = {name: nn.Parameter(w.detach().float().clone())
                 for name, w in norm_params(model).items() if name not in packed}
        if not gains:
            raise ValueError("ttt.params: norms: the model has no unquantized norm gain to train")
        return Trainable(list(gains.values()), lambda: {n: g.to(weights[n].dtype) for n, g in gains.items()})
    if cfg.params == "scales":
        mults = {name: (weights[name], nn.Parameter(torch.ones(groups, device=weights[name].device)))
                 for name, groups in scale_groups(model, packed).items()}
        if not mults:
            raise ValueError("ttt.params: scales: the arm stores no Linear weight through a codec (an fp16 arm "
                             "has no scales; use norms or lora)")

        def scaled():
            return {n: (w.float() * m.repeat_interleave(w.shape[1] // m.shape[1], 1)).to(w.dtype)
                    for n, (w, m) in mults.items()}
        return Trainable([m for _, m in mults.values()], scaled)
    adapters = lora_adapters(model, cfg.lora_rank, seed)

    def adapted():
        return {n: (w.float() + b @ a).to(w.dtype) for n, (w, a, b) in adapters.items()}
    return Trainable([p for _, a, b in adapters.values() for p in (a, b)], adapted)


def scale_groups(model, packed: dict) -> dict[str, tuple[int, int]]:
    """Quantized Linear weight name -> (rows, groups) of its pack's stored per-row/group `scale`."""
    from quantatlas.quant.incoherence import IncoherentPacked

    mods = dict(model.named_modules())
    out = {}
    for name, pk in packed.items():
        if not isinstance(mods.get(name.rsplit(".", 1)[0]), nn.Linear) or len(pk.shape) != 2:
            continue   # an embedding, a norm vector an override quantizes
        if isinstance(pk, IncoherentPacked):
            raise ValueError(f"ttt.params: scales: {name} is an incoherence pack, whose scales live in a rotated "
                             "basis; use norms or lora")
        out[name] = (pk.shape[0], scale_count(name, pk))
    return out


def scale_count(name: str, pk) -> int:
    """Groups per row of the pack's stored per-row/group fp16 `scale` (what `params: scales` trains), or a
    ValueError naming `name` and its codec where it stores none."""
    scale = pk.data.get("scale")
    rows, cols = pk.shape
    if scale is None or not scale.is_floating_point() or scale.numel() % rows or cols % (scale.numel() // rows):
        raise ValueError(f"ttt.params: scales: {name}'s codec {pk.codec} stores no per-row/group fp16 scale "
                         f"({sorted(pk.data)}); use norms or lora")
    return scale.numel() // rows


def lora_adapters(model, rank: int, seed: int) -> dict:
    """name -> (weight, A [rank, in], B [out, rank]) for every Linear of the decoder layers."""
    from quantatlas.models.roles import find_roles

    rng = RunContext(int(seed)).rng("ttt.lora")
    params = dict(model.named_parameters())
    out = {}
    for t in find_roles(model):
        name = t.name + ".weight"
        if t.kind != "linear" or t.layer is None or name not in params:
            continue
        w = params[name]
        rows, cols = w.shape
        a = torch.from_numpy(rng.standard_normal((rank, cols)) / np.sqrt(cols)).float().to(w.device)
        out[name] = (w, nn.Parameter(a), nn.Parameter(torch.zeros(rows, rank, device=w.device)))
    if not out:
        raise ValueError("ttt.params: lora: the model has no Linear in its decoder layers")
    return out


# -- the loop -------------------------------------------------------------------------------------

def optimizer(cfg: TTTConfig, params: list):
    return (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(params, lr=cfg.lr)


def window_loss(logits: "torch.Tensor", x: "torch.Tensor") -> "torch.Tensor":
    """Mean next-token cross-entropy over every position of the windows `x` [b, ctx]."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             x[:, 1:].reshape(-1))


def ttt_scored_logits(model, es, cfg: TTTConfig, packed: dict, seed: int, device, info: dict | None = None):
    """Yield (offset, logits [scored, V]) of each eval window in stream order, each scored before it is
    trained on (module docstring). `info` receives the trained parameter count, steps and tokens."""
    from torch.func import functional_call

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        train = trainable(model, cfg, packed, seed)
        opt = optimizer(cfg, train.params)
        run = lambda x: functional_call(model, train.overrides(), (x,), {"use_cache": False}).logits  # noqa: E731
        n, off, steps, tokens = es.windows.shape[0], 0, 0, 0
        for i in range(n):
            x = es.windows[i:i + 1].to(device)
            with torch.no_grad():        # score first ...
                out = run(x)[:, es.first:-1, :]
            out = out.reshape(-1, out.shape[-1])
            yield off, out
            off += out.shape[0]
            if i == n - 1:
                break                    # nothing is scored after the last window: no step on it
            for _ in range(cfg.steps_per_window):   # ... then train on the window just scored
                loss = window_loss(run(x), x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                tokens += x.shape[1] - 1
        if info is not None:
            info.update(ttt_trained_params=float(train.count), ttt_steps=float(steps), ttt_tokens=float(tokens))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def evaluate_ttt(model, base_model, es, ref: np.ndarray, cfg: TTTConfig, packed: dict, seed: int, device,
                 progress=None) -> tuple[TokenMetrics, TokenMetrics, dict]:
    """Score-first TTT of the quantized `model` and, in lockstep on the same windows, of the fp
    `base_model` with the same parameters, optimizer and seed. Returns the per-token metrics of the
    quantized model against the fp model under TTT (the damage gap when both adapt), against the fp
    model's cached log-probs `ref` without TTT, and (trained parameters, steps, tokens, CPU seconds)."""
    from quantatlas.eval.kld import concat_metrics, token_metrics

    for m in (model, base_model):
        if not isinstance(m, nn.Module):
            raise ValueError("ttt: test-time training needs the whole model in memory (set QUANTATLAS_STREAM=0)")
    targets = es.targets()
    info, base_info = {}, {}
    clock = {"q": 0.0, "fp": 0.0}
    w0 = time.time()
    q_iter = timed(ttt_scored_logits(model, es, cfg, packed, seed, device, info), clock, "q")
    fp_iter = timed(ttt_scored_logits(base_model, es, cfg, packed, seed, device, base_info), clock, "fp")
    matched, vs_fp = [], []
    for (off, q_logits), (_, fp_logits) in zip(q_iter, fp_iter):
        k = q_logits.shape[0]
        y = targets[off:off + k].to(q_logits.device)
        fp_lp = torch.log_softmax(fp_logits.float(), dim=-1)    # as the reference cache is made (windows.py)
        matched.append(token_metrics(fp_lp, q_logits.float(), y))
        vs_fp.append(token_metrics(torch.from_numpy(np.array(ref[off:off + k])).to(q_logits.device),
                                   q_logits.float(), y))
        if progress:
            progress(k)
    info.update(ttt_cpu_s=clock["q"], ttt_fp_cpu_s=clock["fp"], ttt_seconds=time.time() - w0)
    return concat_metrics(matched), concat_metrics(vs_fp), info


def timed(iterator, clock: dict, key: str):
    """`iterator`, with the CPU seconds spent inside it added to clock[key]."""
    while True:
        t0 = time.process_time()
        try:
            item = next(iterator)
        except StopIteration:
            clock[key] += time.process_time() - t0
            return
        clock[key] += time.process_time() - t0
        yield item


def ttt_results(matched, vs_fp, n_bytes: int | None, info: dict) -> dict[str, float]:
    """The `_ttt` metrics: TTT_KEYS of the quantized model against the fp model, both under TTT, as
    `<key>_ttt`; VS_FP_KEYS against the fp model without TTT, as `<key>_ttt_vs_fp`; and TTT's cost."""
    from quantatlas.eval.bpb import bpb_metrics
    from quantatlas.eval.kld import kld_statistics

    out = {}
    for metrics, keys, suffix in ((matched, TTT_KEYS, TTT_SUFFIX), (vs_fp, VS_FP_KEYS, TTT_SUFFIX + "_vs_fp")):
        stats = dict(kld_statistics(metrics))
        if n_bytes:
            stats.update(bpb_metrics(metrics, n_bytes))
        out.update({k + suffix: float(stats[k]) for k in keys if k in stats})
    out.update({k: float(v) for k, v in info.items()})
    return out
