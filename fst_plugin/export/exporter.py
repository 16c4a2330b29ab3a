"""Export FST and its baselines as self-contained BackdoorBench defenses, ready for an upstream pull request.

``fst-plugin export`` writes, per method, ``defense/<method>.py`` in BackdoorBench's own style (one class
subclassing ``defense.base.defense``, its life cycle and argument names, its loaders, transforms, model
factory, ``choose_index``, result saving, CSVs and plots) and ``config/defense/<method>/*.yaml``. The script
imports nothing of this package, yet runs its code: it is rendered from ``defense.py.tmpl`` with the core's own
source pasted in (:mod:`fst_plugin.export.core_source`), the mode from the mode table, and the arguments and
defaults from ``DefenseConfig``'s option declarations, so the two forms cannot drift apart. The files go to the
same paths as ``install``'s launchers and into the same manifest, so export replaces installed launchers and
``uninstall`` removes either form. On the CPU the exported defense ends with the plugin's weights
(tests/export/test_export.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Any, Optional

from fst_plugin import __version__
from fst_plugin.core import TuningConfig, TuningMode, choose_alpha, find_head, fixed_alpha, split_held_out, tune
from fst_plugin.core.modes import MODES
from fst_plugin.core.unlearning import ReversedSamples
from fst_plugin.defense.config import (DefenseConfig, alpha_search, lr_schedule_of, parse_alpha, parse_pam,
                                       parse_projection, unlearning_config)
from fst_plugin.errors import InstallError
from fst_plugin.export.core_source import check_script, paste
from fst_plugin.export.installer import (CONFIG_NAMES, InstallPlan, check_backdoorbench, default_config,
                                         has_shipped_config, write_plan)
from fst_plugin.options import option_specs

DEFAULT_METHODS = ("fst", "fe-tuning", "ft-init")
# What the exported script calls; paste() adds everything of the package these reach (TuningRun, the head's
# re-initialisation, penalty and projection, PAM's step and reversed samples, alpha auto's choice, the errors, the
# runtime and distributed helpers).
CORE = (find_head, TuningMode, TuningConfig, tune, parse_projection, parse_pam, parse_alpha, lr_schedule_of,
        unlearning_config, ReversedSamples, alpha_search, split_held_out, choose_alpha, fixed_alpha)
# DefenseConfig settings the exported script does not read: the plugin's own machinery (a variant's folder, the
# evaluation subset, the tensor input pipeline, resuming, record trust and location).
PLUGIN_ONLY_KEYS = ("save_name", "eval_subset", "input_pipeline", "trust_record", "resume", "record")
# Help texts that say something else in the exported script than in the plugin.
EXPORTED_HELP = {"checkpoint_save": "accepted for BackdoorBench compatibility (this defense writes no checkpoint)"}
ARGUMENT_TYPES = ("bool", "int", "float", "str")


@dataclass(frozen=True)
class ExportedArgument:
    """One command-line argument of the exported script, as its option declaration says."""

    name: str
    flags: tuple[str, ...]
    kind: str                  # one of ARGUMENT_TYPES: the script maps it to str2bool, int, float or str
    choices: Optional[tuple[str, ...]]
    help: str
    default: Any


def exported_arguments() -> list[ExportedArgument]:
    """DefenseConfig's settings (:func:`~fst_plugin.options.option_specs`) but PLUGIN_ONLY_KEYS, in declaration
    order, with the flags the plugin's own parser gives them."""
    out = []
    for spec in option_specs(DefenseConfig):
        if spec.name in PLUGIN_ONLY_KEYS:
            continue
        kind = "str" if spec.choices or spec.parse else spec.type.__name__  # words (auto/on/off) are read as text
        if kind not in ARGUMENT_TYPES:
            raise TypeError(f"DefenseConfig.{spec.name} is a {kind}, which the exported argparse cannot read")
        flags = (*[flag for flag in spec.flags if not flag.startswith("--")], f"--{spec.name}",
                 *[flag for flag in spec.flags if flag.startswith("--")])
        out.append(ExportedArgument(spec.name, flags, kind, spec.choices, EXPORTED_HELP.get(spec.name, spec.help),
                                    spec.default))
    return out


def _listing(items: list[str], opening: str, closing: str) -> str:
    """Python source of a list or dict literal, one item a line."""
    return opening + "\n" + "".join(f"    {item},\n" for item in items) + closing


def render_defense(method: str) -> str:
    """The self-contained BackdoorBench defense script for ``method`` (a key of MODES)."""
    mode = MODES[method]
    arguments = exported_arguments()
    core = paste(CORE)
    script = Template(files("fst_plugin.export").joinpath("defense.py.tmpl").read_text()).substitute(
        method=mode.name, summary=mode.summary, version=__version__, class_name=mode.name.replace("-", "_"),
        core=core.text.rstrip("\n"),
        mode=_listing([f"{f.name}={getattr(mode, f.name)!r}" for f in dataclasses.fields(mode)], "TuningMode(", ")"),
        arguments=_listing([repr((a.flags, a.kind, a.choices, a.help)) for a in arguments], "[", "]"),
        defaults=_listing([f"{a.name!r}: {a.default!r}" for a in arguments], "{", "}"),
    )
    check_script(script, core)
    return script


def plan_export(methods: list[str]) -> InstallPlan:
    """The defense script and yamls of each method (validated first: nothing is written for a bad name)."""
    exportable = [name for name in MODES if has_shipped_config(name)]
    unknown = [name for name in methods if name not in exportable]
    if unknown:
        raise InstallError(f"cannot export unknown method {unknown[0]!r}", f"use one of {', '.join(exportable)}")
    plan = InstallPlan()
    for name in dict.fromkeys(methods):
        plan.files[f"defense/{name}.py"] = render_defense(name)
        for dataset in CONFIG_NAMES:
            plan.files[f"config/defense/{name}/{dataset}.yaml"] = default_config(name, dataset)
    return plan


def export(root: Path, methods: list[str] | None = None, force: bool = False) -> list[Path]:
    """Write the exported defenses into the BackdoorBench checkout ``root``; return the files written."""
    root = check_backdoorbench(root)
    return write_plan(root, plan_export(list(methods or DEFAULT_METHODS)), force)
