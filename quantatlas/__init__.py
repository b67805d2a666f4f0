"""quantatlas: an open research atlas for LLM quantization."""
__version__ = "0.1.0"
