"""Layer streaming: a model that never sits whole in memory.

A `StreamedModel` is a local HF folder (config.json + safetensors, sharded or not, fp16/bf16/fp32)
read one decoder layer at a time:

- the skeleton is built on the meta device from config.json (no weights; the rotary embedding,
  which holds computed buffers only, is rebuilt on the CPU);
- `ShardReader` opens the safetensors files with `safetensors.safe_open`, which memory-maps them,
  so a tensor is read from disk when asked for, and an embedding lookup touches only the rows it needs;
- `materialise(layer)` gives one decoder layer real fp32 weights from the shards and
  `release(layer)` returns it to the meta device.

On top of it:

- `stream_hidden_inputs` captures what reaches decoder layer 0 (hidden states from the embedding
  rows, the attention mask and position embeddings the model builds) without the embedding matrix;
- `scored_logits` is `eval.windows.scored_logits` streamed: every eval window's hidden states pass
  layer by layer (one layer resident), then the final norm and the head in row chunks;
- `quantize_streamed` is GPTQ (any layered solver of the recipe, RTN, overrides) layer by layer with
  `quant.quantize.quantize_layer` — the same per-layer function the in-memory pass calls — writing
  each quantized layer (`layer_00003.safetensors`, the weights as the quantized model holds them, fp32)
  and its packed codes (`packed_00003.safetensors`, header metadata naming codec, options and shape)
  to an output folder. A `StreamedModel` over [output folder, source folder] is the quantized model.

Peak memory is one fp32 decoder layer, its GPTQ statistics, and the calibration (or eval) hidden
states ([samples, seq, hidden] fp32, twice for parallel propagation/GPTAQ), on top of the interpreter.
bench/peak_memory.py (1.1 B TinyLlama-shaped model, GPTQ 4-bit): peak 874 MiB, 494 MiB (23.5 % of the
2098 MiB fp16 model) above the floor of python, torch, transformers and the meta skeleton.

What streams: pre-norm Llama-family decoders (Llama, Mistral, Qwen2, Qwen3: the `llama` layout,
final norm then head, no logit soft-capping), and their mixture-of-experts versions (Qwen3-MoE,
Qwen2-MoE, Mixtral: `llama_moe`). Checkpoints store experts one by one (`mlp.experts.3.gate_proj.weight`,
Mixtral's `block_sparse_moe.experts.3.w1.weight`) while recent transformers fuse them into 3-D tensors
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]): `materialise` stacks a fused
tensor from the per-expert ones where the files have no fused one (`stacked_experts`). Transforms, llama.cpp
mixtures and allocation need the whole model and are refused in streaming mode.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from quantatlas.errors import UserError
from quantatlas.models.replay import advance, capture_layer_inputs

#: the safetensors dtypes layer streaming reads (what materialise copies into fp32 from)
READABLE_DTYPES = ("F16", "BF16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL")


class StreamError(UserError):
    """A model folder that cannot be layer-streamed as asked (unreadable shards, a family or a step
    streaming does not support); `field` is the spec field at fault where it is known."""


def rss_mb() -> dict[str, float]:
    """This process's resident set now (`rss`) and its peak (`hwm`), in MiB, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1]) / 1024
    return out


class ShardReader:
    """Tensors by name over the safetensors files of one or more folders (the first that has a name
    wins), memory-mapped copy-on-write by `safe_open`: reading a tensor touches only its pages.
    `entries[name]` is (file, dtype, shape); `metadata[file]` the file's `__metadata__`. A copy (deepcopy,
    pickle) leaves the open files behind and opens them again when it first reads."""

    def __init__(self, folders):
        self.folders = [Path(f) for f in folders]
        self.entries: dict[str, tuple[Path, str, tuple]] = {}
        self.metadata: dict[Path, dict] = {}
        self._handles: dict[Path, object] = {}  # open safe_open handles, by file
        for folder in reversed(self.folders):
            files = sorted(folder.glob("*.safetensors"))
            index = folder / "model.safetensors.index.json"
            if index.exists():  # only the shards the index names (a hub repo may also ship consolidated.*)
                try:
                    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                    raise StreamError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})",
                                      "model") from None
            for file in files:
                handle = self._open(file)
                self.metadata[file] = handle.metadata() or {}
                for name in handle.keys():
                    part = handle.get_slice(name)
                    self.entries[name] = (file, part.get_dtype(), tuple(part.get_shape()))

    def _open(self, file: Path):
        """The file's safe_open handle (opened once); safe_open checks the header and that the data
        covers it, so a truncated or foreign file fails here, in one line naming it."""
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (OSError, SafetensorError) as e:
                raise StreamError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})",
                                  "model") from None
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor (its own dtype), a view of the mapped file."""
        if name not in self.entries:
            raise StreamError(f"tensor {name!r} is in none of the safetensors files of {', '.join(map(str, self.folders))}",
                              "model")
        file, dtype, _ = self.entries[name]
        if dtype not in READABLE_DTYPES:
            raise StreamError(f"{file}: tensor {name!r} is {dtype}, which layer streaming does not read "
                              f"({', '.join(READABLE_DTYPES)}); set QUANTATLAS_STREAM=0", "model")
        return self._open(file).get_tensor(name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # safe_open handles cannot be copied


def build_skeleton(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model of `folder/config.json` with every parameter on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.eval()
    for name, m in list(model.named_modules()):  # computed buffers only (inv_freq): rebuilt on the CPU
        if "rotary" in type(m).__name__.lower() and not list(m.parameters(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(m)(config=model.config))
    return model


def materialise(module: torch.nn.Module, prefix: str, reader: ShardReader, keys: dict | None = None) -> torch.nn.Module:
    """Give `module` (on meta) real CPU tensors (the skeleton's dtype, fp32) from the shards:
    `prefix + name` for each parameter and buffer, or `keys[name]` (a tied head's weight is the embedding's)."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            key = (keys or {}).get(name, prefix + name)
            alias = key.replace(".mlp.", ".block_sparse_moe.")   # Mixtral's checkpoint name of its MoE block
            if key in reader:
                t.copy_(reader.tensor(key))
            elif alias in reader:
                t.copy_(reader.tensor(alias))
            elif (stacked := stacked_experts(reader, key, t.shape[0])) is not None:
                t.copy_(stacked)
            elif not name.endswith("inv_freq"):
                raise StreamError(f"tensor {key!r} is in none of the safetensors files", "model")
    return module


#: a fused expert tensor -> the per-expert matrices it stacks, as checkpoints name them (Qwen-MoE, Mixtral)
_PER_EXPERT = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


def stacked_experts(reader: ShardReader, key: str, n_experts: int) -> torch.Tensor | None:
    """A fused 3-D expert tensor (`<block>.experts.gate_up_proj`: [E, 2I, H], gate rows then up rows, as
    transformers concatenates them; `down_proj`: [E, H, I]) from a checkpoint's per-expert matrices, or None
    where `key` is not one or the files lack them."""
    block, _, param = key.rpartition(".experts.")
    if param not in _PER_EXPERT or not block:
        return None
    for prefix in (block, block.replace(".mlp", ".block_sparse_moe")):
        for names in _PER_EXPERT[param]:
            keys = [[f"{prefix}.experts.{e}.{n}.weight" for n in names] for e in range(n_experts)]
            if all(k in reader for row in keys for k in row):
                return torch.stack([torch.cat([reader.tensor(k) for k in row], dim=0) for row in keys])
    return None


def release(module: torch.nn.Module) -> None:
    """Back to the meta device: the module's memory is freed."""
    module.to("meta")


class StreamedModel:
    """A local HF folder read layer by layer (see the module docstring). `folders`: the folders to read
    tensors from, first match wins (a quantized model: [its output folder, the source folder])."""

    def __init__(self, folder: str | Path, folders=None, model: torch.nn.Module | None = None):
        from quantatlas.models.layout import layout

        self.folder = Path(folder)
        self.reader = ShardReader(folders or [self.folder])
        self.model = model if model is not None else build_skeleton(self.folder)
        lay = layout(self.model)
        if lay.family not in ("llama", "llama_moe") or lay.final_norm is None or lay.head is None or lay.embed is None:
            raise StreamError(f"model {str(folder)!r}: layer streaming supports Llama-family decoders "
                              f"(Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE, Qwen2-MoE, Mixtral), "
                              f"not {lay.arch or lay.model_class}", "model")
        lay.check()   # a layout that cannot be read is refused before any layer is
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise StreamError(f"model {str(folder)!r}: layer streaming does not apply logit soft-capping", "model")
        self.prefix = lay.prefix
        self.layers = [la.block for la in lay.layers]
        self.embed_name = lay.embed.name + ".weight"
        self.head_name = self.embed_name if lay.tied else lay.head.name + ".weight"  # meta: tied only if one Parameter
        self.final_norm = lay.final_norm.module
        self.final_norm_prefix = lay.final_norm.name + "."
        self.n_layers = len(self.layers)

    def over(self, out_dir: str | Path) -> StreamedModel:
        """The same skeleton reading `out_dir` first (a quantized model written by `quantize_streamed`)."""
        sm = StreamedModel(self.folder, [Path(out_dir)] + self.reader.folders, self.model)
        sm.head_name = self.head_name  # quantizing a tied head materialised it apart from the embedding
        return sm

    def copy(self) -> StreamedModel:
        """An independent skeleton over the same files (hooks attached to one do not reach the other)."""
        import copy

        sm = StreamedModel(self.folder, self.reader.folders, copy.deepcopy(self.model))
        sm.head_name = self.head_name
        return sm

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}.{i}."

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `tokens` ([b, seq]) in fp32, read from the mapped file."""
        table = self.reader.tensor(self.embed_name)
        return table[tokens.reshape(-1)].float().reshape(*tokens.shape, -1)

    def layer_inputs(self, tokens: torch.Tensor, batch: int):
        """(hidden, args, kwargs) reaching decoder layer 0, per batch of `tokens` [n, seq]."""
        return capture_layer_inputs(self.model, self.layers[0], tokens, batch, embed=self.embed)

    @torch.no_grad()
    def scored_logits(self, es, batch: int, chunk: int = 8192):
        """`eval.windows.scored_logits` streamed: (offset, logits [b * scored, V]) in window order."""
        return_freed_memory()
        inputs = self.layer_inputs(es.windows, batch)
        hidden = [h for h, _, _ in inputs]
        for i, layer in enumerate(self.layers):
            materialise(layer, self.layer_prefix(i), self.reader)
            hidden = advance(layer, hidden, inputs)
            release(layer)
            return_freed_memory()
        materialise(self.final_norm, self.final_norm_prefix, self.reader)
        head = self.reader.tensor(self.head_name)
        off = 0
        try:
            for b in range(len(hidden)):
                h = self.final_norm(hidden[b])[:, es.first:-1, :]
                h = h.reshape(-1, h.shape[-1])
                hidden[b] = None
                logits = torch.cat([h @ head[c:c + chunk].float().T for c in range(0, head.shape[0], chunk)], dim=1)
                yield off, logits
                off += logits.shape[0]
        finally:
            release(self.final_norm)


def return_freed_memory() -> None:
    """glibc keeps freed blocks under its mmap threshold (which grows up to 32 MiB) in the heap, so a
    process that materialises and frees a layer at a time creeps up layer by layer. Large blocks
    (>= 1 MiB) get their own mappings from here on, returned to the system when freed; malloc_trim hands
    back what the heap holds free. A no-op without glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> int:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_packed(packed: dict, path: Path) -> None:
    """Packed tensors of one layer: data under `<param>::<key>`, codec/options/shape in the metadata."""
    tensors, meta = {}, {}
    for name, p in packed.items():
        for key, t in p.parts().items():
            tensors[f"{name}::{key}"] = t.cpu()
        meta[name] = json.dumps({"codec": p.codec, "config": p.config, "shape": list(p.shape)})
    save_tensors(tensors, path, meta)


def load_packed(folder: str | Path) -> dict:
    """The packed tensors a streaming run wrote, by parameter name (for the artifact and tests)."""
    from quantatlas.quant.incoherence import read_pack

    reader = ShardReader([folder])
    out = {}
    for file, meta in reader.metadata.items():
        if not file.name.startswith("packed_"):
            continue
        for name, blob in meta.items():
            m = json.loads(blob)
            data = {k.split("::", 1)[1]: reader.tensor(k).clone() for k, e in reader.entries.items()
                    if e[0] == file and k.split("::", 1)[0] == name}
            out[name] = read_pack(m["codec"], m["config"], tuple(m["shape"]), data)
    return out


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head counted once), on meta or not."""
    return sum(p.numel() for p in model.parameters())


def should_stream(folder: str | Path, fraction: float = 0.5) -> bool:
    """The automatic rule: stream when the model's weights held in fp32 (as the runner holds them)
    would take more than `fraction` of the memory available now (MemAvailable)."""
    reader = ShardReader([folder])
    n = sum(int(np.prod(e[2])) for e in reader.entries.values())
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False
    return 4 * n > fraction * avail


def stream_mode(value: bool | None = None) -> bool | None:
    """True/False as given; else $QUANTATLAS_STREAM (1/0/auto); None means the automatic rule."""
    if value is not None:
        return value
    env = os.environ.get("QUANTATLAS_STREAM", "auto").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env != "auto":
        raise StreamError(f"QUANTATLAS_STREAM: expected 1, 0 or auto, got {env!r}")
    return None
