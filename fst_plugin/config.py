"""Moved: the defense's settings are :mod:`fst_plugin.defense.config`, the shipped yamls
:mod:`fst_plugin.defense.shipped`. This module only keeps :mod:`fst_plugin.installer` (another branch's file)
importing until that branch imports from there; then delete it."""
from fst_plugin.defense.shipped import shipped_config, shipped_configs_dir

__all__ = ["shipped_config", "shipped_configs_dir"]
