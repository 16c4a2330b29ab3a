"""Issue 4.2 — bad input gives one clear line, exit code 2, no traceback, and writes nothing.

Every case in ``CASES`` builds one bad input in a fresh folder (a copy of the tiny record, a yaml, maybe a
dataset or a fake BackdoorBench checkout), runs the CLI (``fst-plugin ...``, in its own process) and checks:

* exit code 2 and exactly one ``error: ...`` line on stderr, which names the problem (the case's
  expected words) and the fix (``Fix: ...``);
* no traceback (and with ``--debug``, one);
* nothing written: the case folder and the shared fixture are byte-for-byte unchanged, and the record has
  no ``defense/`` folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tests import builders as h


class Ctx:
    """What a case builds its bad input with: ``tmp`` (its own folder) and a fresh copy of the record."""

    def __init__(self, tmp: Path, bb: h.TinyBB) -> None:
        self.tmp, self.bb = tmp, bb
        self.rec = h.copy_record(bb, "case", root=tmp)
        self.yaml = h.write_yaml(tmp / "cfg" / "fst.yaml")
        self.env: dict[str, str] = {}
        self.markers: list[Path] = []

    def argv(self, *extra: str, record: Path | None = None, yaml_path: Path | None = None,
             dataset_path: Path | None = None, method: str = "fst") -> list[str]:
        return ["run", method, "--record", str(record or self.rec), "--yaml_path", str(yaml_path or self.yaml),
                "--dataset_path", str(dataset_path or self.bb.data), *extra]

    def payload(self) -> dict:
        return self.bb.payload

    def save(self, payload: object) -> None:
        h.save_payload(self.rec, payload)

    def yaml_with(self, **overrides: object) -> Path:
        return h.write_yaml(self.tmp / "cfg" / "bad.yaml", **overrides)

    def yaml_text(self, text: str) -> Path:
        path = self.tmp / "cfg" / "bad.yaml"
        path.write_text(text)
        return path

    def first_entry(self, payload: dict) -> dict:
        data_dict = payload["bd_test"]["bd_data_container"]["data_dict"]
        return data_dict[sorted(data_dict)[0]]

    def index_file(self, text: str) -> Path:
        path = self.tmp / "index.txt"
        path.write_text(text)
        return path

    def image_dataset(self, layout: dict[str, int]) -> Path:
        """A dataset root whose cifar10/ holds ``layout`` (relative folder -> number of PNGs)."""
        from PIL import Image

        root = self.tmp / "baddata"
        for folder, count in layout.items():
            target = root / "cifar10" / folder
            target.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((32, 32, 3), 40 * i % 255, np.uint8)).save(target / f"{i}.png")
        return root

    def fake_backdoorbench(self) -> Path:
        root = self.tmp / "BackdoorBench"
        (root / "defense").mkdir(parents=True)
        (root / "config").mkdir()
        (root / "defense" / "base.py").write_text("class defense: pass\n")
        return root


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    expect: tuple[str, ...]          # words the error line must contain (the problem)
    marker: bool = field(default=False)  # the case plants a pickle payload that must not run


def _state_dict(model_name: str, num_classes: int) -> dict[str, torch.Tensor]:
    from fst_plugin.models import build_model
    torch.manual_seed(0)
    return build_model(model_name, num_classes).state_dict()


# ----- the builders ------------------------------------------------------------------------------------------
def record_folder_missing(c: Ctx) -> list[str]:
    return c.argv(record=c.tmp / "record" / "no_such_attack")


def record_file_missing(c: Ctx) -> list[str]:
    (c.rec / "attack_result.pt").unlink()
    return c.argv()


def record_empty(c: Ctx) -> list[str]:
    (c.rec / "attack_result.pt").write_bytes(b"")
    return c.argv()


def record_truncated(c: Ctx) -> list[str]:
    path = c.rec / "attack_result.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return c.argv()


def record_not_pickle(c: Ctx) -> list[str]:
    (c.rec / "attack_result.pt").write_text("this is a text file, not a torch pickle\n" * 20)
    return c.argv()


def record_plain_pickle(c: Ctx) -> list[str]:
    import pickle
    (c.rec / "attack_result.pt").write_bytes(pickle.dumps({"model_name": "x"}))
    return c.argv()


def record_not_a_dict(c: Ctx) -> list[str]:
    c.save([1, 2, 3])
    return c.argv()


def record_missing_keys(c: Ctx) -> list[str]:
    payload = c.payload()
    del payload["model"], payload["bd_test"]
    c.save(payload)
    return c.argv()


def record_hostile_pickle(c: Ctx) -> list[str]:
    payload = c.payload()
    marker = c.tmp / "PWNED"
    payload["attack_setting"] = h.FileDropper(marker)
    c.markers.append(marker)
    c.save(payload)
    return c.argv()


def model_name_unknown(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["model_name"] = "resnet9000"
    c.save(payload)
    return c.argv()


def state_dict_other_model(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["model_name"] = "preactresnet18"   # the record holds preactresnet_small weights
    c.save(payload)
    return c.argv()


def num_classes_not_head_size(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["model"] = _state_dict("preactresnet_small", 5)   # a 5-way head in a 10-class record
    c.save(payload)
    return c.argv()


def num_classes_not_dataset(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["num_classes"] = 100
    payload["model"] = _state_dict("preactresnet_small", 100)
    c.save(payload)
    return c.argv()


def record_other_dataset(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["clean_data"] = "gtsrb"
    c.save(payload)
    return c.argv()


def record_dataset_unshipped(c: Ctx) -> list[str]:
    """No --yaml_path, and no yaml shipped for the record's dataset: refused, not run on another's settings."""
    record = h.record_on(c.bb, "mnist", c.tmp)
    return ["run", "pam", "--record", str(record), "--dataset_path", str(c.bb.data)]


def poisoned_png_missing(c: Ctx) -> list[str]:
    payload = c.payload()
    rel = c.first_entry(payload)["path"]
    (c.rec / "bd_test_dataset" / rel.split("bd_test_dataset/", 1)[1]).unlink()
    return c.argv()


def poisoned_path_escape(c: Ctx) -> list[str]:
    payload = c.payload()
    c.first_entry(payload)["path"] = "./record/case/bd_test_dataset/../../../data/cifar10/test/bird/00001.png"
    c.save(payload)
    return c.argv()


def poisoned_path_absolute(c: Ctx) -> list[str]:
    payload = c.payload()
    c.first_entry(payload)["path"] = "/etc/passwd"
    c.save(payload)
    return c.argv()


def dataset_folder_missing(c: Ctx) -> list[str]:
    return c.argv(dataset_path=c.tmp / "no_data_here")


def dataset_flat_layout(c: Ctx) -> list[str]:
    return c.argv(dataset_path=c.image_dataset({".": 3}))


def dataset_no_class_folders(c: Ctx) -> list[str]:
    return c.argv(dataset_path=c.image_dataset({"train": 3, "test": 3}))


def dataset_empty_class_folders(c: Ctx) -> list[str]:
    return c.argv(dataset_path=c.image_dataset({"train/airplane": 0, "test/airplane": 0}))


def dataset_no_test_split(c: Ctx) -> list[str]:
    return c.argv(dataset_path=c.image_dataset({"train/airplane": 2, "train/bird": 2}))


def dataset_too_many_classes(c: Ctx) -> list[str]:
    return c.argv(dataset_path=c.image_dataset({f"{split}/c{i}": 1 for split in ("train", "test") for i in range(11)}))


def yaml_missing(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.tmp / "cfg" / "nope.yaml")


def yaml_not_mapping(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_text("- epochs\n- 10\n"))


def yaml_syntax_error(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_text("epochs: [10\nlr: 0.01\n"))


def yaml_unknown_key(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(learning_rate=0.1))


def yaml_wrong_type(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(epochs="ten"))


def yaml_bool_wrong_type(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(amp="sometimes"))


def alpha_negative(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(alpha=-0.1))


def ratio_zero(c: Ctx) -> list[str]:
    return c.argv("--ratio", "0")


def ratio_above_one(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(ratio=1.5))


def epochs_zero(c: Ctx) -> list[str]:
    return c.argv("--epochs", "0")


def epochs_negative(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(epochs=-3))


def lr_zero(c: Ctx) -> list[str]:
    return c.argv("--lr", "0")


def lr_negative(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(lr=-0.01))


def lr_too_large_for_float(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_text(c.yaml.read_text() + "lr: 1" + "0" * 400 + "\n"))


def batch_size_zero(c: Ctx) -> list[str]:
    return c.argv("--batch_size", "0")


def projection_unknown(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(projection="sometimes"))


def projection_bound_unknown(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(projection_bound="sphere"))


def projection_a_list(c: Ctx) -> list[str]:
    return c.argv(yaml_path=c.yaml_with(projection=["on"]))


def seed_too_large(c: Ctx) -> list[str]:
    return c.argv("--random_seed", str(2 ** 70))


def dataset_unknown(c: Ctx) -> list[str]:
    return c.argv("--dataset", "imagenet")


def index_file_missing(c: Ctx) -> list[str]:
    return c.argv("--index", str(c.tmp / "no_index.txt"))


def index_out_of_range(c: Ctx) -> list[str]:
    return c.argv("--index", str(c.index_file("1\n2\n99999\n")))


def index_negative(c: Ctx) -> list[str]:
    return c.argv("--index", str(c.index_file("-1\n2\n")))


def index_duplicate(c: Ctx) -> list[str]:
    return c.argv("--index", str(c.index_file("3\n7\n3\n")))


def index_not_integers(c: Ctx) -> list[str]:
    return c.argv("--index", str(c.index_file("3\nseven\n")))


def index_empty(c: Ctx) -> list[str]:
    return c.argv("--index", str(c.index_file("")))


def head_names_no_module(c: Ctx) -> list[str]:
    return c.argv("--head", "classifier")


def head_not_linear(c: Ctx) -> list[str]:
    return c.argv("--head", "conv1")


def head_block_without_linear(c: Ctx) -> list[str]:
    return c.argv("--head", "layer1")


def head_wrong_outputs(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["model_name"] = "mobilenet_v3_small"
    payload["model"] = _state_dict("mobilenet_v3_small", 10)
    c.save(payload)
    return c.argv("--head", "classifier.0")


def no_head_found(c: Ctx) -> list[str]:
    payload = c.payload()
    payload["model_name"] = "squeezenet1_1"      # its classifier is a 1x1 convolution, not a Linear
    payload["model"] = _state_dict("squeezenet1_1", 10)
    c.save(payload)
    return c.argv()


def cuda_without_cuda(c: Ctx) -> list[str]:
    c.env["CUDA_VISIBLE_DEVICES"] = ""
    return c.argv("--device", "cuda")


def device_not_torch(c: Ctx) -> list[str]:
    return c.argv("--device", "gpu0")


def device_unsupported_type(c: Ctx) -> list[str]:
    return c.argv("--device", "mps")


def no_record_given(c: Ctx) -> list[str]:
    return ["run", "fst", "--yaml_path", str(c.yaml), "--dataset_path", str(c.bb.data)]


def method_unknown(c: Ctx) -> list[str]:
    return c.argv(method="fine-pruning-9000")


def _checkpoint_dir(c: Ctx) -> Path:
    folder = c.tmp / "ckpt"
    folder.mkdir()
    return folder


def checkpoint_other_settings(c: Ctx) -> list[str]:
    folder = _checkpoint_dir(c)
    torch.save({"resume_key": "0" * 64, "state": {}}, folder / "last.pt")
    return c.argv("--resume", "--checkpoint_save", str(folder))


def checkpoint_truncated(c: Ctx) -> list[str]:
    folder = _checkpoint_dir(c)
    torch.save({"resume_key": "0" * 64, "state": {"w": torch.zeros(1000)}}, folder / "last.pt")
    data = (folder / "last.pt").read_bytes()
    (folder / "last.pt").write_bytes(data[: len(data) // 3])
    return c.argv("--resume", "--checkpoint_save", str(folder))


def checkpoint_hostile(c: Ctx) -> list[str]:
    folder = _checkpoint_dir(c)
    marker = c.tmp / "PWNED_BY_CHECKPOINT"
    c.markers.append(marker)
    torch.save({"resume_key": h.FileDropper(marker), "state": {}}, folder / "last.pt")
    return c.argv("--resume", "--checkpoint_save", str(folder))


def install_not_backdoorbench(c: Ctx) -> list[str]:
    (c.tmp / "not_bb").mkdir()
    return ["install", "--backdoorbench", str(c.tmp / "not_bb")]


def install_folder_missing(c: Ctx) -> list[str]:
    return ["install", "--backdoorbench", str(c.tmp / "nowhere")]


def install_overwrite_foreign(c: Ctx) -> list[str]:
    root = c.fake_backdoorbench()
    (root / "defense" / "fst.py").write_text("# my own fst, not the plugin's\n")
    return ["install", "--backdoorbench", str(root)]


def install_corrupt_manifest(c: Ctx) -> list[str]:
    root = c.fake_backdoorbench()
    (root / ".fst_plugin_manifest.json").write_text("{not json")
    return ["install", "--backdoorbench", str(root)]


def uninstall_nothing_installed(c: Ctx) -> list[str]:
    return ["uninstall", "--backdoorbench", str(c.fake_backdoorbench())]


CASES = [
    # records
    Case("record-folder-missing", record_folder_missing, ("no_such_attack", "does not exist")),
    Case("record-file-missing", record_file_missing, ("attack_result.pt", "does not exist")),
    Case("record-empty", record_empty, ("attack_result.pt", "empty")),
    Case("record-truncated", record_truncated, ("attack_result.pt", "corrupt or truncated")),
    Case("record-not-pickle", record_not_pickle, ("attack_result.pt", "corrupt or truncated")),
    Case("record-plain-pickle", record_plain_pickle, ("attack_result.pt",)),
    Case("record-not-a-dict", record_not_a_dict, ("list", "expected a dict")),
    Case("record-missing-keys", record_missing_keys, ("lacks the key", "model", "bd_test")),
    Case("record-hostile-pickle", record_hostile_pickle, ("posix.system", "allow-list", "--trust-record"), marker=True),
    Case("model-name-unknown", model_name_unknown, ("unknown model_name", "resnet9000")),
    Case("state-dict-other-model", state_dict_other_model, ("does not fit", "preactresnet18")),
    Case("num-classes-not-head-size", num_classes_not_head_size, ("does not fit", "linear")),
    Case("num-classes-not-dataset", num_classes_not_dataset, ("num_classes=100", "cifar10")),
    Case("record-other-dataset", record_other_dataset, ("gtsrb", "--dataset")),
    Case("record-dataset-unshipped", record_dataset_unshipped, ("'pam'", "the record's dataset 'mnist'",
                                                                "--yaml_path")),
    Case("poisoned-png-missing", poisoned_png_missing, ("poisoned image", "missing")),
    Case("poisoned-path-escape", poisoned_path_escape, ("outside the record folder",)),
    Case("poisoned-path-absolute", poisoned_path_absolute, ("/etc/passwd", "outside the record folder")),
    # clean data
    Case("dataset-folder-missing", dataset_folder_missing, ("dataset folder not found", "no_data_here")),
    Case("dataset-flat-layout", dataset_flat_layout, ("no train split",)),
    Case("dataset-no-class-folders", dataset_no_class_folders, ("no class folders",)),
    Case("dataset-empty-class-folders", dataset_empty_class_folders, ("airplane", "no image")),
    Case("dataset-no-test-split", dataset_no_test_split, ("no test split",)),
    Case("dataset-too-many-classes", dataset_too_many_classes, ("11 classes",)),
    # yaml and command line
    Case("yaml-missing", yaml_missing, ("nope.yaml", "does not exist")),
    Case("yaml-not-mapping", yaml_not_mapping, ("list", "not a mapping")),
    Case("yaml-syntax-error", yaml_syntax_error, ("not valid YAML",)),
    Case("yaml-unknown-key", yaml_unknown_key, ("unknown config key", "learning_rate")),
    Case("yaml-wrong-type", yaml_wrong_type, ("'epochs'", "'ten'", "expected int")),
    Case("yaml-bool-wrong-type", yaml_bool_wrong_type, ("'amp'", "expected bool")),
    Case("alpha-negative", alpha_negative, ("'alpha'", ">= 0")),
    Case("ratio-zero", ratio_zero, ("'ratio'", "(0, 1]")),
    Case("ratio-above-one", ratio_above_one, ("'ratio'", "1.5", "(0, 1]")),
    Case("epochs-zero", epochs_zero, ("'epochs'", "> 0")),
    Case("epochs-negative", epochs_negative, ("'epochs'", "-3")),
    Case("lr-zero", lr_zero, ("'lr'", "> 0")),
    Case("lr-negative", lr_negative, ("'lr'", "-0.01")),
    Case("lr-too-large-for-a-float", lr_too_large_for_float, ("'lr'",)),
    Case("batch-size-zero", batch_size_zero, ("'batch_size'", "> 0")),
    Case("projection-unknown", projection_unknown, ("projection", "sometimes")),
    Case("projection-a-list", projection_a_list, ("projection",)),
    Case("projection-bound-unknown", projection_bound_unknown, ("projection_bound", "sphere")),
    Case("seed-too-large", seed_too_large, ("random_seed",)),
    Case("dataset-unknown", dataset_unknown, ("unknown dataset", "imagenet")),
    # index file
    Case("index-file-missing", index_file_missing, ("no_index.txt", "does not exist")),
    Case("index-out-of-range", index_out_of_range, ("99999", "outside")),
    Case("index-negative", index_negative, ("-1", "outside")),
    Case("index-duplicate", index_duplicate, ("index 3", "more than once")),
    Case("index-not-integers", index_not_integers, ("not a list of integers",)),
    Case("index-empty", index_empty, ("holds no indices",)),
    # head
    Case("head-names-no-module", head_names_no_module, ("--head 'classifier'", "names no module")),
    Case("head-not-linear", head_not_linear, ("--head 'conv1'", "Conv2d", "not an nn.Linear")),
    Case("head-block-without-linear", head_block_without_linear, ("--head 'layer1'", "no nn.Linear")),
    Case("head-wrong-outputs", head_wrong_outputs, ("classifier.0", "1024 outputs", "10 classes")),
    Case("no-head-found", no_head_found, ("no nn.Linear layer with 10 outputs", "SqueezeNet")),
    # device
    Case("cuda-without-cuda", cuda_without_cuda, ("'cuda'", "CUDA is not available")),
    Case("device-not-a-torch-device", device_not_torch, ("'gpu0'",)),
    Case("device-unsupported-type", device_unsupported_type, ("'mps'",)),
    # runs and resume checkpoints
    Case("no-record-given", no_record_given, ("no attack record",)),
    Case("method-unknown", method_unknown, ("fine-pruning-9000", "registered")),
    Case("checkpoint-other-settings", checkpoint_other_settings, ("checkpoint", "other settings")),
    Case("checkpoint-truncated", checkpoint_truncated, ("checkpoint", "corrupt or truncated")),
    Case("checkpoint-hostile", checkpoint_hostile, ("checkpoint", "allow-list"), marker=True),
    # installer
    Case("install-not-backdoorbench", install_not_backdoorbench, ("not a BackdoorBench checkout",)),
    Case("install-folder-missing", install_folder_missing, ("nowhere", "not a BackdoorBench checkout")),
    Case("install-overwrite-foreign-file", install_overwrite_foreign, ("fst.py", "not written by fst-plugin")),
    Case("install-corrupt-manifest", install_corrupt_manifest, ("manifest", "corrupt")),
    Case("uninstall-nothing-installed", uninstall_nothing_installed, ("nothing of fst-plugin is installed",)),
]
BAD_INPUTS_TRIED = len(CASES)


def _check_case(case: Case, tmp: Path, bb: h.TinyBB, debug: bool = False,
                runner: Callable[..., h.CliResult] = h.run_cli) -> h.CliResult:
    ctx = Ctx(tmp, bb)
    argv = case.build(ctx)
    before, fixture_before = h.snapshot(tmp), h.snapshot(bb.root)
    result = runner((["--debug"] if debug else []) + argv, cwd=tmp, env=ctx.env)
    context = f"\n--- stderr of fst-plugin {' '.join(argv)}:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, f"exit code {result.returncode}, expected 2{context}"
    assert len(result.error_lines) == 1, f"expected exactly one 'error:' line{context}"
    line = result.error_lines[0]
    assert "Fix: " in line, f"the error names no fix{context}"
    for word in case.expect:
        assert word.lower() in line.lower(), f"{word!r} not in the error line{context}"
    assert ("Traceback (most recent call last)" in result.stderr) == debug, f"traceback only with --debug{context}"
    assert h.snapshot(tmp) == before, f"the failed run wrote files{context}"
    assert h.snapshot(bb.root) == fixture_before, f"the failed run touched the shared fixture{context}"
    assert not (ctx.rec / "defense").exists(), f"the failed run created record/<name>/defense/{context}"
    for marker in ctx.markers:
        assert not marker.exists(), f"the pickle payload ran (it created {marker}){context}"
    return result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_exit_2_nothing_written(case: Case, tmp_path: Path, bb: h.TinyBB) -> None:
    _check_case(case, tmp_path, bb)


def test_case_count_meets_the_issue() -> None:
    assert len({c.id for c in CASES}) == BAD_INPUTS_TRIED >= 20


DEBUG_CASES = [c for c in CASES if c.id in ("record-truncated", "yaml-unknown-key", "head-not-linear",
                                             "checkpoint-hostile", "install-overwrite-foreign-file")]


@pytest.mark.parametrize("case", DEBUG_CASES, ids=[c.id for c in DEBUG_CASES])
def test_debug_adds_the_traceback(case: Case, tmp_path: Path, bb: h.TinyBB) -> None:
    _check_case(case, tmp_path, bb, debug=True)


def test_real_interpreter_exit_code_and_no_traceback(tmp_path: Path, bb: h.TinyBB) -> None:
    """The same contract through a real ``python -m fst_plugin.cli`` (no fork server)."""
    case = next(c for c in CASES if c.id == "record-hostile-pickle")
    result = _check_case(case, tmp_path, bb, runner=h.run_cli_subprocess)
    assert result.stdout == ""


@pytest.mark.parametrize("argv", [["run", "fst", "--epochs", "ten"], ["run", "fst", "--projection", "maybe"],
                                  ["run", "fst", "--no-such-flag", "1"], ["frobnicate"]],
                         ids=["epochs-not-int", "projection-not-a-choice", "unknown-flag", "unknown-command"])
def test_argument_parser_errors_exit_2_without_traceback(argv: list[str], tmp_path: Path) -> None:
    result = h.run_cli(argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_installer_left_the_foreign_file_alone(tmp_path: Path, bb: h.TinyBB) -> None:
    case = next(c for c in CASES if c.id == "install-overwrite-foreign-file")
    _check_case(case, tmp_path, bb)
    root = tmp_path / "BackdoorBench"
    assert (root / "defense" / "fst.py").read_text() == "# my own fst, not the plugin's\n"
    assert not (root / ".fst_plugin_manifest.json").exists()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "config", "defense", "defense/base.py", "defense/fst.py"]


@pytest.mark.parametrize("requested", ["cuda:3", "cuda:1"])
def test_cuda_index_beyond_the_visible_gpus(monkeypatch: pytest.MonkeyPatch, requested: str) -> None:
    """With CUDA present, a GPU index that does not exist is a ConfigError too (not a CUDA error mid-run)."""
    from fst_plugin.runtime import resolve_device
    from fst_plugin.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="only 1 GPU"):
        resolve_device(requested)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cuda") == "cuda"
