"""The installer against a BackdoorBench-shaped tree the test builds, including a launcher executed in a
subprocess from that tree's root (as a user runs ``python defense/fst.py ...``)."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fst_plugin.errors import InstallError
from fst_plugin.export.installer import MANIFEST, install, plan_install, uninstall
from fst_plugin.record import load_untrusted
from fst_plugin.plugins import available_defenses, load_defense
from tests.builders import TinyBB

METHODS = ["fe-tuning", "fst", "ft-init", "lp", "pam", "vanilla-ft"]

BASE_PY = '''
class defense(object):
    """BackdoorBench's base class, reduced to its method names (written by the test)."""
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        with open("subclassed_by.log", "a") as fh:
            fh.write(cls.__name__ + "\\n")
    def add_arguments(parser): pass
    def set_result(self): pass
    def set_trainer(self): pass
    def set_logger(self): pass
    def denoising(self): pass
    def mitigation(self): pass
    def inhibition(self): pass
    def defense(self): pass
    def detect(self): pass
'''

# BackdoorBench's utils API (names and signatures), backed by this package's code, logging each call.
MODEL_GEN_PY = '''
from fst_plugin.models import build_model
def generate_cls_model(model_name, num_classes=10, image_size=32, **kwargs):
    open("bb_calls.log", "a").write(f"generate_cls_model {model_name} {num_classes}\\n")
    return build_model(model_name, num_classes)
'''
DATA_GEN_PY = '''
from fst_plugin.data import get_transform as _transform, load_clean_split
def get_transform(dataset_name, input_height, input_width, train=True, random_crop_padding=4):
    open("bb_calls.log", "a").write(f"get_transform {dataset_name} {input_height} {input_width} {train}\\n")
    return _transform(dataset_name, train)
def dataset_and_transform_generate(args):
    open("bb_calls.log", "a").write(f"dataset_and_transform_generate {args.dataset} {args.dataset_path}\\n")
    train = load_clean_split(args.dataset, args.dataset_path, True)
    test = load_clean_split(args.dataset, args.dataset_path, False)
    return train, get_transform(args.dataset, 32, 32, True), None, test, get_transform(args.dataset, 32, 32, False), None
'''


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture()
def bb_tree(tmp_path: Path) -> Path:
    root = tmp_path / "BackdoorBench"
    files = {
        "defense/__init__.py": "",
        "defense/base.py": BASE_PY,
        "defense/ft.py": "# BackdoorBench's own fine-tuning defense: must never be touched\n",
        "config/defense/ft/cifar10.yaml": "epochs: 100\n",
        "utils/__init__.py": "",
        "utils/aggregate_block/__init__.py": "",
        "utils/aggregate_block/model_trainer_generate.py": MODEL_GEN_PY,
        "utils/aggregate_block/dataset_and_transform_generate.py": DATA_GEN_PY,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def test_entry_points_register_the_six_defenses() -> None:
    defenses = available_defenses()
    assert set(METHODS) <= set(defenses)
    for name in METHODS:
        cls = load_defense(name)
        assert cls.method == name and callable(cls.add_arguments)


def test_install_writes_launchers_and_configs_only(bb_tree: Path) -> None:
    before = snapshot(bb_tree)
    written = install(bb_tree)
    after = snapshot(bb_tree)
    added = set(after) - set(before)
    expected = {f"defense/{m}.py" for m in METHODS} | {
        f"config/defense/{m}/{d}.yaml" for m in METHODS for d in ("config", "cifar10", "cifar100", "gtsrb", "tiny")}
    assert added == expected | {MANIFEST}
    assert {p.relative_to(bb_tree).as_posix() for p in written} == expected
    assert {k: after[k] for k in before} == before  # nothing of BackdoorBench's changed, defense/ft.py included
    assert "alpha: 0.1" in (bb_tree / "config/defense/fst/gtsrb.yaml").read_text()
    assert (bb_tree / "config/defense/fst/config.yaml").read_text() == (bb_tree / "config/defense/fst/cifar10.yaml").read_text()
    install(bb_tree)  # re-installing over our own files is fine
    assert snapshot(bb_tree) == after


def test_install_never_overwrites_a_file_it_did_not_write(bb_tree: Path) -> None:
    (bb_tree / "defense" / "lp.py").write_text("# somebody else's lp defense\n")
    before = snapshot(bb_tree)
    with pytest.raises(InstallError, match="was not written by fst-plugin.*--force"):
        install(bb_tree)
    assert snapshot(bb_tree) == before  # nothing written
    install(bb_tree, force=True)
    assert "fst_plugin" in (bb_tree / "defense" / "lp.py").read_text()


def test_uninstall_removes_exactly_what_install_wrote(bb_tree: Path) -> None:
    before = snapshot(bb_tree)
    install(bb_tree)
    (bb_tree / "defense" / "fst.py").write_text((bb_tree / "defense" / "fst.py").read_text() + "# my edit\n")
    removed, kept = uninstall(bb_tree)
    assert [p.name for p in kept] == ["fst.py"]
    assert len(removed) == 6 * len(METHODS) - 1  # a launcher and 5 yamls per defense, but the edited fst.py
    (bb_tree / "defense" / "fst.py").unlink()
    uninstall(bb_tree)
    assert snapshot(bb_tree) == before
    assert not (bb_tree / "config" / "defense" / "fst").exists()


def test_install_refuses_a_folder_that_is_not_backdoorbench(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="not a BackdoorBench checkout"):
        install(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_launcher_runs_inside_backdoorbench_with_its_base_class_and_loaders(bb_tree: Path, bb: TinyBB) -> None:
    shutil.copytree(bb.data, bb_tree / "data")
    shutil.copytree(bb.record, bb_tree / "record" / "badnet_demo")
    install(bb_tree)
    proc = subprocess.run(
        [sys.executable, "defense/fst.py", "--result_file", "badnet_demo", "--yaml_path",
         "./config/defense/fst/cifar10.yaml", "--dataset", "cifar10", "--device", "cpu", "--num_workers", "0",
         "--epochs", "1", "--ratio", "0.25"],
        cwd=bb_tree, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = bb_tree / "record" / "badnet_demo" / "defense" / "fst"
    assert {"defense_result.pt", "fst_df.csv", "fst_df_summary.csv", "loss_metric_plots.png",
            "acc_like_metric_plots.png", "run_info.json"} <= {p.name for p in out.iterdir()}
    assert (out / "log" / "index.txt").is_file()
    result = load_untrusted(out / "defense_result.pt", "defense result")
    assert result["model_name"] == "preactresnet_small" and result["num_classes"] == 10
    assert "TuningDefense" in (bb_tree / "subclassed_by.log").read_text().split()  # BackdoorBench's base class
    calls = (bb_tree / "bb_calls.log").read_text()
    assert "generate_cls_model preactresnet_small 10" in calls
    assert "dataset_and_transform_generate cifar10 data/cifar10" in calls.replace("./", "")
    assert "get_transform cifar10 32 32 False" in calls
    assert "models, transforms and data from: backdoorbench" in proc.stderr


def test_a_third_party_defense_is_found_through_the_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "my_defense-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-defense\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[backdoorbench.defenses]\nmydef = my_defense_mod:MyDefense\n")
    (tmp_path / "my_defense_mod.py").write_text("class MyDefense:\n    method = 'mydef'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_defense("mydef").method == "mydef"
    plan = plan_install(list(available_defenses()))
    assert "defense/mydef.py" in plan.files and "config/defense/mydef/cifar10.yaml" not in plan.files
