"""Install thin launchers and configs into a BackdoorBench checkout, and remove exactly those again.

``install`` writes, for every registered defense, ``defense/<name>.py`` (a five-line launcher calling
:func:`fst_plugin.adapter.launcher.main`) and ``config/defense/<name>/{config,cifar10,cifar100,gtsrb,
tiny}.yaml`` (from ``defense_configs/``), and records each file with its hash in ``.fst_plugin_manifest.json``.
A file that exists and is not ours is never overwritten (unless ``force``); BackdoorBench's own
``defense/ft.py`` and friends are never touched. ``uninstall`` removes the files of the manifest that still
hold what we wrote.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from fst_plugin.defense.shipped import shipped_config, shipped_configs_dir
from fst_plugin.errors import InstallError
from fst_plugin.io_utils import atomic_write_text
from fst_plugin.plugins import available_defenses

MANIFEST = ".fst_plugin_manifest.json"
CONFIG_NAMES = ("config", "cifar10", "cifar100", "gtsrb", "tiny")
LAUNCHER = '''"""{name}: written by backdoorbench-fst (`fst-plugin install`); `fst-plugin uninstall` removes it."""
import sys

from fst_plugin.adapter.launcher import main

if __name__ == "__main__":
    sys.exit(main("{name}"))
'''


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_backdoorbench(root: Path) -> Path:
    root = Path(root).expanduser()
    if not (root / "defense" / "base.py").is_file() or not (root / "config").is_dir():
        raise InstallError(f"{root} is not a BackdoorBench checkout (no defense/base.py and config/)",
                           "pass --backdoorbench pointing at the root of your BackdoorBench clone")
    return root.resolve()


def default_config(method: str, dataset: str) -> str:
    return shipped_config(method, dataset).read_text()


def _read_manifest(root: Path) -> dict[str, str]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InstallError(f"{path} is corrupt", "delete it and remove the plugin's files by hand, or reinstall with --force") from None


@dataclass
class InstallPlan:
    files: dict[str, str] = field(default_factory=dict)  # relative path -> content


def has_shipped_config(method: str) -> bool:
    return (shipped_configs_dir() / method / "cifar10.yaml").is_file()


def plan_install(methods: list[str]) -> InstallPlan:
    """Launchers for every method; configs for those this package ships yamls for (third-party
    defenses registered through the entry point bring their own)."""
    plan = InstallPlan()
    for name in methods:
        plan.files[f"defense/{name}.py"] = LAUNCHER.format(name=name)
        if has_shipped_config(name):
            for dataset in CONFIG_NAMES:
                plan.files[f"config/defense/{name}/{dataset}.yaml"] = default_config(name, dataset)
    return plan


def install(root: Path, force: bool = False, methods: list[str] | None = None) -> list[Path]:
    """Write the launchers and configs; return the files written."""
    root = check_backdoorbench(root)
    return write_plan(root, plan_install(methods or list(available_defenses())), force)


def write_plan(root: Path, plan: InstallPlan, force: bool = False) -> list[Path]:
    """Write ``plan`` into ``root`` and record it in the manifest (shared by install and export): a file
    this package did not write is never replaced unless ``force``, and nothing is written if one is in the way."""
    manifest = _read_manifest(root)
    for rel in plan.files:
        target = root / rel
        blocked = next((p for p in [target, *target.parents] if p.exists() and not p.is_dir()), None)
        if target.is_dir() or (blocked is not None and blocked != target):
            raise InstallError(f"{blocked if blocked is not None else target} is in the way of {target}",
                               "move it away and run the command again")
        if target.exists() and not force:
            ours = rel in manifest and _sha(target.read_text(errors="replace")) == manifest[rel]
            if not ours:
                raise InstallError(f"{target} exists and was not written by fst-plugin",
                                   "move it away, or pass --force to overwrite it")
    written = []
    for rel, content in plan.files.items():
        atomic_write_text(root / rel, content)
        manifest[rel] = _sha(content)
        written.append(root / rel)
    atomic_write_text(root / MANIFEST, json.dumps({"files": manifest}, indent=2, sort_keys=True))
    return written


def uninstall(root: Path) -> tuple[list[Path], list[Path]]:
    """Remove what ``install`` wrote; return (removed, kept because edited since)."""
    root = check_backdoorbench(root)
    manifest = _read_manifest(root)
    if not manifest:
        raise InstallError(f"nothing of fst-plugin is installed in {root} (no {MANIFEST})",
                           "nothing to do; install with fst-plugin install --backdoorbench DIR")
    removed, kept = [], []
    for rel, digest in sorted(manifest.items()):
        target = root / rel
        if not target.is_file():
            continue
        if _sha(target.read_text(errors="replace")) != digest:
            kept.append(target)
            continue
        target.unlink()
        removed.append(target)
        parent = target.parent
        if parent.name not in ("defense", "config") and parent != root and not any(parent.iterdir()):
            parent.rmdir()
    if kept:
        atomic_write_text(root / MANIFEST, json.dumps(
            {"files": {str(p.relative_to(root)): manifest[str(p.relative_to(root))] for p in kept}}, indent=2))
    else:
        (root / MANIFEST).unlink()
    return removed, kept
