"""One arm x seed measured: the pipeline quantizes (quant/pipeline.py), the harness scores the
result KLD-first against the reference log-probs, and the sizes are counted from what is stored.
The serial runner and the Ray tasks both call `measure_arm`."""
from __future__ import annotations

import time

import numpy as np
import torch

from quantatlas.context import RunContext
from quantatlas.eval.bits import artifact_of, cap_check
from quantatlas.eval.bpb import bpb_metrics
from quantatlas.eval.kld import concat_metrics, kld_statistics, token_metrics
from quantatlas.eval.windows import EvalSet, scored_logits
from quantatlas.export.runtimes import measured_runs_on
from quantatlas.models.load import LoadedModel
from quantatlas.quant.pipeline import Calibration, QuantizedModel, quantize


@torch.no_grad()
def evaluate(model, es: EvalSet, ref: np.ndarray, device, batch: int, progress=None):
    """Per-token metrics of `model` (a module, or a streamed model) against the reference log-probs."""
    targets = es.targets()
    parts = []
    for off, logits in scored_logits(model, es, batch, device):
        n = logits.shape[0]
        base = torch.from_numpy(np.array(ref[off:off + n])).to(logits.device)
        parts.append(token_metrics(base, logits.float(), targets[off:off + n].to(logits.device)))
        if progress:
            progress(n)
    return concat_metrics(parts)


def calibration_for(lm: LoadedModel, spec, name: str, es: EvalSet | None = None, stream=None) -> Calibration:
    """Arm `name`'s calibration data: its own `calib:` draw or `data.calib`, from `data.calib.source`
    (`stream`: a loader shared across arms), with the eval tokens recovery keeps off."""
    c = spec.arms[name].calib or spec.data.calib
    ev = spec.data.eval
    return Calibration(load=stream or (lambda: lm.text_tokens(spec.data.calib.source, "train")),
                       samples=c.samples, seq_len=c.seq_len, held_out=lambda: lm.text_tokens(ev.source, "eval"),
                       held_out_tokens=0 if es is None else es.windows.numel())


def quantize_arm(lm: LoadedModel, spec, name: str, seed: int, device: str | None = None, es: EvalSet | None = None,
                 progress=None) -> QuantizedModel:
    """Arm `name` of `spec` at `seed`, quantized exactly as `quantatlas run` does it."""
    if es is None and spec.arms[name].recovery is not None:
        from quantatlas.eval.windows import make_eval_set

        ev = spec.data.eval
        es = make_eval_set(lm.text_tokens(ev.source, "eval"), ev.tokens, ev.ctx, ev.score)
    ctx = RunContext(seed, device or ("cpu" if lm.streamed is not None   # a streamed skeleton sits on meta
                                      else str(next(lm.model.parameters()).device)))
    return quantize(lm, spec.arms[name], calibration_for(lm, spec, name, es), ctx, progress, f"arms.{name}")


def measure_arm(lm: LoadedModel, spec, name: str, ctx: RunContext, es: EvalSet, ref: np.ndarray,
                calibration: Calibration, bars=None, compress: bool = True,
                n_bytes: int | None = None) -> tuple[dict, np.ndarray, dict]:
    """(results, per-token KLD, step records) of arm `name` at `ctx.seed`."""
    t0 = time.time()
    if lm.streamed is not None and spec.artifact is not None:
        from quantatlas.models.stream import StreamError

        raise StreamError("artifact: the artifact cap needs the whole artifact file, which a layer-streamed run "
                          "does not write; set QUANTATLAS_STREAM=0", "artifact")
    qm = quantize(lm, spec.arms[name], calibration, ctx, bars, f"arms.{name}")
    tick = bars.task(f"{name} seed {ctx.seed}: evaluate", es.n_scored) if bars is not None else None
    metrics = evaluate(qm.forward, es, ref, ctx.device, spec.data.eval.batch, tick)
    res = {k: float(v) for k, v in kld_statistics(metrics).items()}
    if n_bytes:  # bits per byte of the eval text, and its change against the fp model (eval/bpb.py)
        res.update(bpb_metrics(metrics, n_bytes))
    if qm.sizes is not None:  # layer-streamed: bits counted from the packed files it wrote
        res.update({k: float(v) for k, v in qm.sizes.items()})
    elif qm.external is not None:  # an artifact arm: bits from its stored tensors, bytes of its own files
        res.update({k: float(v) for k, v in qm.external.measure(compress).items()})
        if spec.artifact is not None:
            res.update(cap_check(qm.external.blob(), spec.artifact.max_bytes, spec.artifact.compressor))
    else:
        art = artifact_of(qm.model, qm.packed)
        res.update({k: float(v) for k, v in art.measure(compress, ctx.seed).items()})
        if spec.artifact is not None:  # the real file's bytes after the cap's compressor
            res.update(cap_check(art.to_bytes(ctx.seed), spec.artifact.max_bytes, spec.artifact.compressor))
    res.update(qm.runtime_bits(es.ctx))  # KV-cache and activation bits per stored value
    runs_on = measured_runs_on(qm, spec.arms[name])  # which runtimes load it as measured (quantatlas/runtimes.py)
    if runs_on is not None:
        res["runs_on"] = runs_on
    res.update({k: float(v) for k, v in qm.records.get("recovery", {}).items()})  # CPU seconds, train KL
    res.update({k: float(v) for k, v in qm.records.get("freeze_dry", {}).items()})  # share of weights dropped
    moe = qm.records.get("moe")
    if moe:  # MoE calibration coverage: tokens routed per expert (the full table goes to the run JSON)
        res.update({"moe_tokens_min": float(moe["tokens_min"]), "moe_tokens_median": float(moe["tokens_median"]),
                    "moe_experts_under_threshold": float(len(moe["under_threshold"])),
                    "moe_threshold": float(moe["threshold"])})
    ttt = getattr(spec.arms[name], "ttt", None)
    if ttt is not None:  # a second evaluation with score-first test-time training: `<metric>_ttt` beside the above
        res.update(measure_ttt(qm, lm.model, ttt, es, ref, ctx, n_bytes, bars, name))
    res["seconds"] = round(time.time() - t0, 3)
    return res, metrics.kld.astype(np.float32), qm.records


def measure_ttt(qm: QuantizedModel, fp_model, cfg, es: EvalSet, ref: np.ndarray, ctx: RunContext,
                n_bytes: int | None, bars=None, name: str = "arm") -> dict:
    """The arm's `_ttt` metrics (eval/ttt.py: the quantized and the fp model both under score-first TTT),
    measured after everything else: TTT leaves both models as it found them. Its trained values are not
    stored in the artifact (an eval-time method)."""
    from quantatlas.errors import UserError
    from quantatlas.eval.ttt import evaluate_ttt, ttt_results

    tick = bars.task(f"{name} seed {ctx.seed}: evaluate with TTT", es.n_scored) if bars is not None else None
    try:
        matched, vs_fp, info = evaluate_ttt(qm.forward, fp_model, es, ref, cfg, qm.packed, ctx.seed, ctx.device, tick)
    except ValueError as e:   # "ttt.params: ..." names its own field
        if not str(e).startswith("ttt"):
            raise
        raise UserError(f"arms.{name}.{e}", f"arms.{name}.{str(e).split(':', 1)[0]}") from None
    return ttt_results(matched, vs_fp, n_bytes, info)
