"""compressed-tensors folders (llm-compressor's output, what vLLM loads), decoded by the
compressed-tensors package itself: the folder's quantization_config is validated as its
QuantizationConfig; each config group's targets and ignore list are matched to the model's modules
by its own matcher; each matched module's stored tensors (weight_packed, weight_scale,
weight_zero_point, weight_shape, ...) go through the compressor registered for the group's format
(pack-quantized, int-quantized, float-quantized, naive-quantized, nvfp4/mxfp4-pack-quantized, ...),
whose `decompress` returns the weight.

The package is a test dependency of quantatlas (the `test` extra), imported only when such an artifact
is read; without it the arm is refused in one line. An artifact that also quantizes activations
(input_activations) or the KV cache (kv_cache_scheme) is refused unless the arm applies its own
(`act:` / `kv:`): an artifact arm loads weights only, so its numbers would not be the scheme's.
"""
from __future__ import annotations

import re

import torch

from quantatlas.quant.external.folder import FolderReader
from quantatlas.quant.external.stored import ArtifactError, clip
from quantatlas.quant.external.reader import Entry

#: per-module tensors of activation and KV-cache schemes: stored, no parameter (allowed with act: / kv:)
ACT_TENSORS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point")
KV_TENSORS = ("k_scale", "v_scale", "k_zero_point", "v_zero_point")
#: what the package's decompressors raise on tensors that do not fit their scheme (a wrong shape, group size)
DECODE_ERRORS = (ValueError, RuntimeError, TypeError, AttributeError, IndexError, KeyError)


def import_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ArtifactError("compressed-tensors artifacts are decoded by the compressed-tensors package, which is "
                            "not installed: pip install compressed-tensors (or quantatlas[test])") from None


class CompressedTensorsReader(FolderReader):
    def __init__(self, listing):
        super().__init__(listing)
        self._schemes: dict[str, object] = {}   # module -> its QuantizationScheme
        self._formats: dict[str, str] = {}      # module -> compressor format
        self.free = frozenset()

    def config(self):
        import_compressed_tensors()
        from compressed_tensors.quantization import QuantizationConfig
        from pydantic import ValidationError

        where = self.listing.path / "config.json"
        q = self.listing.config.get("quantization_config")
        self._check_group_formats(q)
        try:
            return QuantizationConfig.model_validate(q)
        except ValidationError as e:
            err = e.errors()[0]
            # the package's locations include its validators' names ("function-after[...]"): not fields
            field = ".".join(["quantization_config"] + [str(x) for x in err["loc"] if "[" not in str(x)])
            raise ArtifactError(f"{where}: {field}: {clip(repr(err['input']), 80)} is not compressed-tensors' "
                                f"({err['msg']})") from None

    def _check_group_formats(self, q) -> None:
        """A config group's `format` must be one of the package's CompressionFormat names (its own validation
        says so without naming the group or the value)."""
        from compressed_tensors.config import CompressionFormat

        groups = q.get("config_groups") if isinstance(q, dict) else None
        known = [f.value for f in CompressionFormat]
        for name, g in (groups.items() if isinstance(groups, dict) else ()):
            fmt = g.get("format") if isinstance(g, dict) else None
            if fmt is not None and fmt not in known:
                raise ArtifactError(f"{self.listing.path / 'config.json'}: quantization_config.config_groups.{name}"
                                    f".format: {clip(repr(fmt), 80)} is not a compressed-tensors format (one of "
                                    f"{', '.join(known)})")

    def check(self, model, arm) -> None:
        super().check(model, arm)
        q = self.config()
        acts = [n for n, g in q.config_groups.items() if g.input_activations is not None
                or g.output_activations is not None]
        if acts and getattr(arm, "act", None) is None:
            raise ArtifactError(f"config group {acts[0]} also quantizes activations, which an artifact arm does not "
                                "apply: give the arm an `act:` block to measure them (or use a weight-only artifact)")
        if q.kv_cache_scheme is not None and getattr(arm, "kv", None) is None:
            raise ArtifactError("the artifact also quantizes the KV cache (kv_cache_scheme), which an artifact arm "
                                "does not apply: give the arm a `kv:` block to measure it")
        free = set()
        for name in self.listing.tensors:
            local = name.rpartition(".")[2]
            if (local in ACT_TENSORS and acts) or (local in KV_TENSORS and q.kv_cache_scheme is not None):
                free.add(name)
        self.free = frozenset(free)

    def entries(self, model) -> list[Entry]:
        from compressed_tensors.compressors.base import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.utils.match import match_named_modules

        q = self.config()
        stored = self.listing.tensors
        out, claimed, probed = [], set(self.free), set()
        for group_name, scheme in q.config_groups.items():
            try:
                matched = list(match_named_modules(model, scheme.targets, q.ignore))
            except re.error as e:   # a "re:" target or ignore entry that is no regular expression
                raise ArtifactError(f"config group {group_name}: targets {scheme.targets} / ignore {q.ignore}: "
                                    f"a pattern is no regular expression ({e})") from None
            for module_name, module in matched:
                if module_name in self._schemes:
                    raise ArtifactError(f"module {module_name} is matched by two config groups")
                local = {n.rpartition(".")[2]: n for n in stored if n.rpartition(".")[0] == module_name}
                weights = {k: n for k, n in local.items() if k.startswith("weight") and k != "weight"}
                if not weights:      # targeted but stored as plain numbers: not quantized in this file
                    continue
                if scheme.weights is None:
                    raise ArtifactError(f"tensor {min(weights.values())} is stored, but config group {group_name} "
                                        f"quantizes no weights (quantization_config.config_groups.{group_name}"
                                        ".weights)")
                if scheme.format is not None:
                    fmt, source = scheme.format, f"quantization_config.config_groups.{group_name}.format"
                elif q.format not in (None, CompressionFormat.mixed_precision.value):
                    fmt, source = q.format, "quantization_config.format"
                else:
                    fmt, source = infer_module_format(type(module), scheme), "inferred from the scheme"
                try:
                    fmt = CompressionFormat(fmt).value
                    compressor = BaseCompressor.get_value_from_registry(fmt)
                except (ValueError, KeyError):
                    raise ArtifactError(f"config group {group_name}: format {fmt!r} ({source}) is "
                                        "no compressor compressed-tensors has") from None
                need = compressor.compression_param_names(scheme)
                missing = [k for k in need if k not in local and k.startswith("weight")]
                if missing:
                    raise ArtifactError(f"tensor {module_name}.{missing[0]} is missing ({fmt}, config group "
                                        f"{group_name})")
                if "weight_shape" in weights:
                    shape = self.tensor(weights["weight_shape"]).tolist()
                    if shape != list(module.weight.shape):
                        raise ArtifactError(f"tensor {weights['weight_shape']} is {shape}, the model's "
                                            f"{module_name}.weight is {list(module.weight.shape)}")
                if "weight_g_idx" in weights:
                    self._refuse_group_order(module_name, weights["weight_g_idx"], scheme)
                self._schemes[module_name], self._formats[module_name] = scheme, fmt
                parts = tuple(sorted(weights.values()))
                if "weight" in local:   # float-quantized formats store the codes as `weight` (fp8)
                    parts = (local["weight"],) + parts
                entry = Entry(f"{module_name}.weight", parts, tuple(module.weight.shape), True)
                if (group_name, fmt) not in probed:   # one module decoded per group: tensors that do not fit
                    probed.add((group_name, fmt))     # its scheme (a group size, ...) are refused before a run
                    self.decode(entry)
                out.append(entry)
                claimed.update(parts)
        return out + self.plain_entries(claimed)

    def _refuse_group_order(self, module: str, name: str, scheme) -> None:
        """compressed-tensors dropped activation-order GROUP (a column permutation in weight_g_idx) from its
        decompressor; an artifact that needs one is refused rather than decoded in the wrong order."""
        g = self.tensor(name).long()
        size = scheme.weights.group_size or g.numel()
        if not torch.equal(g, torch.arange(g.numel()) // size):
            raise ArtifactError(f"tensor {name} orders columns by activation (actorder group), which "
                                "compressed-tensors' decompressor no longer applies")

    def decode(self, entry: Entry) -> torch.Tensor:
        if not entry.quantized:
            return super().decode(entry)
        from compressed_tensors.compressors.base import BaseCompressor

        module = entry.param.removesuffix(".weight")
        state = {name.rpartition(".")[2]: self.tensor(name) for name in entry.stored}
        state.pop("weight_g_idx", None)
        fmt = self._formats[module]
        try:
            w = BaseCompressor.get_value_from_registry(fmt).decompress(state, self._schemes[module])["weight"]
        except DECODE_ERRORS as e:
            why = clip((str(e).splitlines() or [""])[0], 200)
            raise ArtifactError(f"tensors {', '.join(entry.stored)} do not decode as {fmt} with their config "
                                f"group's scheme ({type(e).__name__}: {why})") from None
        if tuple(w.shape) != entry.shape:
            raise ArtifactError(f"tensors {', '.join(entry.stored)} decode as {fmt} to shape {list(w.shape)}, the "
                                f"model's {entry.param} is {list(entry.shape)}")
        return w.float()
