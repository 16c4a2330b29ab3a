"""Issue 4.5 — property-based fuzzing of the record and config loaders (hypothesis).

Whatever the input, ``parse_attack_result`` / ``load_attack_record`` / ``build_config`` / ``read_yaml``
either return a valid object or raise our error type (``FSTError``), never another exception. Records are
fuzzed by mutating a genuine record (replacing or deleting values anywhere in its nested structure with
hostile values: wrong types, NaN, huge or negative numbers, ragged lists, odd tensors, path escapes...) and
by corrupting the bytes of the file on disk; configs by random mappings over the real keys plus unknown
ones, and by random yaml text.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import builders as h
from fst_plugin.defense.config import SPECS, DefenseConfig, build_config, read_yaml
from fst_plugin.errors import ConfigError, FSTError, RecordError
from fst_plugin.record import AttackRecord, load_attack_record, parse_attack_result

RECORD_EXAMPLES = 400
DISK_EXAMPLES = 25
BYTE_EXAMPLES = 40
CONFIG_EXAMPLES = 500
YAML_EXAMPLES = 150
FUZZ_EXAMPLES_RUN: dict[str, int] = {}   # test name -> examples actually run (the closing note's count)

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _count(name: str) -> None:
    FUZZ_EXAMPLES_RUN[name] = FUZZ_EXAMPLES_RUN.get(name, 0) + 1


@pytest.fixture(scope="module")
def base_payload(bb: h.TinyBB) -> dict:
    return bb.payload


# ----- hostile values ------------------------------------------------------------------------------------
def _tensors() -> st.SearchStrategy:
    shapes = st.lists(st.integers(0, 3), min_size=0, max_size=2)
    dtypes = st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.float64,
                              torch.bfloat16, torch.float16, torch.complex64])

    def make(shape: list[int], dtype: torch.dtype, grad: bool) -> torch.Tensor:
        t = torch.ones(shape, dtype=dtype) if dtype is not torch.bool else torch.ones(shape).bool()
        if grad and dtype.is_floating_point:
            return torch.nn.Parameter(t)
        return t
    return st.builds(make, shapes, dtypes, st.booleans())


def _arrays() -> st.SearchStrategy:
    dtypes = st.sampled_from([np.int64, np.int8, np.uint64, np.float64, np.float32, np.bool_, np.complex64])
    values = st.sampled_from([0, 1, 7, -1, 2 ** 40, float("nan"), float("inf"), 1e300, 0.5])

    def make(dtype: Any, shape: list[int], value: Any) -> np.ndarray:
        with np.errstate(all="ignore"):
            try:
                return np.full(shape, value).astype(dtype)
            except (OverflowError, ValueError):
                return np.zeros(shape, dtype=dtype)
    return st.builds(make, dtypes, st.lists(st.integers(0, 4), max_size=2), values)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2 ** 70, 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=8),
    st.sampled_from(["", "../../etc/passwd", "/etc/passwd", "..", ".", "a\x00b", "record/x/../../..",
                     "./record/tiny_badnet/bd_test_dataset/1/../../../../x.png",
                     "./record/tiny_badnet/bd_test_dataset/1/" + "a" * 300 + ".png",
                     "C:\\\\Windows\\\\evil.png", "..\\\\..\\\\x.png", "preactresnet_small", "cifar10",
                     np.int64(3), np.int64(-5), np.float64("nan"), np.bool_(True), 10 ** 30]),
)
VALUES = st.recursive(
    st.one_of(SCALARS, _tensors(), _arrays()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.integers(-3, 50), st.text(max_size=6)), inner, max_size=4)),
    max_leaves=8,
)

FIRST = object()  # "the first poisoned entry of data_dict"
LOCATIONS = [
    (), ("model_name",), ("num_classes",), ("model",), ("model", "linear.weight"), ("data_path",),
    ("img_size",), ("img_size", 0), ("clean_data",), ("bd_train",), ("bd_test",),
    ("bd_test", "bd_data_container"), ("bd_test", "bd_data_container", "save_folder_path"),
    ("bd_test", "bd_data_container", "data_dict"), ("bd_test", "bd_data_container", "data_dict", FIRST),
    ("bd_test", "bd_data_container", "data_dict", FIRST, "path"),
    ("bd_test", "bd_data_container", "data_dict", FIRST, "other_info"),
    ("bd_test", "bd_data_container", "data_dict", FIRST, "other_info", 0),
    ("bd_test", "bd_data_container", "data_dict", FIRST, "other_info", 1),
    ("bd_test", "original_index_array"), ("bd_test", "poison_indicator"),
]
MUTATION = st.tuples(st.sampled_from(range(len(LOCATIONS))), st.sampled_from(["set", "delete"]), VALUES)


def _clone(obj: Any) -> Any:
    """Copy the containers of a payload (leaves are replaced, never changed in place)."""
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _mutate(payload: Any, location: tuple, action: str, value: Any) -> Any:
    if not location:
        return value
    parent, path = payload, list(location)
    for key in path[:-1]:
        if key is FIRST and isinstance(parent, dict) and parent:
            key = sorted(parent, key=repr)[0]
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return payload
    key = path[-1]
    if key is FIRST and isinstance(parent, dict) and parent:
        key = sorted(parent, key=repr)[0]
    if isinstance(parent, dict):
        if action == "delete":
            parent.pop(key, None)
        else:
            parent[key] = value
    elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
        if action == "delete":
            del parent[key]
        else:
            parent[key] = value
    return payload


def _check_valid(record: AttackRecord, record_dir: Path) -> None:
    """What a record that loads guarantees to the defense."""
    assert isinstance(record.model_name, str) and record.model_name
    assert isinstance(record.num_classes, int) and record.num_classes >= 2
    assert record.state_dict and all(isinstance(v, torch.Tensor) for v in record.state_dict.values())
    assert record.bd_test.images
    root = record_dir.resolve()
    for img in record.bd_test.images:
        assert img.path.is_relative_to(root), img.path
        assert 0 <= img.bd_label < record.num_classes and 0 <= img.original_label < record.num_classes
    if record.bd_train is not None:
        assert all(img.path.is_relative_to(root) for img in record.bd_train.images)


def _parse_or_our_error(payload: Any, record_dir: Path, check_files: bool) -> str:
    try:
        record = parse_attack_result(payload, record_dir, check_files=check_files)
    except FSTError as exc:
        assert isinstance(exc, RecordError) or type(exc).__name__.endswith("Error")
        assert "Fix: " in str(exc) and "\n" not in str(exc)
        return "refused"
    _check_valid(record, record_dir)
    return "loaded"


PATH = LOCATIONS.index(("bd_test", "bd_data_container", "data_dict", FIRST, "path"))
INDICES = LOCATIONS.index(("bd_test", "original_index_array"))


@settings(max_examples=RECORD_EXAMPLES, **SETTINGS)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), check_files=st.booleans())
@example(mutations=[(PATH, "set", "./record/tiny_badnet/bd_test_dataset/1/" + "a" * 300 + ".png")], check_files=True)
@example(mutations=[(PATH, "set", "./record/tiny_badnet/bd_test_dataset/" + "a/" * 3000 + "x.png")], check_files=True)
@example(mutations=[(INDICES, "set", [[1], [1, 2]])], check_files=False)
@example(mutations=[(INDICES, "set", torch.nn.Parameter(torch.ones(3)))], check_files=False)
@example(mutations=[(INDICES, "set", torch.ones(3, dtype=torch.bfloat16))], check_files=False)
@example(mutations=[(INDICES, "set", torch.ones(3, 2))], check_files=False)
def test_parse_attack_result_returns_a_record_or_raises_our_error(base_payload: dict, bb: h.TinyBB,
                                                                   mutations: list, check_files: bool) -> None:
    _count("parse_attack_result")
    payload = _clone(base_payload)
    for index, action, value in mutations:
        payload = _mutate(payload, LOCATIONS[index], action, value)
    _parse_or_our_error(payload, bb.record.resolve(), check_files)


@settings(max_examples=100, **SETTINGS)
@given(payload=VALUES)
def test_parse_attack_result_on_arbitrary_objects(bb: h.TinyBB, payload: Any) -> None:
    _count("parse_attack_result (arbitrary objects)")
    assert _parse_or_our_error(payload, bb.record.resolve(), True) == "refused"


def test_the_genuine_record_parses(base_payload: dict, bb: h.TinyBB) -> None:
    assert _parse_or_our_error(_clone(base_payload), bb.record.resolve(), True) == "loaded"


@pytest.fixture(scope="module")
def disk_record(bb: h.TinyBB, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.copy_record(bb, "fuzzed", root=tmp_path_factory.mktemp("fuzz_bb"))


@settings(max_examples=DISK_EXAMPLES, **SETTINGS)
@given(mutations=st.lists(MUTATION, min_size=0, max_size=2))
def test_load_attack_record_on_disk(base_payload: dict, disk_record: Path, mutations: list) -> None:
    _count("load_attack_record (mutated payloads on disk)")
    payload = _clone(base_payload)
    for index, action, value in mutations:
        payload = _mutate(payload, LOCATIONS[index], action, value)
    try:
        torch.save(payload, disk_record / "attack_result.pt")
    except Exception:  # torch cannot even write it: nothing to load
        return
    try:
        record = load_attack_record(disk_record)
    except FSTError:
        return
    _check_valid(record, disk_record)


@settings(max_examples=BYTE_EXAMPLES, **SETTINGS)
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=6))
def test_load_attack_record_with_corrupted_bytes(bb: h.TinyBB, disk_record: Path, cut: float,
                                                 flips: list) -> None:
    _count("load_attack_record (corrupted bytes)")
    data = bytearray((bb.record / "attack_result.pt").read_bytes())
    for where, xor in flips:
        data[int(where * (len(data) - 1))] ^= xor
    if cut < 0.5:
        data = data[: int(cut * 2 * len(data))]
    (disk_record / "attack_result.pt").write_bytes(bytes(data))
    try:
        record = load_attack_record(disk_record)
    except FSTError:
        return
    _check_valid(record, disk_record)


# ----- configs ---------------------------------------------------------------------------------------------
KEYS = list(DefenseConfig.__dataclass_fields__)
CONFIG_VALUES = st.one_of(
    SCALARS,
    st.sampled_from(["auto", "on", "off", "True", "false", "1e-2", "0.5", "-1", "nan", "inf", "1e400", "10",
                     "CosineAnnealingLR", "sgd", "cpu", "cuda", " 3 ", "1_000", 2 ** 31, 2 ** 64, 1e-300]),
    st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)
CONFIGS = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(), st.none()),
                          CONFIG_VALUES, max_size=6)


def _check_config(config: DefenseConfig) -> None:
    for key, (_, ok) in {name: spec.check for name, spec in SPECS.items() if spec.check}.items():
        value = getattr(config, key)
        assert value is None or ok(value), (key, value)
    for key in ("lr", "alpha", "ratio", "sgd_momentum", "wd", "alpha_budget", "alpha_held_out"):
        value = getattr(config, key)
        assert (key == "alpha" and value == "auto") or math.isfinite(value), key
    assert isinstance(config.epochs, int) and not isinstance(config.epochs, bool)
    assert config.projection in (None, True, False)


@settings(max_examples=CONFIG_EXAMPLES, **SETTINGS)
@given(values=CONFIGS)
def test_build_config_returns_a_valid_config_or_raises_config_error(values: dict) -> None:
    _count("build_config")
    try:
        config = build_config(values)
    except ConfigError as exc:
        assert "Fix: " in str(exc) and "\n" not in str(exc)
        return
    _check_config(config)


@settings(max_examples=YAML_EXAMPLES, **SETTINGS)
@given(text=st.one_of(
    st.text(max_size=80),
    st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), CONFIGS.filter(
        lambda d: all(not isinstance(v, (np.generic, bytes)) for v in d.values()))),
    st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(KEYS), st.text(max_size=20)),
    st.sampled_from(["a: &x [*x]\n", "? [1, 2]\n: 3\n", "epochs: !!python/object/apply:os.system ['true']\n",
                     "- a\n- b\n", "42", "lr: 1" + "0" * 400 + "\n", "\t- bad", "projection: [on]\n",
                     "lr: .nan\n", "epochs: .inf\n", "random_seed: 99999999999999999999999\n",
                     "epochs: " + "1" * 5000 + "\n", "a: " + "[" * 3000 + "]" * 3000 + "\n",
                     "dataset: !!timestamp 2020-99-99\n", "lr: !!float abc\n", "epochs: !!int ten\n",
                     "log: !!binary '@@@'\n", "terminal_info: !!set {1: }\n"]),
), raw=st.binary(max_size=40))
def test_read_yaml_and_build_config_never_raise_anything_else(tmp_path_factory: pytest.TempPathFactory,
                                                              text: str, raw: bytes) -> None:
    _count("read_yaml + build_config")
    folder = tmp_path_factory.mktemp("yaml", numbered=True)
    path = folder / "fuzz.yaml"
    for content in (text.encode("utf-8", "surrogatepass"), raw):
        path.write_bytes(content)
        try:
            config = build_config(read_yaml(path))
        except ConfigError as exc:
            assert "Fix: " in str(exc)
            continue
        _check_config(config)
    shutil.rmtree(folder)


def test_fuzz_counts() -> None:
    """Runs last in this module: the counts reported in the closing note of issue 4."""
    total = sum(FUZZ_EXAMPLES_RUN.values())
    print(f"\nfuzz examples run: {total} {FUZZ_EXAMPLES_RUN}")
    if len(FUZZ_EXAMPLES_RUN) == 7:  # the whole module ran
        assert total >= 1000
