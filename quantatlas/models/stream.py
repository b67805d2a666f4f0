"""Layer streaming: a model that never sits whole in memory.

A `StreamedModel` is a local HF folder (config.json + safetensors, sharded or not, fp16/bf16/fp32)
read one decoder layer at a time:

- the skeleton is built on the meta device from config.json (no weights; the rotary embedding,
  which holds computed buffers only, is rebuilt on the CPU);
- `ShardReader` memory-maps the safetensors files (it parses their headers itself), so a tensor is
  read from disk when asked for, and an embedding lookup touches only the rows it needs;
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
final norm then head, no logit soft-capping). Transforms, llama.cpp mixtures and allocation need the
whole model and are refused in streaming mode.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class StreamError(ValueError):
    pass


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
    wins), memory-mapped copy-on-write: reading a tensor touches only its pages."""

    def __init__(self, folders):
        self.folders = [Path(f) for f in folders]
        self.entries: dict[str, tuple[Path, str, tuple, int, int]] = {}
        self.metadata: dict[Path, dict] = {}
        for folder in reversed(self.folders):
            files = sorted(folder.glob("*.safetensors"))
            index = folder / "model.safetensors.index.json"
            if index.exists():  # only the shards the index names (a hub repo may also ship consolidated.*)
                try:
                    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                    raise StreamError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") \
                        from None
            for file in files:
                try:
                    with open(file, "rb") as fh:
                        n = struct.unpack("<Q", fh.read(8))[0]
                        header = json.loads(fh.read(n))
                    self.metadata[file] = header.pop("__metadata__", None) or {}
                    for name, e in header.items():
                        start, end = e["data_offsets"]
                        self.entries[name] = (file, e["dtype"], tuple(e["shape"]), 8 + n + start, end - start)
                except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
                    raise StreamError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor (its own dtype), a view of the mapped file."""
        if name not in self.entries:
            raise StreamError(f"tensor {name!r} is in none of the safetensors files of {', '.join(map(str, self.folders))}")
        file, dtype, shape, offset, nbytes = self.entries[name]
        if dtype not in _DTYPES:
            raise StreamError(f"{file}: tensor {name!r} is {dtype}, which layer streaming does not read "
                              f"({', '.join(_DTYPES)}); set QUANTATLAS_STREAM=0")
        if nbytes == 0:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        arr = np.memmap(file, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
        return torch.frombuffer(arr, dtype=_DTYPES[dtype]).reshape(shape)


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
            if key in reader:
                t.copy_(reader.tensor(key))
            elif not name.endswith("inv_freq"):
                raise StreamError(f"tensor {key!r} is in none of the safetensors files")
    return module


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
        if lay.family != "llama" or lay.final_norm is None or lay.head is None or lay.embed is None:
            raise StreamError(f"model {str(folder)!r}: layer streaming supports Llama-family decoders "
                              f"(Llama, Mistral, Qwen2, Qwen3), not {lay.arch or lay.model_class}")
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise StreamError(f"model {str(folder)!r}: layer streaming does not apply logit soft-capping")
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

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}.{i}."

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `tokens` ([b, seq]) in fp32, read from the mapped file."""
        table = self.reader.tensor(self.embed_name)
        return table[tokens.reshape(-1)].float().reshape(*tokens.shape, -1)

    @torch.no_grad()
    def layer_inputs(self, tokens: torch.Tensor, batch: int):
        """(hidden, args, kwargs) reaching decoder layer 0, per batch of `tokens` [n, seq]."""
        from quantatlas.quant.quantize import _Stop

        captured = []

        def hook(module, args, kwargs):
            hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
            kwargs["use_cache"] = False
            captured.append((hidden, rest, kwargs))
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for i in range(0, tokens.shape[0], batch):
                try:
                    self.model(inputs_embeds=self.embed(tokens[i:i + batch]), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def scored_logits(self, es, batch: int, chunk: int = 8192):
        """`eval.windows.scored_logits` streamed: (offset, logits [b * scored, V]) in window order."""
        from quantatlas.quant.quantize import _run_layer

        _return_freed_memory()
        inputs = self.layer_inputs(es.windows, batch)
        hidden = [h for h, _, _ in inputs]
        for i, layer in enumerate(self.layers):
            materialise(layer, self.layer_prefix(i), self.reader)
            hidden = [_run_layer(layer, h, r, k) for h, (_, r, k) in zip(hidden, inputs)]
            release(layer)
            _return_freed_memory()
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


def _return_freed_memory() -> None:
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


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> int:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save_packed(packed: dict, path: Path) -> None:
    """Packed tensors of one layer: data under `<param>::<key>`, codec/options/shape in the metadata."""
    tensors, meta = {}, {}
    for name, p in packed.items():
        for key, t in p.data.items():
            tensors[f"{name}::{key}"] = t.cpu()
        meta[name] = json.dumps({"codec": p.codec, "config": p.config, "shape": list(p.shape)})
    _save(tensors, path, meta)


def load_packed(folder: str | Path) -> dict:
    """The packed tensors a streaming run wrote, by parameter name (for the artifact and tests)."""
    from quantatlas.quant.codecs.base import Packed

    reader = ShardReader([folder])
    out = {}
    for file, meta in reader.metadata.items():
        if not file.name.startswith("packed_"):
            continue
        for name, blob in meta.items():
            m = json.loads(blob)
            data = {k.split("::", 1)[1]: reader.tensor(k).clone() for k, e in reader.entries.items()
                    if e[0] == file and k.split("::", 1)[0] == name}
            out[name] = Packed(m["codec"], m["config"], tuple(m["shape"]), data)
    return out


def _check_recipe(recipe) -> None:
    if recipe.transforms:
        raise StreamError("layer streaming: transforms need the whole model; run this arm without streaming")
    if recipe.mixture is not None:
        raise StreamError("layer streaming: llama.cpp mixtures (codec: gguf) need the whole model")


@torch.no_grad()
def quantize_streamed(sm: StreamedModel, recipe, calib: torch.Tensor | None, seed: int, out_dir: str | Path,
                      progress=None, log=None, batch: int = 8) -> dict:
    """The recipe's weight step, one decoder layer resident at a time (module docstring). Writes the
    quantized layers and packed codes to `out_dir`; returns the bit counts
    (`bits_per_weight`, `bits_per_param`, `bytes_packed`, `quantized_params`, `total_params`)."""
    from quantatlas.quant.quantize import LayerStream, for_run, quantize_layer, solve_direct, tensors_to_quantize

    _check_recipe(recipe)
    _return_freed_memory()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = sm.model
    plans = [p for p in recipe.plan(tensors_to_quantize(model, recipe), model) if p.codec is not None]
    for_run(plans, seed)
    layered = [p for p in plans if p.solver.needs and p.layer is not None and not p.is_vector]
    direct = [p for p in plans if p not in layered]
    if layered and calib is None:
        raise ValueError("a GPTQ-family solver needs calibration data")
    qbytes = qparams = 0

    def count(packed: dict):
        nonlocal qbytes, qparams
        for p in packed.values():
            if len(p.shape) == 2:
                qbytes += p.nbytes
                qparams += p.shape[0] * p.shape[1]

    # outside the layers: the head (include_head), the final norm (an override): one module at a time
    rest_packed, rest_tensors = {}, {}
    for p in [p for p in direct if p.layer is None]:
        module = p.target.module
        materialise(module, p.name + ".", sm.reader, {"weight": sm.head_name} if p.target.role == "head" else None)
        rest_packed[p.name + ".weight"] = solve_direct(p)
        key = sm.head_name if p.target.role == "head" else p.name + ".weight"
        rest_tensors[key] = module.weight.detach().clone()
        release(module)
        if progress:
            progress(1)
    if rest_tensors:
        _save(rest_tensors, out / "rest.safetensors")
        _save_packed(rest_packed, out / "packed_rest.safetensors")
        count(rest_packed)
        del rest_tensors, rest_packed
    # a quantized tied head is the embedding: calibration then starts from it, as in memory
    embed_from = sm.over(out) if (out / "rest.safetensors").exists() else sm
    stream = LayerStream(embed_from.layer_inputs(calib, batch), recipe, layered) if layered else None
    for i, layer in enumerate(sm.layers):
        todo_direct = [p for p in direct if p.layer == i]
        todo = [p for p in layered if p.layer == i]
        if not (todo or todo_direct or stream is not None):
            continue
        prefix = sm.layer_prefix(i)
        materialise(layer, prefix, sm.reader)
        packed: dict = {}
        for p in todo_direct:
            packed[p.name + ".weight"] = solve_direct(p)
            if progress:
                progress(1)
        if stream is not None:
            quantize_layer(layer, todo, recipe, stream, packed, progress)
        if packed:
            _save({prefix + n: t for n, t in layer.state_dict().items()}, out / f"layer_{i:05d}.safetensors")
            _save_packed(packed, out / f"packed_{i:05d}.safetensors")
            count(packed)
        release(layer)
        _return_freed_memory()
        if log:
            mem = rss_mb()
            log(f"layer {i + 1}/{sm.n_layers}: rss {mem['rss']:.0f} MiB, peak {mem['hwm']:.0f} MiB")
    total = n_params(model)
    payload = qbytes + 2 * (total - qparams)
    summary = {"bits_per_weight": 8.0 * qbytes / qparams if qparams else 16.0,
               "bits_per_param": 8.0 * payload / total, "bytes_packed": payload,
               "quantized_params": qparams, "total_params": total}
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


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


class StreamedPacked(dict):
    """What `quantize_model` returns for a layer-streamed model: no tensors in memory (they are in
    `folder`, `load_packed` reads them), and the bit counts in `summary`."""

    def __init__(self, summary: dict, folder: Path):
        super().__init__()
        self.summary, self.folder = summary, folder


def quantize_skeleton(model: torch.nn.Module, recipe, calib, seed: int, progress=None) -> StreamedPacked:
    """`quantize_model` for a layer-streamed skeleton (`model._qa_stream`): the quantized layers go to a
    temporary folder under the cache, removed when the model is; the model then reads its layers there."""
    import shutil
    import tempfile
    import weakref

    from quantatlas.eval.windows import cache_dir

    if getattr(recipe, "recovery", None) is not None:
        raise StreamError("layer streaming: recovery (finetuning) needs the whole model; run this arm without streaming")
    _check_recipe(recipe)
    sm = model._qa_stream
    root = cache_dir() / "stream"
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="quantized-", dir=root))
    try:
        summary = quantize_streamed(sm, recipe, calib, seed, out, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    model._qa_stream = sm.over(out)
    weakref.finalize(model._qa_stream, shutil.rmtree, str(out), True)
    return StreamedPacked(summary, out)


def check_streamable(spec, name: str, recipe) -> None:
    """Refuse, in one line, what a layer-streamed run cannot do (before any work is done)."""
    where = f"arms.{name}"
    if spec.arms[name].allocate is not None:
        raise StreamError(f"{where}.allocate: sensitivity and allocation need the whole model; "
                          "set QUANTATLAS_STREAM=0 to run it in memory")
    if spec.artifact is not None:
        raise StreamError("artifact: the artifact cap needs the whole artifact file, which a layer-streamed run "
                          "does not write; set QUANTATLAS_STREAM=0")
    if getattr(recipe, "recovery", None) is not None:
        raise StreamError(f"{where}.recovery: finetuning needs the whole model; set QUANTATLAS_STREAM=0")
    try:
        _check_recipe(recipe)
    except StreamError as e:
        raise StreamError(f"{where}: {e}; set QUANTATLAS_STREAM=0") from None
