"""Defenses registered under the entry-point group ``backdoorbench.defenses``.

This package registers its five; any installed package can add its own by declaring, in its pyproject.toml or setup.py,
``entry_points={"backdoorbench.defenses": ["mydef = mypkg.module:MyDefense"]}``. The installer and the CLI
see every registered defense through :func:`available_defenses`.
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from fst_plugin.errors import ConfigError

GROUP = "backdoorbench.defenses"


def available_defenses() -> dict[str, EntryPoint]:
    """Registered defense name → entry point, sorted by name."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    return dict(sorted(found.items()))


def load_defense(name: str) -> type:
    """The defense class registered as ``name``."""
    defenses = available_defenses()
    if name not in defenses:
        known = ", ".join(defenses) or "none (is backdoorbench-fst installed with pip install -e .?)"
        raise ConfigError(f"no defense named {name!r} is registered", f"use one of: {known}")
    return defenses[name].load()
