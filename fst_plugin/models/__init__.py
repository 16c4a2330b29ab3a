"""Model factory: every model of BackdoorBench's generate_cls_model in its state_dict layout, small CPU models,
any torchvision classifier."""
from fst_plugin.models.factory import available_models, build_model

__all__ = ["available_models", "build_model"]
