"""Model factory: BackdoorBench-compatible PreActResNet18, small CPU models, any torchvision classifier."""
from fst_plugin.models.factory import available_models, build_model

__all__ = ["available_models", "build_model"]
