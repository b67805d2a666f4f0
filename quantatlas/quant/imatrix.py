"""The importance matrix of llama.cpp's llama-imatrix: per input column, the mean of x_j^2.

For every matrix multiplication y = W x of a blk.* weight, llama-imatrix (tools/imatrix/imatrix.cpp,
collect_imatrix) adds x_j^2 to values[j] for each token's input vector x and counts the tokens;
llama-quantize (tools/quantize, load_imatrix) hands the quantizer values[j] / count. That is
`InputStats.sq_mean` of our calibration capture, so this file only chooses the tensors and the
names, and reads/writes llama-imatrix's GGUF file format.

Differences from llama-imatrix worth knowing:
- llama-imatrix accumulates in fp32 token by token; we accumulate in fp64 and divide once, so
  the values agree to fp32 rounding, not bit for bit (the activations differ anyway: a different
  forward pass on different kernels).
- llama-imatrix ignores batches of fewer than 16 tokens and puts BOS at the start of each chunk;
  our calibration windows are what the spec's data.calib draws.
- output.weight is recorded only with --process-output; token_embd never (a row lookup, not a
  matmul). `compute_imatrix` follows the default: decoder-layer matrices only, head optional.
- MoE experts (mul_mat_id) get per-expert sums and counts from the tokens routed to each expert
  (models/moe.py), as llama-imatrix's mul_mat_id rows; the file stores one [n_expert, width] entry per
  fused GGUF tensor (blk.N.ffn_gate_exps.weight ...), here one entry per expert matrix.
- q, k and v (and gate and up) see the same input, so their entries are equal -- as in llama.cpp.

The file format (save_imatrix): GGUF with general.type = "imatrix", imatrix.datasets (strings),
imatrix.chunk_count and imatrix.chunk_size (u32); per weight "<name>.in_sum2" (f32, ne = [width,
n_mat]: the sums of x^2) and "<name>.counts" (f32, ne = [1, n_mat]); names are GGUF tensor names
such as blk.0.attn_q.weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class ImportanceMatrix:
    """Sums of x^2 per input column and token counts, keyed by module name (model.layers.0.mlp.down_proj)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)   # [in] float64
    counts: dict[str, int] = field(default_factory=dict)
    chunk_size: int = 512
    datasets: list[str] = field(default_factory=list)
    experts: dict[str, int] = field(default_factory=dict)   # an MoE expert matrix's name -> its expert index
    routed: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens routed to each expert

    def importance(self, name: str) -> torch.Tensor | None:
        """llama-quantize's imatrix row for a module: sums / count as fp32 (None if not recorded)."""
        if name not in self.sums:
            return None
        n = self.counts[name]
        if n <= 0:  # llama-quantize stores 1 where an entry never saw a token
            return torch.ones_like(self.sums[name], dtype=torch.float32)
        return (self.sums[name] / n).float()

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)


def imatrix_modules(model, include_head: bool = False) -> dict[str, torch.nn.Module]:
    """The matrices llama-imatrix records: every decoder-layer matrix (and the head if asked); MoE
    experts are not modules with inputs of their own (`compute_imatrix` reads them from the routing)."""
    from quantatlas.models.roles import quantizable

    return {t.name: t.module for t in quantizable(model, include_head=include_head)
            if (t.layer is not None or (include_head and t.role == "head")) and t.expert is None}


@torch.no_grad()
def compute_imatrix(model, tokens: torch.Tensor, include_head: bool = False, batch_size: int = 8,
                    datasets: list[str] | None = None, weighting: str = "tokens") -> ImportanceMatrix:
    """Run calibration `tokens` [n, seq] through the (unquantized) model and collect x^2 sums per column.

    `include_head` is llama-imatrix's --process-output. MoE experts: each expert's sums from the tokens
    routed to it (`weighting`: models/moe.py), its count the routed tokens.
    """
    from quantatlas.models.calib import accumulate_inputs
    from quantatlas.models.layout import layout
    from quantatlas.models.moe import BoundMoE, ExpertStatistics, RoutingTap

    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"compute_imatrix: tokens must be [samples, seq_len] with samples > 0, "
                         f"got {tuple(tokens.shape)}")
    modules = imatrix_modules(model, include_head)
    blocks = layout(model).moe_blocks
    experts = [ExpertStatistics(BoundMoE(moe), {t.name: t for t in moe.tensors()}, hessian=False,
                                weighting=weighting) for moe in blocks]
    taps = [RoutingTap(stats.bound, stats.add) for stats in experts]
    try:
        # the accumulators themselves, to keep the fp64 sums (not just their means)
        accs = accumulate_inputs(model, modules, tokens, batch_size, hessian=False)
    finally:
        for tap in taps:
            tap.remove()
    im = ImportanceMatrix(chunk_size=int(tokens.shape[1]), datasets=list(datasets or []))
    for name, acc in accs.items():
        im.sums[name] = acc.sq_sum.detach().cpu()
        im.counts[name] = acc.count
    for moe, stats in zip(blocks, experts):
        im.routed[moe.router.layer] = stats.routed.tolist()
        for name, key in stats.keys.items():
            acc = stats.accs[key]
            im.sums[name] = acc.sq_sum.detach().cpu()
            im.counts[name] = acc.count
            im.experts[name] = key[0]
    return im


def importance_from_stats(stats: dict) -> dict[str, torch.Tensor]:
    """{name: InputStats} (or {name: {"sq_mean": ...}}) -> {name: imatrix row} for codecs' `importance`."""
    out = {}
    for name, s in stats.items():
        out[name] = (s["sq_mean"] if isinstance(s, dict) else s.sq_mean).float()
    return out


# -- llama-imatrix's GGUF file ------------------------------------------------------------------

def write_imatrix_gguf(path: str | Path, im: ImportanceMatrix, gguf_names: dict[str, str]) -> None:
    """Write `im` as llama-imatrix does. `gguf_names` maps parameter names to GGUF tensor names
    (quantatlas.export.gguf_tensor_names(model): model.layers.0.mlp.down_proj.weight -> blk.0.ffn_down.weight)."""
    import gguf

    missing = [n for n in im.sums if n + ".weight" not in gguf_names]
    if missing:
        raise ValueError(f"write_imatrix_gguf: no GGUF name for {', '.join(missing[:5])}")
    # one entry per GGUF tensor: an MoE expert tensor (blk.N.ffn_down_exps) stacks its experts' rows
    entries: dict[str, dict[int, str]] = {}
    for name in im.sums:
        entries.setdefault(gguf_names[name + ".weight"], {})[im.experts.get(name, 0)] = name
    for g, by_expert in entries.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"write_imatrix_gguf: {g} has entries for experts {sorted(by_expert)}, not 0..n-1")
    w = gguf.GGUFWriter(str(path), arch="imatrix")  # the arch key is ignored by llama-quantize
    w.add_type("imatrix")
    w.add_key_value("imatrix.datasets", list(im.datasets), gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    chunks = max(im.counts.values(), default=0) // max(im.chunk_size, 1)
    w.add_uint32("imatrix.chunk_count", int(chunks))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for g in sorted(entries):  # llama-imatrix sorts by name
        names = [entries[g][e] for e in range(len(entries[g]))]
        w.add_tensor(f"{g}.in_sum2", np.stack([im.sums[n].float().numpy() for n in names]))   # ne = [width, n_mat]
        w.add_tensor(f"{g}.counts", np.array([[float(im.counts[n])] for n in names], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix_gguf(path: str | Path, gguf_names: dict[str, str] | None = None,
                      experts: dict[str, int] | None = None) -> ImportanceMatrix:
    """Read a llama-imatrix GGUF file. With `gguf_names` (parameter name -> GGUF name, as for writing)
    the entries are keyed by module name, else by GGUF tensor name. An MoE entry (one row per expert) needs
    `experts` (an expert matrix's module name -> its expert index, `ImportanceMatrix.experts` of the model)
    to be split into its experts' entries."""
    import gguf

    r = gguf.GGUFReader(str(path))
    if r.fields.get("general.type") is None or r.fields["general.type"].contents() != "imatrix":
        raise ValueError(f"{path}: not a llama-imatrix GGUF file (general.type is not 'imatrix')")
    back: dict[tuple[str, int], str] = {}
    for k, v in (gguf_names or {}).items():
        name = k.removesuffix(".weight")
        back[(v, (experts or {}).get(name, 0))] = name
    tensors = {t.name: t for t in r.tensors}
    im = ImportanceMatrix()
    if "imatrix.chunk_size" in r.fields:
        im.chunk_size = int(r.fields["imatrix.chunk_size"].contents())
    if "imatrix.datasets" in r.fields:
        im.datasets = list(r.fields["imatrix.datasets"].contents())
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        g = tname[: -len(".in_sum2")]
        counts = tensors.get(g + ".counts")
        if counts is None:
            raise ValueError(f"{path}: {g} has in_sum2 but no counts")
        c = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        sums = np.asarray(t.data, dtype=np.float32).reshape(c.size, -1).astype(np.float64)
        for e in range(c.size):
            key = back.get((g, e), g if c.size == 1 else None)
            if key is None:
                raise ValueError(f"{path}: {g} has {c.size} experts' entries; pass `experts` (module name -> expert "
                                 "index) with gguf_names to split them")
            im.sums[key] = torch.from_numpy(sums[e])
            im.counts[key] = int(round(float(c[e])))
            if c.size > 1:
                im.experts[key] = e
    return im
