"""The compatibility matrix's pure parts: the class-balanced CIFAR-10 subset, one-line cell reasons read off a
failed command, the WaNet pool check, and the CSV / README writers of ``bench_scripts/compat/run.py``.

Nothing here runs BackdoorBench or the plugin, so tests/bench/test_compat.py checks all of it on fake trees.
"""
from __future__ import annotations

import csv
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

OK = "ok"
MODES = ("lp", "vanilla-ft", "fe-tuning", "ft-init", "fst")
EXPORTED = ("fst", "fe-tuning", "ft-init")   # fst-plugin export's default methods
PROBES = ("retune", "qra")
CELLS = ("attack_run", *MODES, "export", *PROBES)
POOL_FIELDS = ("pool_rule", "pool_size", "pool_flagged", "pool_excluded", "pool_check")
BB_OWN = "BackdoorBench's own"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass
class Cell:
    """One command's outcome: ``ok`` or a one-line reason, and the command that shows it."""

    status: str
    command: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class Row:
    """One attack script: its record folder name and a cell per column (absent = not run)."""

    attack: str
    record: str
    cells: dict[str, Cell] = field(default_factory=dict)
    pool: dict[str, str] = field(default_factory=dict)


def write_cifar10_subset(source: Path, dest: Path, train_per_class: int, test_per_class: int) -> tuple[int, int]:
    """Write ``dest/cifar-10-batches-py`` holding the first ``*_per_class`` images of each class of
    ``source/cifar-10-batches-py`` (``make_cifar10.py DEST --batches-py`` writes it).

    Torchvision's pickle layout (five train batches, ``test_batch``, ``batches.meta``), so BackdoorBench's
    CIFAR10 loader and the plugin's reader both take it as the whole dataset. Returns (train, test) sizes.
    """
    out = dest / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    source = source / "cifar-10-batches-py"
    train = [_read_batch(source / name) for name in TRAIN_BATCHES]
    train_data, train_labels = _balanced(np.concatenate([d for d, _ in train]),
                                         np.concatenate([y for _, y in train]), train_per_class)
    for name, data, labels in zip(TRAIN_BATCHES, np.array_split(train_data, len(TRAIN_BATCHES)),
                                  np.array_split(train_labels, len(TRAIN_BATCHES))):
        _write_batch(out / name, name, data, labels)
    test_data, test_labels = _balanced(*_read_batch(source / "test_batch"), test_per_class)
    _write_batch(out / "test_batch", "test_batch", test_data, test_labels)
    (out / "batches.meta").write_bytes((source / "batches.meta").read_bytes())
    return len(train_labels), len(test_labels)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    return np.asarray(entry["data"], dtype=np.uint8), np.asarray(entry["labels"], dtype=np.int64)


def _balanced(data: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of every class, in their original order."""
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))
    if any(np.sum(labels[keep] == c) < per_class for c in np.unique(labels)):
        raise ValueError(f"the source has fewer than {per_class} images of some class")
    return data[keep], labels[keep]


def _write_batch(path: Path, name: str, data: np.ndarray, labels: np.ndarray) -> None:
    entry = {"batch_label": name, "data": data, "labels": [int(y) for y in labels],
             "filenames": [f"{name}_{i}.png" for i in range(len(labels))]}
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)|AssertionError|NotImplementedError)\b.*")


def failure_reason(output: str, backdoorbench: Path, returncode: int) -> str:
    """One line naming why a command failed, prefixed ``BackdoorBench's own`` when BackdoorBench's code raised.

    The last refusal or exception in the output wins: our CLI's refusals are one ``error: ...`` line; a Python
    traceback gives its exception line, located at its innermost frame (``attack/lira.py:211``), which is
    BackdoorBench's when that frame lies in the checkout outside ``fst_plugin``.
    """
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    found = [(i, line) for i, line in enumerate(lines) if line.startswith("error:") or _EXCEPTION.match(line)]
    if not found:
        if returncode < 0 or returncode in (124, 137):
            return f"killed (exit {returncode}: time limit or memory)"
        return _one_line(f"exit {returncode}: {lines[-1] if lines else 'no output'}")
    at, message = found[-1]
    message = message.replace(str(backdoorbench.resolve()), "BB").replace(str(backdoorbench), "BB")  # no local path
    frames = _FRAME.findall("\n".join(lines[:at]))
    if message.startswith("error:") or not frames:
        return _one_line(message)
    root = backdoorbench.resolve()
    ours = {Path("defense") / f"{mode}.py" for mode in MODES}   # install's launchers and export's scripts
    for where, line_no in reversed(frames):        # innermost first; torch's and the stdlib's frames are skipped
        path = (root / where).resolve()             # an absolute `where` stays itself
        if "fst_plugin" in path.parts:
            return _one_line(f"{message} ({Path(*path.parts[path.parts.index('fst_plugin'):])}:{line_no})")
        if path.is_relative_to(root) and path.relative_to(root) in ours:
            return _one_line(f"{message} ({path.relative_to(root)}:{line_no})")
        if path.is_relative_to(root):
            return _one_line(f"{BB_OWN}: {message} ({path.relative_to(root)}:{line_no})")
    return _one_line(f"{message} ({Path(frames[-1][0]).name}:{frames[-1][1]})")


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_pool(picked: Sequence[int], labels: Mapping[int, tuple[int, int]], target: int, rule: str) -> str:
    """``ok (...)`` when every picked index carries the attack by ``rule``, else what is wrong.

    ``labels`` maps a ``bd_train`` index to (bd_label, original_label), as the record's ``data_dict`` says.
    dirty-label: relabelled to ``target`` from another class; clean-label: a flagged image of ``target``.
    """
    missing = [i for i in picked if i not in labels]
    if missing:
        return f"picked {len(missing)} index(es) not in bd_train: {missing[:5]}"
    if rule == "clean-label":
        wrong = [i for i in picked if labels[i] != (target, target)]
        if wrong:
            return f"{len(wrong)} of {len(picked)} picked are not flagged images of class {target}"
        return f"{OK} ({len(picked)}/{len(picked)} flagged images of class {target})"
    cross = [i for i in picked if labels[i][0] == labels[i][1]]
    off_target = [i for i in picked if labels[i][0] != target]
    if cross or off_target:
        return f"{len(cross)} of {len(picked)} picked keep their label, {len(off_target)} not relabelled to {target}"
    return f"{OK} ({len(picked)}/{len(picked)} have bd_label {target} != original label)"


def write_csv(rows: Iterable[Row], path: Path) -> None:
    """results.csv: one row per attack, a column per cell, then the pool columns and the commands that failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["attack", "record", *(f"{c}" for c in CELLS), *POOL_FIELDS, "failed_commands"])
        for row in rows:
            failed = " ; ".join(f"{name}: {cell.command}" for name, cell in row.cells.items()
                                if not cell.ok and cell.command)
            writer.writerow([row.attack, row.record, *(row.cells[c].status if c in row.cells else "" for c in CELLS),
                             *(row.pool.get(f, "") for f in POOL_FIELDS), failed])


def read_csv(path: Path) -> list[Row]:
    """The rows ``write_csv`` wrote (so the README can be re-rendered without re-running anything)."""
    rows = []
    with open(path, newline="") as fh:
        for entry in csv.DictReader(fh):
            commands = dict(part.split(": ", 1) for part in entry["failed_commands"].split(" ; ") if ": " in part)
            cells = {c: Cell(entry[c], commands.get(c, "")) for c in CELLS if entry[c]}
            rows.append(Row(entry["attack"], entry["record"], cells, {f: entry[f] for f in POOL_FIELDS if entry[f]}))
    return rows


def matrix_table(rows: Sequence[Row]) -> str:
    """The Markdown matrix: ``ok`` cells as ``ok``, failures as their one-line reason, unrun cells as ``—``."""
    lines = ["| attack | " + " | ".join(CELLS) + " |", "|" + "---|" * (len(CELLS) + 1)]
    for row in rows:
        cells = [row.cells[c].status if c in row.cells else "—" for c in CELLS]
        lines.append(f"| {row.attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pool_table(rows: Sequence[Row]) -> str:
    """The retuning attack's poisoned pool per record, from retune's ``run_info.json``."""
    lines = ["| attack | " + " | ".join(POOL_FIELDS) + " |", "|" + "---|" * (len(POOL_FIELDS) + 1)]
    lines += [f"| {row.attack} | " + " | ".join(row.pool.get(f, "—") for f in POOL_FIELDS) + " |"
              for row in rows if row.pool]
    return "\n".join(lines)


def failures(rows: Sequence[Row]) -> str:
    """Every failed cell with the command that shows it (paths as in the run); cells not run are left out."""
    lines = [f"- **{row.attack} / {name}**: {cell.status}  \n  `{cell.command}`"
             for row in rows for name, cell in row.cells.items()
             if not cell.ok and "not run" not in cell.status[:20]]
    return "\n".join(lines) if lines else "None."


HARNESS = """\
BackdoorBench at this commit does not run as it is on current PyTorch / NumPy / torchvision with the
re-encoded CIFAR-10, so its processes ran with a test harness: a folder on `PYTHONPATH` whose
`sitecustomize.py` (kept outside this repository; never part of the plugin) does four things:
1. sets `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` (torch >= 2.6 loads `weights_only`; BackdoorBench's records and
   checkpoints hold NumPy objects);
2. puts back NumPy 1 aliases removed in NumPy 2 (`np.infty`, `np.float`, `np.int`, `np.bool`, `np.object`, ...);
3. replaces `torchvision.datasets.cifar.check_integrity` by `lambda *a, **k: True` (the re-encoded CIFAR-10
   fails its md5 check and BackdoorBench passes `download=True`);
4. without CUDA, makes `Tensor.cuda()` and `Module.cuda()` return `self` (set `BB_HARNESS_CUDA_SHIM=0` to
   switch it off): `attack/lira.py` calls `.cuda()` unconditionally.
BackdoorBench's Python dependencies went into a separate virtual environment (torch 2.14.1, torchvision
0.29.1, pandas, matplotlib, pyyaml, tqdm, tabulate, scikit-learn, scikit-image, opencv-python-headless,
kornia, imageio, scipy, numba, pytorch_wavelets, PyWavelets, `setuptools<81` for pytorch_wavelets'
`pkg_resources`), with this repository installed into it (`pip install -e REPO --no-deps`)."""


def render_readme(rows: Sequence[Row], helpers: Mapping[str, Cell], meta: Mapping[str, str], notes: str) -> str:
    """README.md of ``bench_results/compat``: setup, matrix, pool, failures, commands, harness, notes."""
    attack_commands = "\n".join(row.cells["attack_run"].command for row in rows if "attack_run" in row.cells)
    helper_lines = "\n".join(f"- `{name}`: {cell.status} — `{cell.command}`" for name, cell in helpers.items())
    return f"""\
# Compatibility matrix: the plugin on records written by BackdoorBench's own attack scripts

BackdoorBench: SCLBD/BackdoorBench at `{meta['commit']}`, a checkout outside this repository (none of its code
is here). Made {meta['date']} by `bench_scripts/compat/run.py` on the CPU. Each attack script ran for **one epoch**
(preactresnet18, batch 128, seed 0) on a class-balanced CIFAR-10 subset, the first {meta['train_per_class']}
training and {meta['test_per_class']} test images of each class, written in torchvision's pickle layout to
`BB/data/compat/cifar10`; every defense ran 1 epoch on 10% of it (`--ratio 0.1`). The models are weak by
design: the matrix proves that each command reads what BackdoorBench wrote and writes its own result, not how
well any defense works.

## Matrix

`ok` = the command exited 0 and wrote its result (for `attack_run`: BackdoorBench's script wrote
`record/compat_<attack>/attack_result.pt`); otherwise the one-line reason, prefixed *BackdoorBench's own*
when BackdoorBench's code raised (file:line of its innermost frame). `—` = not run (no record). Columns:
`lp` … `fst` = the launcher `python defense/<mode>.py` written by `fst-plugin install`; `export` =
`fst-plugin export` (it writes self-contained {', '.join(EXPORTED)}) and the exported {meta['export_methods']}
run the same way; `retune` = `fst-plugin retune --defense fst`; `qra` =
`fst-plugin qra --defense fst` against the clean reference record.

{matrix_table(rows)}

results.csv holds the same cells, the pool columns and the command of every failed cell.

## The retuning attack's poisoned pool (from retune's `run_info.json`, `poison_pool`)

{pool_table(rows)}

`pool_check` looks the images retune used (`run_info.json`'s `poisoned_train_indices`) up in the record's own
`bd_train` `data_dict` (`other_info = [bd_label, original_label]`): `ok` means, for a dirty-label record,
that every one carries the attack's target label and a different original label (no cross / noise sample
reached the attack) and, for a clean-label record, that every one is a flagged image of the target class.

## Failures, each with the command that shows it (run from the BackdoorBench root)

{failures(rows)}

## Helper records

{helper_lines}

## Commands

```bash
python ../shared/datasets/cifar10/make_cifar10.py DATA --batches-py     # full CIFAR-10, torchvision layout
# BB = a BackdoorBench checkout; PY = its interpreter with this repository installed (see Harness)
PYTHONPATH=HARNESS:REPO PY -m bench_scripts.compat --backdoorbench BB --data DATA --out bench_results/compat \\
    --commit COMMIT --notes bench_results/compat/notes.md
```

From BB, the attacks (a record that already has `attack_result.pt` is reused; `--force` re-runs):

```bash
{attack_commands}
```

then `fst-plugin install --backdoorbench BB`, for each record and mode
`python defense/<mode>.py --result_file compat_<attack> --yaml_path ./config/defense/<mode>/cifar10.yaml
--dataset_path ./data/compat --epochs 1 --ratio 0.1 --device cpu --num_workers 0`,
`fst-plugin retune --record record/compat_<attack> --defense fst --dataset_path ./data/compat --device cpu
--epochs 1`, `fst-plugin qra --record record/compat_<attack> --defense fst --reference_record record/compat_clean
--dataset_path ./data/compat --device cpu --epochs 1 --clean_num 50 --poison_num 50`; then
`fst-plugin export --backdoorbench BB_compat_export` (a copy of BB's code beside it, `record/` and `data/`
linked, so the exported scripts never replace BB's launchers) and, from there, the exported
{meta['export_methods']} with the same defense command. Every command's output: `BB/compat_logs/<attack>__<cell>.log`.

## Harness

{HARNESS}

## Notes

{notes.strip() or 'None.'}
"""
