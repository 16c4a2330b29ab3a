"""Lets a BackdoorBench process build this package's CPU models by name (``resnet9_cpu``, ...).

``run_defenses --backdoorbench`` puts this folder first on the PYTHONPATH of BackdoorBench's defense scripts,
so Python runs this file at start-up. It changes nothing in BackdoorBench's checkout: it wraps
``utils.aggregate_block.model_trainer_generate.generate_cls_model`` as that module is imported, before a defense
script's ``from ... import generate_cls_model`` binds the name, so the names in ``FST_BB_MODELS`` (set by the
runner) build ``fst_plugin.models.build_model``'s model and every other name BackdoorBench's own. Any other
``sitecustomize`` on the path (a site's or a test harness's) still runs, first.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

TARGET = "utils.aggregate_block.model_trainer_generate"
HERE = os.path.dirname(os.path.abspath(__file__))


def _run_next_sitecustomize() -> None:
    """The ``sitecustomize`` Python would have run without this one (the first on the path after this folder)."""
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _wrap(module) -> None:
    """Route the model names of ``FST_BB_MODELS`` to fst_plugin's factory; BackdoorBench's keep its own."""
    names = set(filter(None, os.environ.get("FST_BB_MODELS", "").split(",")))
    backdoorbench_factory = module.generate_cls_model

    def generate_cls_model(model_name, num_classes=10, image_size=32, **kwargs):
        if model_name in names:
            from fst_plugin.models import build_model

            return build_model(model_name, num_classes)
        return backdoorbench_factory(model_name, num_classes, image_size, **kwargs)

    generate_cls_model.__doc__ = backdoorbench_factory.__doc__
    module.generate_cls_model = generate_cls_model


class _WrapOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``TARGET`` as Python would, and wraps its factory right after the module's code has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self.inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _wrap(module)


_run_next_sitecustomize()
sys.meta_path.insert(0, _WrapOnImport())
