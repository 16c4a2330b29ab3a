"""Issue 4.1 — hostile records never execute code, and never make us read outside the record folder.

* A record, defense result or checkpoint carrying a pickle payload (``os.system``, ``open``...) is refused
  with a clear error naming the offending global and ``--trust-record``, and the payload's side effect
  (a file it would create) did not happen. A genuine record loads.
* ``--trust-record`` lifts the allow-list: documented in ``--help`` as unsafe and logged loudly.
* Poisoned-image paths must stay inside the record folder: ``../`` escapes, absolute paths elsewhere,
  a hostile ``save_folder_path`` and symlinks pointing out are refused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import builders as h
from fst_plugin.errors import RecordError
from fst_plugin.record import AttackRecord, load_attack_record, load_untrusted, parse_attack_result
from fst_plugin.record.attack_record import resolve_image_path


def _first(payload: dict, split: str = "bd_test") -> dict:
    data_dict = payload[split]["bd_data_container"]["data_dict"]
    return data_dict[sorted(data_dict)[0]]


# ----- pickle payloads ---------------------------------------------------------------------------------------
def _plant(payload: dict, where: str, bomb: object) -> object:
    if where == "top-level":
        return bomb
    if where == "extra-key":
        payload["attack_setting"] = bomb
    elif where == "state-dict":
        payload["model"]["linear.weight"] = bomb
    elif where == "data-dict-entry":
        _first(payload)["other_info"] = [bomb, 1]
    elif where == "numpy-array-slot":
        payload["bd_test"]["poison_indicator"] = bomb
    return payload


BOMBS = {"os.system": h.FileDropper, "open": h.OpenDropper}
PLACES = ["top-level", "extra-key", "state-dict", "data-dict-entry", "numpy-array-slot"]


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("where", PLACES)
def test_record_with_pickle_payload_is_refused_and_the_payload_does_not_run(bb: h.TinyBB, tmp_path: Path,
                                                                            bomb: str, where: str) -> None:
    record = h.copy_record(bb, "hostile", root=tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    h.save_payload(record, _plant(bb.payload, where, BOMBS[bomb](marker)))
    with pytest.raises(RecordError) as info:
        load_attack_record(record)
    message = str(info.value)
    assert "not on the allow-list" in message and "--trust-record" in message
    assert ("posix.system" if bomb == "os.system" else "io.open") in message
    assert "\n" not in message
    assert not marker.exists(), "the pickle payload ran"


def test_genuine_record_loads(bb: h.TinyBB) -> None:
    record = load_attack_record(bb.record)
    assert isinstance(record, AttackRecord)
    assert (record.model_name, record.num_classes, record.clean_data) == ("preactresnet_small", 10, "cifar10")
    assert record.img_size == (32, 32, 3)
    assert record.target_labels == {h.TARGET}
    assert len(record.bd_test.images) == bb.n_test - bb.n_test // 10  # every non-target test image
    root = bb.record.resolve()
    assert all(img.path.is_relative_to(root) and img.path.is_file() for img in record.bd_test.images)
    assert all(isinstance(v, torch.Tensor) for v in record.state_dict.values())


def test_record_written_with_numpy_scalars_and_arrays_loads(bb: h.TinyBB, tmp_path: Path) -> None:
    """The allow-list covers exactly what BackdoorBench records hold: NumPy arrays, dtypes and scalars."""
    record = h.copy_record(bb, "numpy_types", root=tmp_path)
    payload = bb.payload
    payload["num_classes"] = np.int64(10)
    payload["img_size"] = np.array([32, 32, 3], dtype=np.int32)
    payload["bd_test"]["poison_indicator"] = payload["bd_test"]["poison_indicator"].astype(np.float32)
    payload["extra_numpy"] = {"f": np.float32(0.5), "b": np.bool_(True), "u": np.uint8(3), "s": np.str_("x")}
    h.save_payload(record, payload)
    loaded = load_attack_record(record)
    assert loaded.num_classes == 10 and loaded.img_size == (32, 32, 3)


def test_trust_record_runs_what_the_allow_list_refuses_and_says_so(bb: h.TinyBB, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    record = h.copy_record(bb, "trusted", root=tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    h.save_payload(record, _plant(bb.payload, "extra-key", h.FileDropper(marker)))
    with caplog.at_level(logging.WARNING):
        loaded = load_attack_record(record, trust=True)
    assert marker.exists(), "--trust-record should fully unpickle (that is what it is for)"
    assert loaded.extra["attack_setting"] == 0
    assert any(r.levelno >= logging.WARNING and "--trust-record" in r.getMessage()
               and "WITH FULL UNPICKLING" in r.getMessage() for r in caplog.records)


def test_trust_record_is_documented_in_the_help(tmp_path: Path) -> None:
    result = h.run_cli(["run", "fst", "--help"], cwd=tmp_path)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert "--trust-record" in help_text and "UNSAFE" in help_text


def test_trust_record_on_the_command_line_is_logged_loudly(bb: h.TinyBB, tmp_path: Path) -> None:
    record = h.copy_record(bb, "trusted_cli", root=tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    h.save_payload(record, _plant(bb.payload, "extra-key", h.FileDropper(marker)))
    # stop right after loading and logging (no CUDA here): the warnings are what this test is about
    result = h.run_cli(["run", "fst", "--record", record, "--yaml_path", h.write_yaml(tmp_path / "y.yaml"),
                        "--dataset_path", bb.data, "--trust-record", "--device", "cuda"], cwd=tmp_path,
                       env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr
    assert marker.exists()
    assert "WITH FULL UNPICKLING (--trust-record)" in result.stderr
    assert "WARNING" in result.stderr and "--trust-record is ON" in result.stderr


def test_without_trust_record_the_cli_refuses_the_same_record(bb: h.TinyBB, tmp_path: Path) -> None:
    record = h.copy_record(bb, "untrusted_cli", root=tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    h.save_payload(record, _plant(bb.payload, "extra-key", h.FileDropper(marker)))
    result = h.run_cli(["run", "fst", "--record", record, "--yaml_path", h.write_yaml(tmp_path / "y.yaml"),
                        "--dataset_path", bb.data], cwd=tmp_path)
    assert result.returncode == 2 and len(result.error_lines) == 1
    assert "posix.system" in result.error_lines[0] and "--trust-record" in result.error_lines[0]
    assert not marker.exists() and not (record / "defense").exists()


@pytest.mark.parametrize("what", ["defense result", "checkpoint"])
def test_defense_results_and_checkpoints_follow_the_same_rule(bb: h.TinyBB, tmp_path: Path, what: str) -> None:
    """``load_untrusted`` is what reads defense_result.pt (evaluation) and checkpoint/last.pt (--resume)."""
    genuine = {"model_name": "preactresnet_small", "num_classes": 10, "model": bb.payload["model"]}
    if what == "checkpoint":
        genuine = {"resume_key": "k", "state": {"epochs_done": 1, "model": bb.payload["model"], "rng": {
            "python": (3, tuple(range(625)), None), "numpy": ("MT19937", np.zeros(624, np.uint32), 0, 0, 0.0),
            "torch": torch.get_rng_state()}}}
    path = tmp_path / ("defense_result.pt" if what == "defense result" else "last.pt")
    torch.save(genuine, path)
    assert load_untrusted(path, what).keys() == genuine.keys()
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({**genuine, "model": h.FileDropper(marker)}, path)
    with pytest.raises(RecordError, match="not on the allow-list"):
        load_untrusted(path, what)
    assert not marker.exists()


def test_the_evaluator_refuses_a_hostile_defense_result(bb: h.TinyBB, tmp_path: Path) -> None:
    """bench_scripts' evaluator reads every defense/<name>/defense_result.pt: the allow-list applies there too."""
    from bench_scripts import common  # the repository root is on sys.path (pytest's pythonpath)

    path = tmp_path / "defense_result.pt"
    torch.save({"model_name": "preactresnet_small", "num_classes": 10, "model": bb.payload["model"]}, path)
    assert not common.load_defended(path).training
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"model_name": "preactresnet_small", "num_classes": 10, "model": bb.payload["model"],
                "attack": h.FileDropper(marker)}, path)
    with pytest.raises(RecordError, match="not on the allow-list"):
        common.load_defended(path)
    assert not marker.exists()


def test_checkpoint_of_a_real_run_loads_with_the_allow_list(bb: h.TinyBB, tmp_path: Path) -> None:
    """What ``on_epoch_end`` saves (model, optimizer, scheduler, every RNG state) needs no --trust-record."""
    from fst_plugin.core import find_head, get_mode, tune
    from fst_plugin.core.tuning import TuningConfig
    from fst_plugin.io_utils import atomic_torch_save
    from fst_plugin.models import build_model

    torch.manual_seed(0)
    model = build_model("preactresnet_small", 10)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    states = []
    tune(model, find_head(model, 10), get_mode("fst"), data, TuningConfig(epochs=1, show_progress=False),
         on_epoch_end=states.append)
    atomic_torch_save({"resume_key": "k", "state": states[0].to_dict()}, tmp_path / "last.pt")
    loaded = load_untrusted(tmp_path / "last.pt", "checkpoint")
    assert loaded["state"]["epochs_done"] == 1


# ----- image paths ------------------------------------------------------------------------------------------
ESCAPES = {
    "dotdot-relative": "../../../etc/passwd",
    "dotdot-under-save-folder": "./record/tiny_badnet/bd_test_dataset/0/../../../../etc/passwd",
    "dotdot-into-sibling-record": "./record/tiny_badnet/bd_test_dataset/../../other_record/bd_test_dataset/0/1.png",
    "dotdot-to-the-dataset": "./record/tiny_badnet/../../data/cifar10/test/bird/00001.png",
    "absolute-elsewhere": "/etc/passwd",
    "absolute-home": os.path.expanduser("~/.ssh/id_rsa"),
    "windows-backslashes": "..\\..\\..\\etc\\passwd",
    "nul-byte": "./record/tiny_badnet/bd_test_dataset/0/1.png\x00../../etc/passwd",
    "not-a-string": b"/etc/passwd",
    "empty": "",
}


@pytest.mark.parametrize("split", ["bd_test", "bd_train"])
@pytest.mark.parametrize("name", list(ESCAPES))
def test_image_path_outside_the_record_is_refused(bb: h.TinyBB, name: str, split: str) -> None:
    payload = bb.payload
    if split == "bd_train":
        payload["bd_train"] = {**payload["bd_test"], "bd_data_container": {
            **payload["bd_test"]["bd_data_container"],
            "data_dict": {k: dict(v) for k, v in payload["bd_test"]["bd_data_container"]["data_dict"].items()}}}
    _first(payload, split)["path"] = ESCAPES[name]
    with pytest.raises(RecordError) as info:
        parse_attack_result(payload, bb.record.resolve(), check_files=False)
    assert ("outside the record folder" in str(info.value)) or ("not a path string" in str(info.value))


@pytest.mark.parametrize("save_folder, path", [
    ("../../..", "../../../etc/passwd"),
    ("/", "/etc/passwd"),
    (".", "./etc/passwd"),
    ("./record/tiny_badnet/..", "./record/tiny_badnet/../../x.png"),
], ids=["dotdot-folder", "root-folder", "dot-folder", "parent-of-record"])
def test_hostile_save_folder_cannot_widen_the_allowed_area(bb: h.TinyBB, save_folder: str, path: str) -> None:
    payload = bb.payload
    payload["bd_test"]["bd_data_container"]["save_folder_path"] = save_folder
    _first(payload)["path"] = path
    with pytest.raises(RecordError, match="outside the record folder"):
        parse_attack_result(payload, bb.record.resolve(), check_files=False)


def test_symlink_inside_the_record_pointing_out_is_refused(bb: h.TinyBB, tmp_path: Path) -> None:
    record = h.copy_record(bb, "symlinked", root=tmp_path)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    payload = bb.payload
    target = record / "bd_test_dataset" / "evil.png"
    target.symlink_to(secret)
    _first(payload)["path"] = "./record/tiny_badnet/bd_test_dataset/evil.png"
    h.save_payload(record, payload)
    with pytest.raises(RecordError, match="outside the record folder"):
        load_attack_record(record)


def test_paths_inside_the_record_are_accepted_in_every_spelling(bb: h.TinyBB) -> None:
    root = bb.record.resolve()
    folder = "./record/tiny_badnet/bd_test_dataset"
    inside = root / "bd_test_dataset" / "1" / "3.png"
    for raw in (f"{folder}/1/3.png", f"{folder}/1/../1/3.png", str(inside),
                "record/tiny_badnet/bd_test_dataset/1/3.png",
                ".\\record\\tiny_badnet\\bd_test_dataset\\1\\3.png"):
        assert resolve_image_path(raw, folder, root) == inside, raw


def test_image_name_too_long_for_the_filesystem_is_a_record_error(bb: h.TinyBB) -> None:
    """Found by the fuzz test: Path.is_file() raised OSError (ENAMETOOLONG) instead of a clear error."""
    payload = bb.payload
    _first(payload)["path"] = "./record/tiny_badnet/bd_test_dataset/1/" + "a" * 300 + ".png"
    with pytest.raises(RecordError, match="missing"):
        parse_attack_result(payload, bb.record.resolve(), check_files=True)
