"""Loading a model named in a spec: the embedded reference, a local HF folder, or a hub id.

A loaded model comes with its token streams (eval and calibration) and a hash of its
weights, so results are only ever compared on the same model and the same tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from quantatlas.errors import UserError

class ModelLoadError(UserError):
    """A model or data source that cannot be loaded as named (`field` is `model` where the spec's model is
    at fault; a data source's field is known to the caller, which names eval or calibration)."""


@dataclass
class LoadedModel:
    """A model and its backend: held in memory (`model` is the model), or layer-streamed (`streamed`
    reads one decoder layer at a time from the folder's shards; `model` is its meta-device skeleton)."""
    model: torch.nn.Module
    source: str          # as written in the spec
    model_hash: str
    tokenizer: object | None  # None for the byte-level reference model
    streamed: object | None = None  # a models.stream.StreamedModel, or None (in memory)

    @property
    def backend(self) -> str:
        return "memory" if self.streamed is None else "stream"

    @property
    def forward(self):
        """What evaluation runs: the in-memory model, or the streamed one (eval/windows.py dispatches)."""
        return self.model if self.streamed is None else self.streamed

    def text_tokens(self, source: str, split: str) -> np.ndarray:
        """Token stream for evaluation/calibration: `stdlib` (or `reference`), the reference corpus's
        fixed splits shipped with the package (`eval`, `validation`; `train` gives the fixed calibration
        sample of the train split), the same on every Python; or a path to a text file."""
        from quantatlas.reference import corpus, data as fixed_data, splits

        if source in ("stdlib", "reference"):
            fixed = {"eval": "eval", "validation": "validation", "train": "calib", "calib": "calib"}.get(split)
            if fixed is None:
                raise ModelLoadError(f"data source {source!r}: unknown split {split!r}")
            if self.tokenizer is None:
                return splits.fixed_tokens(fixed)
            return self._tokenize_texts(d.decode("utf-8", errors="replace") for d in fixed_data.documents(fixed))
        if source.startswith("hf:"):
            if self.tokenizer is None:
                raise ModelLoadError(f"data source {source!r}: this model has no tokenizer, and hub text needs one "
                                     "(a byte-level model reads 'stdlib' or a text file)")
            return self._tokenize_texts(_hub_texts(source, split))
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"data source {source!r}: no such file (use 'stdlib', a path to a text file, "
                                 "or a hub dataset hf:org/name[:config])")
        if self.tokenizer is None:
            data = path.read_bytes()
            return np.concatenate([[corpus.BOS], np.frombuffer(data, np.uint8).astype(np.int64), [corpus.EOS]])
        return self._tokenize_texts([path.read_text(errors="replace")])

    def _tokenize_texts(self, texts) -> np.ndarray:
        tok = self.tokenizer
        sep = tok.eos_token_id if tok.eos_token_id is not None else 0
        parts = []
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            parts.append(np.asarray(ids + [sep], dtype=np.int64))
        return np.concatenate(parts)

    @cached_property
    def n_params(self) -> int:
        seen, n = set(), 0
        for p in self.model.parameters():
            key = id(p) if p.is_meta else p.data_ptr()  # a layer-streamed skeleton: every meta pointer is 0
            if key not in seen:
                seen.add(key)
                n += p.numel()
        return n


def _hub_texts(source: str, split: str) -> list[str]:
    """The `text` column of a hub dataset `hf:org/name[:config]`: the `test` split (else `validation`)
    for evaluation, `train` for calibration."""
    name, _, config = source[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise ModelLoadError(f"data source {source!r}: hub datasets need the `datasets` package "
                             "(pip install datasets)") from None
    splits = ["train"] if split == "train" else ["test", "validation"]
    last = None
    for sp in splits:
        try:
            ds = datasets.load_dataset(name, config or None, split=sp)
        except Exception as e:  # noqa: BLE001 - the hub's errors are many; the user needs one line
            last = e
            continue
        if "text" not in ds.column_names:
            raise ModelLoadError(f"data source {source!r}: no `text` column (columns: {', '.join(ds.column_names)})")
        texts = [t for t in ds["text"] if t]
        if not texts:
            raise ModelLoadError(f"data source {source!r}: split {sp!r} has no text")
        return texts
    raise ModelLoadError(f"data source {source!r}: could not load split {'/'.join(splits)} "
                         f"({type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''})")


def _hash_files(files) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_model(source: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               stream: bool | None = None) -> LoadedModel:
    """An embedded model (`reference`, `reference-llama`, `reference-moe`), a local folder with config.json, or
    `hf:org/name` (or `org/name`) from the hub.

    A local folder (or hub snapshot) with safetensors weights may be layer-streamed
    (`quantatlas/models/stream.py`): `stream` True/False, else $QUANTATLAS_STREAM (1/0/auto), else
    the automatic rule: stream when its weights in fp32 would take more than half the available memory.
    A streamed model is a meta-device skeleton; evaluation and quantization read one decoder layer at a time."""
    from quantatlas.reference.model import is_reference_model

    if is_reference_model(source):   # reference, reference-llama, reference-moe: embedded, byte-level
        from quantatlas.reference.model import load_reference, reference_weights

        model = load_reference(dtype=dtype, device=device, name=source)
        return LoadedModel(model, source, _hash_files([reference_weights(source)]), None)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model {source!r}: folder has no config.json", "model")
        weights = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
        if not weights:
            raise ModelLoadError(f"model {source!r}: folder has no *.safetensors or *.bin weights", "model")
        tok = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
        if _streaming(path, stream, weights[0].suffix == ".safetensors", device):
            from quantatlas.models.stream import StreamedModel

            sm = StreamedModel(path)
            return LoadedModel(sm.model, source, _hash_files(weights), tok, sm)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device).eval()
        return LoadedModel(model, source, _hash_files(weights), tok)

    repo = source[3:] if source.startswith("hf:") else source
    if "/" not in repo or source.startswith((".", "/")):
        raise ModelLoadError(f"model {source!r}: not an embedded model (reference, reference-llama, reference-moe), "
                             "not a local folder, and not a hub id like hf:org/name", "model")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - the hub's errors are many; the user needs one line
        raise ModelLoadError(f"model {source!r}: could not fetch from the Hugging Face hub ({type(e).__name__})",
                             "model") from None
    lm = load_model(local, device, dtype, stream)
    lm.source = source  # as written in the spec
    return lm


def _streaming(path: Path, stream: bool | None, safetensors: bool, device) -> bool:
    """Whether to layer-stream the folder: asked for (`stream`, $QUANTATLAS_STREAM) or by the automatic
    rule; refused, in one line, where it cannot happen (*.bin weights) or would not run where asked
    (streamed layers run on the CPU)."""
    from quantatlas.models.stream import should_stream, stream_mode

    mode = stream_mode(stream)
    if not safetensors:
        if mode:
            raise ModelLoadError(f"model {str(path)!r}: layer streaming reads *.safetensors weights; this folder has "
                                 "*.bin (set QUANTATLAS_STREAM=0, or convert the weights)", "model")
        return False
    streamed = should_stream(path) if mode is None else mode
    try:
        on_cpu = torch.device(device).type == "cpu"
    except RuntimeError:
        raise ModelLoadError(f"device {str(device)!r}: not a torch device (cpu, cuda, cuda:1 ...)") from None
    if streamed and not on_cpu:
        raise ModelLoadError(f"model {str(path)!r}: layer streaming runs on the CPU, not on {device}; use --device cpu, "
                             "or QUANTATLAS_STREAM=0 to load the whole model on the device", "model")
    return streamed


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
