"""The campaign's smoke check, in one interpreter (one CUDA start-up): every registered tuning mode for one epoch on
the tensor and on the per-image path with AMP, then ``retune`` and ``qra`` for one epoch each, all through
``fst-plugin``'s own CLI entry (``fst_plugin.cli.main``). ``--compile-check`` also trains the record's model for
one attack epoch with torch.compile and writes whether that worked to ``<record>/../../compile_check.json``,
so the records stage only compiles where it works.

``--distributed`` (under ``torchrun``) instead opens the process group itself (nccl on CUDA, gloo on the CPU),
checks an all-reduce, and runs FST for one epoch inside the group: with one process the plugin would not open a
group at all, so this is what proves nccl on a one-GPU machine.

    python -m bench_scripts.campaign.smoke --record R --reference C --dataset_path D --device cuda [--compile-check]
    torchrun --standalone --nproc_per_node 1 -m bench_scripts.campaign.smoke --record R --reference C \
        --dataset_path D --device cuda --distributed

Exits 1 at the first failure, naming it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from bench_scripts.protocols import METHODS
from fst_plugin import cli

log = logging.getLogger("bench.campaign.smoke")


def _run(argv: list[str]) -> float:
    started = time.time()
    code = cli.main(argv)
    if code:
        raise SystemExit(f"smoke failed (exit {code}): fst-plugin {' '.join(argv)}")
    seconds = time.time() - started
    print(f"smoke ok ({seconds:.1f} s): fst-plugin {' '.join(argv)}", flush=True)
    return seconds


def distributed_check(common: list[str], device: str) -> None:
    """Inside a process group of torchrun's world: an all-reduce, then FST for one epoch."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        total = torch.ones(1, device=f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
        dist.all_reduce(total)
        if int(total.item()) != dist.get_world_size():
            raise SystemExit(f"smoke failed: {backend} all-reduce gave {total.item()}, not {dist.get_world_size()}")
        print(f"smoke ok: {backend} process group of {dist.get_world_size()}, all-reduce checked", flush=True)
        _run(["run", "fst", *common, "--epochs", "1", "--save_name", "smoke_torchrun", "--num_workers", "0"])
    finally:
        dist.destroy_process_group()


def compile_check(record: Path, dataset_path: Path, device: str) -> dict:
    """One attack epoch of the record's model with torch.compile (CUDA graphs on CUDA): did it work, how long."""
    import numpy as np

    from fst_plugin.attacks import TrainConfig, train_classifier
    from fst_plugin.data import load_clean_split
    from fst_plugin.models import build_model
    from fst_plugin.record import load_attack_record

    split = load_clean_split("cifar10", dataset_path / "cifar10", train=True)
    images = np.stack([np.asarray(split[i][0].convert("RGB")) for i in range(min(len(split), 512))])
    labels = np.asarray(split.targets[:len(images)], dtype=np.int64)
    started = time.time()
    try:
        model = build_model(load_attack_record(record, check_files=False).model_name, 10)
        train_classifier(model, images, labels, "cifar10", TrainConfig(epochs=1, batch_size=128, device=device,
                                                                       amp=True, compile=True))
        return {"ok": True, "seconds": round(time.time() - started, 1)}
    except Exception as exc:  # noqa: BLE001 - any failure only turns compile off for the records
        log.exception("torch.compile failed; the records train without it")
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="a clean (rate 0) record, for qra")
    parser.add_argument("--dataset_path", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-check", action="store_true")
    parser.add_argument("--distributed", action="store_true", help="under torchrun: the process-group check only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    workers = "4" if args.device.startswith("cuda") else "0"
    common = ["--record", str(args.record), "--dataset_path", str(args.dataset_path), "--device", args.device]
    if args.distributed:
        distributed_check(common, args.device)
        return 0
    for method in METHODS:
        for pipeline in ("tensor", "backdoorbench"):
            _run(["run", method, *common, "--epochs", "1", "--amp", "True", "--input_pipeline", pipeline,
                  "--num_workers", workers, "--save_name", f"smoke_{method}_{pipeline}"])
    _run(["retune", *common, "--defense", "smoke_fst_tensor", "--epochs", "1", "--poison_num", "2"])
    _run(["qra", *common, "--defense", "smoke_fst_tensor", "--reference_record", str(args.reference), "--epochs", "1",
          "--clean_num", "4", "--poison_num", "2"])
    if args.compile_check:
        result = compile_check(args.record, args.dataset_path, args.device)
        (args.record.parent.parent / "compile_check.json").write_text(json.dumps(result))
        print(f"compile check: {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
