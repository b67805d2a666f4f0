"""Exports of quantized models: GGUF for llama.cpp."""
from quantatlas.export.gguf import GGML_TYPES, gguf_arch, gguf_tensor_names, llama_permute, write_gguf

__all__ = ["GGML_TYPES", "gguf_arch", "gguf_tensor_names", "llama_permute", "write_gguf"]
