"""The state_dict layout of every model BackdoorBench's factory builds, read from BackdoorBench itself.

``BACKDOORBENCH_MODELS`` are the names ``generate_cls_model`` lists (utils/aggregate_block/model_trainer_generate.py
at the commit in ``backdoorbench_state_dicts.json``). ``fingerprint`` reduces a state_dict to its parameter
names and shapes (what ``load_state_dict`` checks), as a key count and a hash. Run this file against a
BackdoorBench checkout to (re)write the JSON the tests compare our factory with; it builds each model with
BackdoorBench's own code on the meta device (no memory, no weights: the download of the ImageNet weights its
``vit_*`` and ``convnext_tiny`` start from is skipped, as it does not change a name or a shape):

    python -m tests.models.backdoorbench_state_dicts /path/to/BackdoorBench [COMMIT] > tests/models/backdoorbench_state_dicts.json

(COMMIT: the checkout's commit, for a checkout without its .git folder.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Mapping

import torch

JSON_PATH = Path(__file__).with_suffix(".json")
NUM_CLASSES = 10
BACKDOORBENCH_MODELS = (
    "preactresnet18", "resnet18", "resnet34", "resnet50", "alexnet", "vgg11", "vgg16", "vgg19", "vgg19_bn",
    "squeezenet1_0", "densenet121", "densenet161", "inception_v3", "googlenet", "shufflenet_v2_x1_0",
    "mobilenet_v2", "mobilenet_v3_large", "resnext50_32x4d", "wide_resnet50_2", "mnasnet1_0", "efficientnet_b0",
    "efficientnet_b3", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "resnext29", "senet18", "convnext_tiny",
)


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Entry count and a hash of the sorted ``name shape`` lines: equal fingerprints load into each other."""
    lines = sorted(f"{name} {tuple(tensor.shape)}" for name, tensor in state_dict.items())
    return {"entries": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def _build_with_backdoorbench(root: Path, name: str) -> torch.nn.Module:
    from utils.aggregate_block.model_trainer_generate import generate_cls_model  # type: ignore

    try:
        return generate_cls_model(name, NUM_CLASSES)
    except TypeError:  # senet18, resnext29: the factory passes num_classes its builder does not take
        if name == "senet18":
            from models.senet import PreActBlock, SENet  # type: ignore
            return SENet(PreActBlock, [2, 2, 2, 2], num_classes=NUM_CLASSES)
        from models.resnext import ResNeXt  # type: ignore
        return ResNeXt(num_blocks=[3, 3, 3], cardinality=2, bottleneck_width=64, num_classes=NUM_CLASSES)


def main(root: Path, commit: str = "") -> dict[str, object]:
    from torchvision.models import _api

    sys.path.insert(0, str(root))
    no_weights = object()
    _api.WeightsEnum.get_state_dict = lambda self, *a, **k: no_weights
    load = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None if sd is no_weights else load(self, sd, *a, **k)
    commit = commit or subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                      capture_output=True, text=True).stdout.strip()
    out: dict[str, object] = {"backdoorbench_commit": commit or "unknown", "num_classes": NUM_CLASSES}
    with warnings.catch_warnings(), torch.device("meta"), contextlib.redirect_stdout(sys.stderr):  # its prints
        warnings.simplefilter("ignore")
        for name in BACKDOORBENCH_MODELS:
            out[name] = fingerprint(_build_with_backdoorbench(root, name).state_dict())
    return out


def expected() -> dict[str, object]:
    return json.loads(JSON_PATH.read_text())


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]).resolve(), *sys.argv[2:3]), indent=1))
