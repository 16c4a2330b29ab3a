"""Test helpers: the one builder of the tiny BackdoorBench root every test shares, CLI runners, file checks.

The builder
    :func:`build_tiny_bb` writes ``data/cifar10/{train,test}/<class>/*.png`` (the demo's synthetic images,
    32x32) and ``record/tiny_badnet/`` (a BadNets record of a ``preactresnet_small``) through
    :func:`fst_plugin.attacks.backdoor_and_record`, the code that writes the demo's and the benchmark's records.
    ``tests/conftest.py`` builds it once per session as the fixtures ``bb`` (read-only) and ``fresh_bb`` (a
    private copy); the robustness suite, the torchrun tests and the wheel test use that same instance.

    The model is **untrained** (0 attack epochs): no test needs a real backdoor. The tests on this fixture
    check formats, plumbing, outputs, bad input, faults and reproducibility; none asserts that a defense lowers
    the ASR (the only tests that train a backdoor, ``workflows/test_demo.py`` and the wheel test, run
    ``fst-plugin demo`` itself, and ``probes/test_retune.py`` and ``bench/test_pipeline.py`` build the
    trained models they measure). Untrained also makes the fixture cheap and bit-identical on any machine.

Seeding and threads, decided here and nowhere else
    * Seed ``SEED = 0``: numpy's ``default_rng(SEED)`` draws the images (train split first, then test) and
      ``backdoor_and_record`` draws the initial weights under ``torch.manual_seed(SEED)``. Nothing about the
      fixture depends on the thread count (no training), so every process sees the same bytes.
    * The pytest process runs torch with ``TEST_THREADS = 2`` (``conftest.py`` calls :func:`use_test_threads`
      at import): in-process tuning uses the machine's two cores.
    * Every CLI process started from here (:func:`run_cli`, :func:`start_cli`, :func:`start_cli_forked`,
      :func:`child_env` for subprocesses) runs with ``CLI_THREADS = 1``: tests start several side by side
      (torchrun's ranks, a killed run and its resumption), and the reproducibility tests compare the weights of
      such processes bit for bit, which needs one fixed thread count. No test compares an in-process result
      with a CLI process's bit for bit; a test that starts two subprocesses of its own and compares them
      (``export/test_export.py``) gives both the same environment.

Two ways to drive the CLI:

* :func:`run_cli_subprocess` starts ``python -m fst_plugin.cli`` for real (about 5 s of imports each);
* :func:`run_cli` runs the very same ``__main__`` of ``fst_plugin.cli`` in a process forked from a
  multiprocessing *forkserver* that imported torch & co once, so a case costs a fraction of a second but is
  still its own process: real exit code, real stderr (fd 2), an uncaught exception prints a traceback and
  exits 1 exactly as the interpreter would.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "bb_standin"  # stand-ins of BackdoorBench's modules (see its README.md)
RECORD_NAME = "tiny_badnet"
MODEL = "preactresnet_small"
TARGET = 0
SEED = 0
TEST_THREADS = 2  # the pytest process
CLI_THREADS = 1   # every CLI process started from here: fair on a shared machine, identical numerics


def use_test_threads() -> None:
    """The pytest process's torch thread count (called once, by conftest.py)."""
    torch.set_num_threads(TEST_THREADS)


# ----- the builder: a tiny BackdoorBench root (record/ + data/) -------------------------------------------
@dataclass(frozen=True)
class TinyBB:
    root: Path          # a BackdoorBench-like root: record/<name>/ and data/cifar10/{train,test}/<class>/
    record: Path        # root/record/tiny_badnet (the pristine record; copy it before running a defense)
    data: Path          # root/data (pass as --dataset_path)
    n_train: int
    n_test: int

    @property
    def payload(self) -> dict[str, Any]:
        """The pristine attack_result.pt as a dict (loaded with the allow-list)."""
        from fst_plugin.record import load_untrusted
        return load_untrusted(self.record / "attack_result.pt", "attack record")

    def copy_to(self, root: Path) -> "TinyBB":
        """A private copy of the whole root (data and record) at ``root``."""
        root = Path(root)
        shutil.copytree(self.root, root)
        return dataclasses.replace(self, root=root, record=root / "record" / self.record.name, data=root / "data")


def build_tiny_bb(root: Path, train_per_class: int = 20, test_per_class: int = 2, seed: int = SEED) -> TinyBB:
    """Synthetic CIFAR-10-shaped image folders and a BadNets record (target 0) of an untrained model.

    ``bd_test`` holds every non-target test image with the 3x3 trigger; no training image is poisoned (the
    model is never trained, so a poisoned training split would be written nowhere and used by nothing).
    """
    from fst_plugin.attacks import Attack, Split, TrainConfig, backdoor_and_record, badnets_trigger
    from fst_plugin.demo import synthetic_images, write_image_folders

    root = Path(root)
    rng = np.random.default_rng(seed)
    data_root = root / "data" / "cifar10"
    x_train, y_train = write_image_folders(data_root, "train", *synthetic_images(train_per_class, rng))
    x_test, y_test = write_image_folders(data_root, "test", *synthetic_images(test_per_class, rng))
    backdoor_and_record(root / "record" / RECORD_NAME, model_name=MODEL, dataset="cifar10",
                        train=Split(x_train, y_train), test=Split(x_test, y_test),
                        attack=Attack(badnets_trigger(), np.array([], dtype=np.int64), TARGET),
                        train_config=TrainConfig(epochs=0, device="cpu", seed=seed))
    return TinyBB(root, root / "record" / RECORD_NAME, root / "data", len(y_train), len(y_test))


MNIST_RECORD_NAME = "tiny_mnist_badnet"


def write_mnist_raw(folder: Path, train: bool, images: np.ndarray, labels: np.ndarray) -> None:
    """torchvision's ``MNIST/raw`` idx files under ``folder`` (what ``load_clean_split("mnist")`` reads, never
    downloaded): ``images`` uint8 (N, 28, 28, 1), ``labels`` 0..9."""
    raw = Path(folder) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix, n = ("train" if train else "t10k"), len(labels)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                      + np.ascontiguousarray(images[..., 0]).tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                      + np.asarray(labels, dtype=np.uint8).tobytes())


def build_tiny_mnist(root: Path, train_per_class: int = 5, test_per_class: int = 2, seed: int = SEED) -> TinyBB:
    """The MNIST-shaped twin of :func:`build_tiny_bb`: ``data/mnist/MNIST/raw`` (the demo's synthetic images at
    28x28, in grayscale: 1 channel) and ``record/tiny_mnist_badnet/``, a BadNets record (target 0) of an untrained
    ``preactresnet_small`` built for 1-channel images."""
    from fst_plugin.attacks import Attack, Split, TrainConfig, backdoor_and_record, badnets_trigger
    from fst_plugin.demo import synthetic_images

    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {}
    for train, per_class in ((True, train_per_class), (False, test_per_class)):
        images, labels = synthetic_images(per_class, rng, size=28)
        gray = images.mean(axis=3, keepdims=True).round().astype(np.uint8)
        write_mnist_raw(root / "data" / "mnist", train, gray, labels)
        splits[train] = Split(gray, labels)
    backdoor_and_record(root / "record" / MNIST_RECORD_NAME, model_name=MODEL, dataset="mnist", train=splits[True],
                        test=splits[False], attack=Attack(badnets_trigger(), np.array([], dtype=np.int64), TARGET),
                        train_config=TrainConfig(epochs=0, device="cpu", seed=seed))
    return TinyBB(root, root / "record" / MNIST_RECORD_NAME, root / "data", len(splits[True].labels),
                  len(splits[False].labels))


def copy_record(fixture: TinyBB, name: str, root: Path) -> Path:
    """A fresh copy of the pristine record as ``<root>/record/<name>`` (never inside the shared root).

    The record's relative image paths name ``./record/tiny_badnet/...``; the loader re-roots paths under the
    split's save folder at the record folder, so a renamed copy reads its own images.
    """
    target = Path(root) / "record" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(fixture.record, target, ignore=shutil.ignore_patterns("defense"))
    return target



def record_on(fixture: TinyBB, dataset: str, root: Path) -> Path:
    """A copy of the pristine record as if its attack ran on ``dataset`` (``clean_data``, ``num_classes`` and a
    head of that size, as BackdoorBench writes them) at ``<root>/record/<dataset>_badnet``; for what depends on
    the record's dataset alone (its shipped settings), not for a run: no ``<dataset>`` images exist."""
    from fst_plugin.data import dataset_info
    from fst_plugin.models import build_model
    from fst_plugin.record import load_untrusted

    record = copy_record(fixture, f"{dataset}_badnet", root)
    payload = load_untrusted(record / "attack_result.pt", "attack record")
    num_classes = dataset_info(dataset).num_classes
    torch.manual_seed(SEED)
    payload.update(clean_data=dataset, num_classes=num_classes, model=build_model(MODEL, num_classes).state_dict())
    torch.save(payload, record / "attack_result.pt")
    return record

def backdoorbench_tree(root: Path) -> Path:
    """A BackdoorBench-shaped checkout at ``root``: the stand-in modules of ``tests/bb_standin`` (so
    ``defense/base.py`` exists), a ``models/`` folder, ``config/`` and BackdoorBench's own ``ft`` files (which
    ``install`` and ``export`` must never touch)."""
    import fst_plugin.models.preact_resnet

    root = Path(root)
    shutil.copytree(STANDIN, root, ignore=shutil.ignore_patterns("README.md", "__pycache__"))
    (root / "models").mkdir()
    (root / "models" / "__init__.py").write_text("")
    shutil.copy(fst_plugin.models.preact_resnet.__file__, root / "models" / "preact_resnet.py")
    (root / "defense" / "ft.py").write_text("# BackdoorBench's own fine-tuning defense: must never be touched\n")
    (root / "config" / "defense" / "ft").mkdir(parents=True)
    (root / "config" / "defense" / "ft" / "cifar10.yaml").write_text("epochs: 100\n")
    return root


def save_payload(record_dir: Path, payload: Any) -> Path:
    """Overwrite ``record_dir/attack_result.pt`` with ``payload`` (torch.save, like BackdoorBench)."""
    path = Path(record_dir) / "attack_result.pt"
    torch.save(payload, path)
    return path


def write_yaml(path: Path, **overrides: Any) -> Path:
    """The shipped fst/cifar10.yaml with CPU-friendly values and ``overrides`` applied."""
    from fst_plugin.defense.shipped import shipped_config

    values = yaml.safe_load(shipped_config("fst", "cifar10").read_text())
    values.update(device="cpu", num_workers=0, pin_memory=False, non_blocking=False, batch_size=16,
                  epochs=1, ratio=0.25)
    values.update(overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def defense_args(defense_cls: type, *argv: str) -> argparse.Namespace:
    """``argv`` parsed by ``defense_cls``'s own argument parser (what the launcher and ``fst-plugin run`` do)."""
    parser = argparse.ArgumentParser()
    defense_cls.add_arguments(parser)
    return parser.parse_args(list(argv))


# ----- hostile pickles ----------------------------------------------------------------------------------
class FileDropper:
    """Unpickling this calls ``os.system('touch <marker>')``: the side effect a hostile record would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenDropper:
    """Unpickling this calls ``builtins.open(marker, 'w')``: creates a file without a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----- hashes and output checks ---------------------------------------------------------------------------
def state_dict_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def result_summary(save_dir: Path, method: str = "fst") -> dict[str, Any]:
    """The final state_dict hash and the per-epoch metric table of a finished run."""
    import pandas as pd
    from fst_plugin.record import load_untrusted

    result = load_untrusted(Path(save_dir) / "defense_result.pt", "defense result")
    df = pd.read_csv(Path(save_dir) / f"{method}_df.csv")
    return {"hash": state_dict_hash(result["model"]), "metrics": df.to_dict("list")}


def assert_outputs_complete(save_dir: Path) -> list[str]:
    """Every (non-temporary) file under ``save_dir`` is whole; return the relative paths checked.

    Temporary files of the atomic writer start with '.' and may remain after a kill; ``*.log`` files are
    append-only streams (a log cut mid-line is expected) and are skipped.
    """
    import pandas as pd
    from PIL import Image

    from fst_plugin.record import load_untrusted

    checked = []
    for path in sorted(Path(save_dir).rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix == ".log":
            continue
        rel = str(path.relative_to(save_dir))
        assert path.stat().st_size > 0, f"{rel} is empty"
        if path.suffix == ".pt":
            data = load_untrusted(path, rel)
            assert isinstance(data, dict), rel
            if path.name == "defense_result.pt":
                assert {"model_name", "num_classes", "model"} <= set(data), rel
            if path.name == "last.pt":
                assert {"resume_key", "state"} <= set(data), rel
        elif path.suffix == ".csv":
            df = pd.read_csv(path)
            assert len(df) > 0, rel
            if path.name.endswith("_df.csv"):
                assert list(df["epoch"]) == list(range(len(df))), f"{rel} rows are not epochs 0..n-1"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif path.name == "index.txt":
            lines = path.read_text().splitlines()
            assert lines and all(line.strip().isdigit() for line in lines), rel
            assert path.read_text().endswith("\n"), f"{rel} is cut"
        else:
            raise AssertionError(f"unexpected output file {rel}")
        checked.append(rel)
    return checked


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``folder`` (to show nothing was written)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- running the CLI --------------------------------------------------------------------------------------
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def child_env(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of a CLI subprocess: this one, the repository on PYTHONPATH, ``CLI_THREADS`` threads."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    out["OMP_NUM_THREADS"] = str(CLI_THREADS)
    out.update(env or {})
    return out


def run_cli_subprocess(argv: Sequence[str], cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                       timeout: float = 300) -> CliResult:
    """``python -m fst_plugin.cli ARGV`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "fst_plugin.cli", *map(str, argv)], cwd=cwd,
                          env=child_env(env), capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def start_cli(argv: Sequence[str], cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
              log_to: Optional[Path] = None) -> subprocess.Popen:
    """Start ``python -m fst_plugin.cli ARGV`` in the background (stdout+stderr to ``log_to``)."""
    out = open(log_to, "ab") if log_to else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "fst_plugin.cli", *map(str, argv)], cwd=cwd,
                                env=child_env(env), stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log_to:
            out.close()


def _cli_main_in_child(argv: list[str], cwd: str, env: dict[str, str], out_path: str, err_path: str) -> None:
    """Body of a forked CLI process: ``python -m fst_plugin.cli ARGV`` minus the imports."""
    import traceback

    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(CLI_THREADS)  # as OMP_NUM_THREADS does for a real interpreter: same numerics
    sys.argv = ["fst-plugin", *argv]
    code: Any = 0
    try:
        from fst_plugin.cli import main  # what `if __name__ == "__main__": sys.exit(main())` runs

        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    os._exit(code)


_FORKSERVER: Optional[Any] = None


def _context() -> Any:
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["torch", "torchvision", "pandas", "matplotlib.pyplot", "yaml",
                                            "fst_plugin.cli", "fst_plugin.adapter.defenses",
                                            "fst_plugin.export.installer", "tests.builders"])
    return _FORKSERVER


def run_cli(argv: Sequence[str], cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
            timeout: float = 120) -> CliResult:
    """The CLI's ``__main__`` in its own (forked) process; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="fst_cli_") as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        proc = _context().Process(target=_cli_main_in_child,
                                  args=([str(a) for a in argv], str(cwd or os.getcwd()), dict(env or {}),
                                        out_path, err_path))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise AssertionError(f"fst-plugin {' '.join(map(str, argv))} ran longer than {timeout} s")
        read = lambda p: Path(p).read_text(errors="replace") if os.path.exists(p) else ""  # noqa: E731
        return CliResult(proc.exitcode, read(out_path), read(err_path))


class ForkedCli:
    """A CLI process started by :func:`start_cli_forked`, with the part of Popen's interface the tests use."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.exitcode

    def poll(self) -> Optional[int]:
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        self.proc.join(timeout)
        return self.proc.exitcode


def start_cli_forked(argv: Sequence[str], cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                     log_to: Optional[Path] = None) -> ForkedCli:
    """Like :func:`start_cli`, but forked from the fork server (no interpreter start-up)."""
    log = str(log_to or os.devnull)
    proc = _context().Process(target=_cli_main_in_child,
                              args=([str(a) for a in argv], str(cwd or os.getcwd()), dict(env or {}), log, log))
    proc.start()
    return ForkedCli(proc)


def wait_for(predicate, timeout: float, poll: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


# ----- full defense runs (faults, resume, reproducibility) ----------------------------------------------------
RUN_EPOCHS = 10


def defense_argv(fixture: TinyBB, record: Path, yaml_path: Path, *extra: str, epochs: int = RUN_EPOCHS) -> list[str]:
    """``run fst`` on the tiny record: 50 clean images (ratio 0.25) in batches of 16, on the CPU."""
    return ["run", "fst", "--record", str(record), "--yaml_path", str(yaml_path), "--dataset_path", str(fixture.data),
            "--epochs", str(epochs), "--ratio", "0.25", "--num_workers", "0", "--device", "cpu", "--random_seed", "7",
            *extra]


def full_run(fixture: TinyBB, name: str, root: Path, *extra: str) -> dict[str, Any]:
    """A fresh record copy under ``root`` tuned to the end; its summary (hash + metrics), run_info and output folder."""
    root = Path(root)
    record = copy_record(fixture, name, root=root)
    yaml_path = write_yaml(root / f"{name}.yaml")
    result = run_cli(defense_argv(fixture, record, yaml_path, *extra), cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    save_dir = record / "defense" / "fst"
    return {**result_summary(save_dir), "save_dir": save_dir, "record": record, "yaml": yaml_path,
            "run_info": json.loads((save_dir / "run_info.json").read_text()), "stderr": result.stderr}
