"""Models: loading, tensor roles, calibration capture, layer-by-layer iteration."""
from quantatlas.models.load import LoadedModel, ModelLoadError, load_model

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]
