"""BackdoorBench attack records: reading (validated, path-safe) and writing (the same layout).

A record is a folder ``record/<name>/`` holding ``attack_result.pt`` (see BACKDOORBENCH.md for its keys)
and the poisoned PNGs it references. Reading never relies on BackdoorBench's ``load_attack_result`` (which
fails on torch >= 2.6 and unpickles anything): it goes through :func:`load_untrusted`, checks every key
and type, and resolves each poisoned-image path inside the record folder, refusing ``../`` escapes and
absolute paths elsewhere.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fst_plugin.errors import DataError, RecordError
from fst_plugin.io_utils import atomic_torch_save
from fst_plugin.record.layout import attack_result
from fst_plugin.record.safe_load import load_untrusted

REQUIRED_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_test")


@dataclass(frozen=True)
class PoisonedImage:
    original_index: int
    path: Path
    bd_label: int
    original_label: int


@dataclass
class PoisonedSplit:
    """A poisoned split's state: the images it holds plus BackdoorBench's index arrays."""

    images: list[PoisonedImage]
    original_index_array: np.ndarray
    poison_indicator: np.ndarray


@dataclass
class AttackRecord:
    record_dir: Path
    model_name: str
    num_classes: int
    state_dict: dict[str, torch.Tensor]
    data_path: str
    img_size: tuple[int, ...]
    clean_data: str
    bd_test: PoisonedSplit
    bd_train: Optional[PoisonedSplit] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record_dir.name

    @property
    def target_labels(self) -> set[int]:
        return {img.bd_label for img in self.bd_test.images}

    def clean_data_folder(self, dataset_path: str | Path, dataset: Optional[str] = None) -> Path:
        """Where the clean images are: ``<dataset_path>/<dataset>``, else the record's own ``data_path`` under
        its BackdoorBench root (``record/<name>/../..``). The record's path counts only as written inside that
        root (relative, no ``..``), so a hostile record cannot send the loaders elsewhere; a link that the user
        put there is followed. The one rule for every defense and the retuning attack."""
        dataset = dataset or self.clean_data
        candidates = [Path(dataset_path) / dataset]
        own = Path(self.data_path)
        if not own.is_absolute() and ".." not in own.parts:
            candidates.append(self.record_dir.parent.parent / own)
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        raise DataError(f"dataset folder not found (looked in {', '.join(str(c) for c in candidates)})",
                        f"pass --dataset_path pointing at the folder that holds {dataset}/"
                        + (" (create it with make_cifar10.py DEST --batches-py)" if dataset == "cifar10" else ""))


def _bad(record: Path, problem: str) -> RecordError:
    return RecordError(f"attack record {record}: {problem}",
                       "re-create the record with a BackdoorBench attack script or fst_plugin's record writer")


def _as_int(value: Any, record: Path, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if (isinstance(value, torch.Tensor) and value.numel() == 1
                and not (value.is_floating_point() or value.is_complex())):
            return int(value.item())
        raise _bad(record, f"{what} is {type(value).__name__}, expected an integer")
    return int(value)


def _as_array(value: Any, record: Path, what: str) -> np.ndarray:
    try:  # a tensor NumPy cannot hold (bfloat16, requires_grad) or a ragged list is just as bad
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, (list, tuple)):
            value = np.asarray(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        value = None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or not (
            np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.bool_)
            or (np.issubdtype(value.dtype, np.floating) and np.all(np.isfinite(value)) and np.all(value == np.round(value)))):
        raise _bad(record, f"{what} must be a 1-D array of integers")
    return value.astype(np.int64)


def resolve_image_path(raw: Any, save_folder: Optional[str], record_dir: Path) -> Path:
    """Map a path stored in the record to a file inside ``record_dir`` or refuse it.

    BackdoorBench stores paths relative to its root (``./record/<name>/bd_test_dataset/<label>/<i>.png``).
    A path under the split's ``save_folder_path`` is re-rooted at the record folder (so renamed or moved
    records still work); any other relative path is taken from the BackdoorBench root (two levels above).
    """
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise _bad(record_dir, f"poisoned image path {raw!r} is not a path string")
    norm = posixpath.normpath(raw.replace("\\", "/"))
    folder = posixpath.normpath(save_folder.replace("\\", "/")) if isinstance(save_folder, str) and save_folder else None
    if folder and norm.startswith(folder + "/"):
        candidate = record_dir / posixpath.basename(folder) / norm[len(folder) + 1:]
    elif posixpath.isabs(norm):
        candidate = Path(norm)
    else:
        candidate = record_dir.parent.parent / norm
    resolved = candidate.resolve()
    if not resolved.is_relative_to(record_dir.resolve()):
        raise RecordError(
            f"attack record {record_dir}: poisoned image path {raw!r} points outside the record folder",
            "refusing to read it; records must keep their images under record/<name>/ (re-create the record)",
        )
    return resolved


def _parse_split(state: Any, record_dir: Path, key: str, check_files: bool) -> PoisonedSplit:
    if not isinstance(state, Mapping):
        raise _bad(record_dir, f"{key} is {type(state).__name__}, expected a dict (a poisoned-dataset state)")
    for needed in ("bd_data_container", "original_index_array", "poison_indicator"):
        if needed not in state:
            raise _bad(record_dir, f"{key} has no {needed!r}")
    container = state["bd_data_container"]
    if not isinstance(container, Mapping) or not isinstance(container.get("data_dict"), Mapping):
        raise _bad(record_dir, f"{key}.bd_data_container has no data_dict mapping")
    save_folder = container.get("save_folder_path")
    data_dict = container["data_dict"]
    indices = _as_array(state["original_index_array"], record_dir, f"{key}.original_index_array")
    indicator = _as_array(state["poison_indicator"], record_dir, f"{key}.poison_indicator")
    images: list[PoisonedImage] = []
    for index in indices.tolist():
        if not 0 <= index < len(indicator):
            raise _bad(record_dir, f"{key}.original_index_array holds {index}, outside poison_indicator")
        if indicator[index] != 1:
            continue
        entry = data_dict.get(index, data_dict.get(np.int64(index)))
        if not isinstance(entry, Mapping) or "path" not in entry or "other_info" not in entry:
            raise _bad(record_dir, f"{key} data_dict has no path/other_info entry for poisoned index {index}")
        info = entry["other_info"]
        if not isinstance(info, (list, tuple)) or len(info) < 2:
            raise _bad(record_dir, f"{key} data_dict[{index}].other_info must be [bd_label, original_label]")
        path = resolve_image_path(entry["path"], save_folder, record_dir)
        try:
            missing = check_files and not path.is_file()
        except OSError:  # e.g. a name too long for the filesystem
            missing = True
        if missing:
            raise RecordError(f"attack record {record_dir}: poisoned image {path} is missing",
                              "restore the record's bd_test_dataset/ folder or re-run the attack")
        images.append(PoisonedImage(index, path, _as_int(info[0], record_dir, f"{key} bd_label"),
                                    _as_int(info[1], record_dir, f"{key} original label")))
    return PoisonedSplit(images, indices, indicator)


def parse_attack_result(data: Any, record_dir: Path, check_files: bool = True) -> AttackRecord:
    """Validate a loaded ``attack_result.pt`` dictionary and turn it into an :class:`AttackRecord`."""
    if not isinstance(data, Mapping):
        raise _bad(record_dir, f"attack_result.pt holds a {type(data).__name__}, expected a dict")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise _bad(record_dir, f"attack_result.pt lacks the key(s) {', '.join(missing)}")
    for key in ("model_name", "clean_data", "data_path"):
        if not isinstance(data[key], str) or not data[key]:
            raise _bad(record_dir, f"{key} is {data[key]!r}, expected a non-empty string")
    num_classes = _as_int(data["num_classes"], record_dir, "num_classes")
    if num_classes < 2:
        raise _bad(record_dir, f"num_classes is {num_classes}, expected at least 2")
    state_dict = data["model"]
    if not isinstance(state_dict, Mapping) or not state_dict or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise _bad(record_dir, "model is not a state_dict (a non-empty dict of name -> tensor)")
    img_size = data["img_size"]
    if not isinstance(img_size, (list, tuple, np.ndarray, torch.Size)) or len(img_size) not in (2, 3):
        raise _bad(record_dir, f"img_size is {img_size!r}, expected (height, width, channels)")
    img_size = tuple(_as_int(v, record_dir, "img_size") for v in img_size)
    bd_test = _parse_split(data["bd_test"], record_dir, "bd_test", check_files)
    if not bd_test.images:
        raise _bad(record_dir, "bd_test holds no poisoned image")
    for img in bd_test.images:
        if not (0 <= img.bd_label < num_classes and 0 <= img.original_label < num_classes):
            raise _bad(record_dir, f"bd_test label {img.bd_label}/{img.original_label} is outside 0..{num_classes - 1}")
    bd_train = None
    if data.get("bd_train") is not None:
        bd_train = _parse_split(data["bd_train"], record_dir, "bd_train", check_files=False)
    extra = {k: v for k, v in data.items() if k not in REQUIRED_KEYS + ("bd_train",)}
    return AttackRecord(record_dir, data["model_name"], num_classes, dict(state_dict), data["data_path"],
                        img_size, data["clean_data"], bd_test, bd_train, extra)


def load_attack_record(record_dir: str | Path, trust: bool = False, check_files: bool = True) -> AttackRecord:
    """Read and validate ``<record_dir>/attack_result.pt``."""
    record_dir = Path(record_dir)
    if not record_dir.is_dir():
        raise RecordError(f"attack record folder {record_dir} does not exist",
                          "pass --result_file NAME (inside BackdoorBench: record/NAME) or --record DIR of an attack run")
    data = load_untrusted(attack_result(record_dir), "attack record", trust=trust)
    return parse_attack_result(data, record_dir.resolve(), check_files=check_files)


def _split_state(record_dir: Path, folder: str, split_size: int,
                 images: Sequence[tuple[int, Image.Image, int, int]], keep_only_poisoned: bool) -> dict[str, Any]:
    """Save ``images`` (index, PIL, bd label, original label) as PNGs and return BackdoorBench's state dict."""
    rel_folder = f"./record/{record_dir.name}/{folder}"
    data_dict: dict[np.int64, dict[str, Any]] = {}
    indicator = np.zeros(split_size, dtype=np.int64)
    for index, image, bd_label, label in images:
        target = record_dir / folder / str(int(label)) / f"{int(index)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        data_dict[np.int64(index)] = {"path": f"{rel_folder}/{int(label)}/{int(index)}.png",
                                      "other_info": [int(bd_label), int(label)]}
        indicator[int(index)] = 1
    kept = np.flatnonzero(indicator) if keep_only_poisoned else np.arange(split_size)
    return {
        "bd_data_container": {"save_folder_path": rel_folder, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": kept,
        "poison_indicator": indicator,
        "save_folder_path": rel_folder,
    }


def write_attack_record(
    record_dir: str | Path,
    *,
    model_name: str,
    num_classes: int,
    state_dict: Mapping[str, torch.Tensor],
    clean_data: str,
    img_size: Sequence[int],
    test_size: int,
    bd_test: Sequence[tuple[int, Image.Image, int, int]],
    train_size: Optional[int] = None,
    bd_train: Optional[Sequence[tuple[int, Image.Image, int, int]]] = None,
    data_path: Optional[str] = None,
    **extra: Any,
) -> Path:
    """Write a record in BackdoorBench's layout (``attack_result.pt`` + poisoned PNGs).

    ``bd_test`` holds the poisoned test images (index into the clean test split, image, backdoor label,
    original label); as in BackdoorBench only those are kept in ``original_index_array``. ``bd_train``
    likewise for the poisoned training images (the whole training split stays indexed).
    """
    record_dir = Path(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
        "data_path": data_path or f"./data/{clean_data}",
        "img_size": tuple(int(v) for v in img_size),
        "clean_data": clean_data,
        "bd_train": (_split_state(record_dir, "bd_train_dataset", train_size or 0, bd_train, False)
                     if bd_train is not None else None),
        "bd_test": _split_state(record_dir, "bd_test_dataset", test_size, bd_test, True),
        **extra,
    }
    atomic_torch_save(payload, attack_result(record_dir))
    return record_dir
