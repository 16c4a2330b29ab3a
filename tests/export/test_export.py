"""``fst-plugin export``: self-contained BackdoorBench defenses rendered from the core's own source, the mode table,
the config's option declarations and the shipped yamls.

The end-to-end test runs the exported script in a BackdoorBench-shaped tree whose BackdoorBench modules are the
minimal stand-ins of ``tests/bb_standin/`` (written by us from the documented interfaces), with ``fst_plugin``
made unimportable in that process, and checks that it ends with exactly the plugin's weights and metrics.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
import torch

from fst_plugin.core import TuningRun, feature_shift_penalty, project_head_norm, reinit_head
from fst_plugin.core.modes import MODES
from fst_plugin.defense.config import DefenseConfig
from fst_plugin.errors import InstallError
from fst_plugin.export.core_source import PasteError, check_script, paste
from fst_plugin.export.exporter import (CORE, DEFAULT_METHODS, EXPORTED_HELP, PLUGIN_ONLY_KEYS, export,
                                        exported_arguments, render_defense)
from fst_plugin.export.installer import MANIFEST, default_config, install, uninstall
from fst_plugin.options import option_specs
from tests.builders import TinyBB, backdoorbench_tree

# Runs a script as `python script.py ...` would, with every import of fst_plugin refused.
HIDING_RUNNER = textwrap.dedent('''
    import os, runpy, sys

    class HideFstPlugin:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fst_plugin":
                raise ModuleNotFoundError(f"{name} is hidden from the exported defense")
            return None

    sys.meta_path.insert(0, HideFstPlugin())
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
    assert not [m for m in sys.modules if m.split(".")[0] == "fst_plugin"]
''')


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def rendered_constants(source: str) -> dict[str, object]:
    """The module-level constants of a rendered script, read from its syntax tree (not executed): ARGUMENTS,
    DEFAULTS, and MODE as the keywords of its TuningMode(...) call."""
    constants: dict[str, object] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name == "MODE":
            constants[name] = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
        elif name in ("ARGUMENTS", "DEFAULTS"):
            constants[name] = ast.literal_eval(node.value)
    return constants


@pytest.fixture()
def bb_tree(tmp_path: Path) -> Path:
    """A BackdoorBench-shaped tree: the stand-in modules, a models/ folder, BackdoorBench's own ft files."""
    return backdoorbench_tree(tmp_path / "BackdoorBench")


@pytest.mark.parametrize("method", sorted(MODES))
def test_the_rendered_mode_flags_equal_the_mode_table(method: str) -> None:
    constants = rendered_constants(render_defense(method))
    assert constants["MODE"] == dataclasses.asdict(MODES[method])
    assert constants["DEFAULTS"]["projection_bound"] == "equal"
    assert "fst_plugin" not in render_defense(method)


def test_changing_a_mode_changes_the_exported_script(monkeypatch: pytest.MonkeyPatch) -> None:
    before = render_defense("fst")
    monkeypatch.setitem(MODES, "fst", dataclasses.replace(MODES["fst"], feature_shift_penalty=False,
                                                         summary="a changed summary"))
    after = render_defense("fst")
    assert rendered_constants(after)["MODE"]["feature_shift_penalty"] is False
    assert rendered_constants(before)["MODE"]["feature_shift_penalty"] is True
    assert "a changed summary" in after and "a changed summary" not in before


@pytest.mark.parametrize("core", [*CORE, TuningRun, reinit_head, feature_shift_penalty, project_head_norm],
                         ids=lambda obj: obj.__name__)
def test_the_exported_script_holds_the_cores_own_source(core: object) -> None:
    assert textwrap.dedent(inspect.getsource(core)) in render_defense("fst")


def test_the_exported_arguments_and_defaults_are_the_configs_option_declarations() -> None:
    constants = rendered_constants(render_defense("fst"))
    specs = {spec.name: spec for spec in option_specs(DefenseConfig)}
    assert set(PLUGIN_ONLY_KEYS) < set(specs)  # each exclusion names a real setting
    rows = {next(flag[2:] for flag in flags if flag[2:] in specs): (flags, kind, choices, text)
            for flags, kind, choices, text in constants["ARGUMENTS"]}
    assert set(rows) == set(specs) - set(PLUGIN_ONLY_KEYS)  # a new setting is exported unless declared plugin-only
    assert set(constants["DEFAULTS"]) == set(rows)
    for name, (flags, kind, choices, text) in rows.items():
        spec = specs[name]
        assert set(flags) == {f"--{name}", *spec.flags}
        assert kind == ("str" if spec.choices or spec.parse else spec.type.__name__)  # words are read as text
        assert choices == spec.choices and text == EXPORTED_HELP.get(name, spec.help)
        assert constants["DEFAULTS"][name] == spec.default
    assert rows["projection"][1:3] == ("str", ("auto", "on", "off")) and rows["epochs"][1] == "int"
    assert rows["alpha"][1] == "str"  # a number or auto, read by the pasted parse_alpha


# Parses one value for every argument of the exported script with the script's own parser (its BackdoorBench imports
# are the stand-ins of the tree it runs in) and prints the namespace.
PARSE_EVERY_ARGUMENT = textwrap.dedent('''
    import argparse, json, runpy, sys
    script = runpy.run_path(sys.argv[1], run_name="exported")
    sample = {"bool": "true", "int": "3", "float": "0.5", "str": "x"}
    argv = [arg for flags, kind, choices, _ in script["ARGUMENTS"]
            for arg in (flags[-1], choices[-1] if choices else sample[kind])]
    parser = argparse.ArgumentParser()
    script[sys.argv[2]].add_arguments(parser)
    print(json.dumps(vars(parser.parse_args(argv))))
''')


def test_the_exported_parser_reads_every_argument_as_its_declared_type(bb_tree: Path, tmp_path: Path) -> None:
    export(bb_tree, ["fe-tuning"])
    probe = tmp_path / "parse_every_argument.py"
    probe.write_text(PARSE_EVERY_ARGUMENT)
    proc = subprocess.run([sys.executable, str(probe), "defense/fe-tuning.py", "fe_tuning"], cwd=bb_tree,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout)
    assert set(parsed) == {a.name for a in exported_arguments()}
    assert parsed["projection"] == "off" and parsed["projection_bound"] == "at_most" and parsed["amp"] is True
    assert parsed["epochs"] == 3 and parsed["lr"] == 0.5 and parsed["dataset"] == "x" and parsed["yaml_path"] == "x"


def test_a_name_the_template_does_not_import_stops_the_export() -> None:
    pasted = paste(CORE)
    script = render_defense("fst")
    assert {"math", "nn", "torch", "tqdm", "DistributedSampler"} <= pasted.needs
    with pytest.raises(PasteError, match="uses math, which the defense template does not import"):
        check_script(script.replace("\nimport math\n", "\n"), pasted)
    with pytest.raises(PasteError, match="defines find_head as the pasted core does"):
        check_script(script + "\n\ndef find_head():\n    pass\n", pasted)
    with pytest.raises(PasteError, match="defines PROJECTION_BOUNDS as"):
        check_script(script + "\nPROJECTION_BOUNDS = ()\n", pasted)


PROBE_A = '''
import math

from probe_pkg.b import helper, Shape

SCALE = 2.0
log = None


def root(x):
    """Uses a helper of another module, a constant, a class and an outside name."""
    return helper(x) * SCALE + math.pi + Shape().size
'''
PROBE_B = '''
from dataclasses import dataclass

SCALE = 3.0


def helper(x):
    return x + 1


def scaled(x):
    return x * SCALE


@dataclass
class Shape:
    size: int = 3
'''


@pytest.fixture()
def probe_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """The modules a and b of a throwaway package ``probe_pkg``, which paste() treats as the package."""
    package = tmp_path / "probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(PROBE_A)
    (package / "b.py").write_text(PROBE_B)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("fst_plugin.export.core_source.PACKAGE", "probe_pkg")
    from probe_pkg import a, b

    yield a, b
    for name in [m for m in sys.modules if m.split(".")[0] == "probe_pkg"]:
        del sys.modules[name]


def test_paste_follows_the_package_through_modules_and_constants(probe_package: tuple[Any, Any]) -> None:
    a, b = probe_package
    pasted = paste([a.root])
    assert list(pasted.pieces) == ["helper", "SCALE", "Shape", "root"]  # dependencies first, unused ones left out
    assert pasted.needs == {"math", "dataclass"}
    namespace: dict[str, object] = {}
    exec("import math\nfrom dataclasses import dataclass\n" + pasted.text, namespace)
    assert namespace["root"](1.0) == a.root(1.0)
    with pytest.raises(PasteError, match="two package definitions are named SCALE"):
        paste([a.root, b.scaled])


def test_export_writes_scripts_and_the_shipped_yamls_and_nothing_of_backdoorbenchs(bb_tree: Path) -> None:
    before = snapshot(bb_tree)
    written = export(bb_tree)
    after = snapshot(bb_tree)
    expected = {f"defense/{m}.py" for m in DEFAULT_METHODS} | {
        f"config/defense/{m}/{d}.yaml" for m in DEFAULT_METHODS for d in ("config", "cifar10", "cifar100", "gtsrb", "tiny")}
    assert set(after) - set(before) == expected | {MANIFEST}
    assert {p.relative_to(bb_tree).as_posix() for p in written} == expected
    assert {k: after[k] for k in before} == before
    assert (bb_tree / "config/defense/fst/gtsrb.yaml").read_text() == default_config("fst", "gtsrb")
    assert (bb_tree / "defense/fe-tuning.py").read_text() == render_defense("fe-tuning")
    export(bb_tree)  # exporting over our own files again is fine
    assert snapshot(bb_tree) == after


def test_export_replaces_installed_launchers_and_uninstall_removes_either_form(bb_tree: Path) -> None:
    pristine = snapshot(bb_tree)
    install(bb_tree)
    assert "from fst_plugin" in (bb_tree / "defense/fst.py").read_text()
    export(bb_tree, ["fst"])
    assert (bb_tree / "defense/fst.py").read_text() == render_defense("fst")
    assert "from fst_plugin" in (bb_tree / "defense/lp.py").read_text()  # not exported: still the launcher
    removed, kept = uninstall(bb_tree)
    assert not kept and snapshot(bb_tree) == pristine
    export(bb_tree, ["ft-init"])
    uninstall(bb_tree)
    assert snapshot(bb_tree) == pristine


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fst_plugin.cli", *args], capture_output=True, text=True, timeout=300)


def test_export_refuses_bad_input_with_one_line_and_exit_2(bb_tree: Path, tmp_path: Path) -> None:
    (bb_tree / "defense" / "ft-init.py").write_text("# somebody else's ft-init\n")
    before = snapshot(bb_tree)
    cases = {
        "not a BackdoorBench checkout": ["--backdoorbench", str(tmp_path / "nowhere")],
        "unknown method 'ft'": ["--backdoorbench", str(bb_tree), "--methods", "fst", "ft"],
        "was not written by fst-plugin": ["--backdoorbench", str(bb_tree)],
    }
    for message, argv in cases.items():
        proc = cli("export", *argv)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert snapshot(bb_tree) == before
    (bb_tree / "config" / "defense" / "fst").mkdir(parents=True)
    (bb_tree / "config" / "defense" / "fst" / "cifar10.yaml").mkdir()
    with pytest.raises(InstallError, match="in the way"):
        export(bb_tree, ["fst"], force=True)
    assert cli("export", "--backdoorbench", str(bb_tree), "--methods", "fe-tuning", "ft-init", "--force").returncode == 0
    assert (bb_tree / "defense" / "ft-init.py").read_text() == render_defense("ft-init")


# pam: its inversion shrunk to CI size (the same settings on both sides)
SMALL_PAM = ["--unlearn_rounds", "2", "--inversion_pretrain_steps", "1", "--inversion_mask_steps", "1",
             "--inversion_generator_steps", "1", "--generator_filters", "4"]


@pytest.mark.parametrize("method, extra", [("fst", []), ("fst", ["--alpha", "auto"]),
                                           ("fst", ["--alpha", "strength=2"]), ("fe-tuning", []), ("pam", SMALL_PAM)],
                         ids=["fst", "fst-alpha-auto", "fst-alpha-strength", "fe-tuning", "pam"])
def test_the_exported_defense_runs_without_this_package_and_ends_with_the_plugins_weights(
        method: str, extra: list[str], bb_tree: Path, bb: TinyBB, tmp_path: Path) -> None:
    shutil.copytree(bb.data, bb_tree / "data")
    name = bb.record.name  # the record's image paths name its folder
    shutil.copytree(bb.record, bb_tree / "record" / name)
    export(bb_tree, [method])
    runner = tmp_path / "run_hidden.py"
    runner.write_text(HIDING_RUNNER)
    args = ["--result_file", name, "--yaml_path", f"./config/defense/{method}/cifar10.yaml", "--dataset", "cifar10",
            "--device", "cpu", "--num_workers", "0", "--epochs", "2", "--ratio", "0.5", "--random_seed", "3",
            "--projection", "on", *extra]
    exported = subprocess.run([sys.executable, "-I", str(runner), f"defense/{method}.py", *args],
                              cwd=bb_tree, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    out = bb_tree / "record" / name / "defense" / method
    assert {"defense_result.pt", f"{method}_df.csv", f"{method}_df_summary.csv", "loss_metric_plots.png",
            "acc_like_metric_plots.png"} <= {p.name for p in out.iterdir()}
    assert (out / "log" / "index.txt").is_file() and list((out / "log").glob("*.log"))
    assert (out / "trigger_generator.pt").is_file() == (method == "pam")
    assert (out / "alpha_choice.json").is_file() == ("auto" in extra)
    assert not (out / "checkpoint").exists()  # BackdoorBench's checkpoint_save is named, never made: no empty folder
    out = out.rename(out.with_name(f"{method}_exported"))

    # The exported script is BackdoorBench's per-image DataLoader path; the plugin's default tensor path draws its
    # crops and flips from another random stream (same distribution, other values), so the exact-weights
    # comparison runs the plugin on the per-image path.
    plugin = subprocess.run([sys.executable, "-m", "fst_plugin.cli", "run", method, *args,
                             "--input_pipeline", "backdoorbench"], cwd=bb_tree, capture_output=True, text=True, timeout=600)
    assert plugin.returncode == 0, plugin.stderr[-3000:]
    assert "models, transforms and data from: backdoorbench" in plugin.stderr  # the same stand-in loaders
    ours = bb_tree / "record" / name / "defense" / method

    theirs_result = torch.load(out / "defense_result.pt", weights_only=True)
    ours_result = torch.load(ours / "defense_result.pt", weights_only=True)
    assert theirs_result["model_name"] == ours_result["model_name"] == "preactresnet_small"
    assert theirs_result["num_classes"] == ours_result["num_classes"] == 10
    assert theirs_result["model"].keys() == ours_result["model"].keys()
    changed = [k for k in ours_result["model"] if not torch.equal(theirs_result["model"][k], ours_result["model"][k])]
    assert not changed, f"weights differ: {changed[:5]}"
    assert not torch.equal(theirs_result["model"]["linear.weight"], record_weights(bb)["linear.weight"])
    theirs_df, ours_df = pd.read_csv(out / f"{method}_df.csv"), pd.read_csv(ours / f"{method}_df.csv")
    columns = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
               "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]
    assert list(theirs_df.columns[1:]) == columns
    pd.testing.assert_frame_equal(theirs_df[columns], ours_df[columns], rtol=1e-6)
    summary = pd.read_csv(out / f"{method}_df_summary.csv", index_col=0)
    assert list(summary.index) == ["last", "valid_max", "exist_nan_value"]
    assert (out / "log" / "index.txt").read_text() == (ours / "log" / "index.txt").read_text()
    if "auto" in extra:  # the same choice, from the same held-out images
        theirs_choice = json.loads((out / "alpha_choice.json").read_text())
        ours_choice = json.loads((ours / "run_info.json").read_text())["alpha_choice"]
        assert theirs_choice["alpha"] == ours_choice["alpha"] and len(theirs_choice["trials"]) >= 1
        assert [t["held_out_acc"] for t in theirs_choice["trials"]] == [t["held_out_acc"] for t in ours_choice["trials"]]
    if method == "pam":  # the same reversed-sample generator on both sides
        theirs_gen = torch.load(out / "trigger_generator.pt", weights_only=False)
        ours_gen = torch.load(ours / "trigger_generator.pt", weights_only=False)
        assert theirs_gen["target"] == ours_gen["target"]
        assert all(torch.equal(theirs_gen["generator"][k], ours_gen["generator"][k]) for k in ours_gen["generator"])


def record_weights(bb: TinyBB) -> dict[str, torch.Tensor]:
    return torch.load(bb.record / "attack_result.pt", weights_only=False)["model"]
