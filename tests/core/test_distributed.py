"""Scale-out on torchrun (fst_plugin.distributed), on the CPU with the gloo backend and 2 processes.

* The core: ``tune`` in 2 processes (DDP, each rank a slice of every global batch) ends with the weights of one
  process on the same global batches, the head and W₀ equal on both ranks, and the sharded evaluation gives the
  one-process numbers. The model here has no BatchNorm, so the only difference is float summation order.
* GoogLeNet, whose aux heads never get a gradient, tunes under DDP (a tiny input, 2 steps).
* The command: ``torchrun --nproc_per_node 2 -m fst_plugin run fst`` on the tiny record writes exactly the files
  of a one-process run, once, from rank 0; the evaluation before tuning is the one-process one, and the log
  names the world size.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fst_plugin.core import evaluate_backdoor, find_head, get_mode, tune
from fst_plugin.core.tuning import TuningConfig
from fst_plugin.distributed import (
    EvalShard,
    RankSlices,
    World,
    check_batch_size,
    has_idle_parameters,
    world_from_env,
    wrap_model,
)
from fst_plugin.errors import ConfigError
from tests.builders import TinyBB, assert_outputs_complete, child_env, copy_record, write_yaml

WORLD = 2
GLOBAL_BATCH = 16
N_TRAIN = 51        # 16 + 16 + 16 + 3: the last global batch splits unevenly (2 + 1)
N_TEST = 37         # eval batches 16 + 16 + 5: the per-batch loss mean needs the one-process partition
WEIGHT_TOL = 1e-5   # float32 sums in another order (DDP's all-reduce), over 3 epochs x 4 steps
METRIC_TOL = 1e-6


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _data() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(N_TRAIN, 3, 2, 2, generator=gen), torch.randint(0, 4, (N_TRAIN,), generator=gen)
    xt, yt = torch.randn(N_TEST, 3, 2, 2, generator=gen), torch.randint(0, 4, (N_TEST,), generator=gen)
    return x, y, xt, yt


class FixedBatches:
    """Global batches in a fixed order (what TensorBatches yields identically on every rank)."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int) -> None:
        self.tensors, self.batch_size = tensors, batch_size
        self.data = tensors[0]  # EvalShard reads the set's length from .data, as on TensorBatches

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.tensors[0]), self.batch_size):
            yield tuple(t[start:start + self.batch_size] for t in self.tensors)


def _run(world: World) -> dict:
    """Tune in ``world`` (a process group is open when world.size > 1); return what the test compares."""
    x, y, xt, yt = _data()
    model = _model()
    head = find_head(model, 4)
    train = FixedBatches(x, y, batch_size=GLOBAL_BATCH)
    clean = FixedBatches(xt, yt, batch_size=GLOBAL_BATCH)
    poisoned = FixedBatches(xt, torch.zeros_like(yt), torch.arange(N_TEST), torch.ones_like(yt), yt,
                            batch_size=GLOBAL_BATCH)
    if world.enabled:
        train, clean, poisoned = RankSlices(train, world), EvalShard(clean, world), EvalShard(poisoned, world)
    config = TuningConfig(epochs=3, lr=0.05, alpha=0.2, seed=11, show_progress=False)
    w0 = head.modules[0].weight.detach().clone()
    history = tune(model, head, get_mode("fst"), train, config,
                   evaluate=lambda m: evaluate_backdoor(m, clean, poisoned).as_dict())
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "history": history,
            "w0": w0, "head": head.modules[0].weight.detach().clone()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = _run(World(rank, WORLD, rank))
        heads = [torch.empty_like(result["head"]) for _ in range(WORLD)]
        w0s = [torch.empty_like(result["w0"]) for _ in range(WORLD)]
        dist.all_gather(heads, result["head"])
        dist.all_gather(w0s, result["w0"])
        result["heads_of_all_ranks"], result["w0_of_all_ranks"] = heads, w0s
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    torch.set_num_threads(1)
    single = _run(World())
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return single, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_two_processes_end_with_the_weights_of_one_process_on_the_same_global_batches(one_and_two_processes) -> None:
    single, ranks = one_and_two_processes
    for key, value in single["state"].items():
        for rank in ranks:
            assert torch.allclose(rank["state"][key], value, atol=WEIGHT_TOL, rtol=0), key
    moved = max((single["state"][k] - _model().state_dict()[k]).abs().max().item() for k in single["state"])
    assert moved > 100 * WEIGHT_TOL  # the comparison is not vacuous: tuning changed the weights


def test_the_head_and_w0_are_identical_on_every_rank(one_and_two_processes) -> None:
    _, ranks = one_and_two_processes
    for rank in ranks:
        assert all(torch.equal(h, rank["heads_of_all_ranks"][0]) for h in rank["heads_of_all_ranks"])
        assert all(torch.equal(w, rank["w0_of_all_ranks"][0]) for w in rank["w0_of_all_ranks"])
    norm0 = ranks[0]["w0"].norm()
    assert torch.isclose(ranks[0]["head"].norm(), norm0, rtol=1e-5)  # the projection held on the shared head


def test_sharded_evaluation_and_training_rows_match_one_process(one_and_two_processes) -> None:
    single, ranks = one_and_two_processes
    for rank in ranks:
        assert len(rank["history"]) == len(single["history"])
        for row_1, row_2 in zip(single["history"], rank["history"]):
            assert row_2["batch"] == row_1["batch"]
            for key in ("test_acc", "test_asr", "test_ra", "train_acc"):
                assert row_2[key] == pytest.approx(row_1[key], abs=METRIC_TOL), key
            for key in ("clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch",
                        "train_epoch_loss_avg_over_batch"):
                assert row_2[key] == pytest.approx(row_1[key], rel=1e-5), key


def test_the_global_batch_must_divide_among_the_processes() -> None:
    assert check_batch_size(128, World(0, 2, 0)) == 64
    with pytest.raises(ConfigError, match="multiple of 3"):
        check_batch_size(128, World(0, 3, 0))


def test_the_world_comes_from_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == World(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError):
        world_from_env()


# ----- GoogLeNet: parameters that never get a gradient ------------------------------------------------------------
GOOGLENET_SIZE = 15  # the smallest input GoogLeNet accepts (14x14 pools to nothing before its last inception)
GOOGLENET_IMAGES = 8  # two global batches of 4: DDP reports unused parameters at the step after the first


def _googlenet_run(world: World) -> dict:
    """GoogLeNet (BackdoorBench's form: aux heads kept, their output dropped) tuned in ``vanilla-ft`` mode, every
    parameter trainable, with weight decay: what DDP refused before."""
    from fst_plugin.models import build_model

    torch.manual_seed(3)
    model = build_model("googlenet", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(GOOGLENET_IMAGES, 3, GOOGLENET_SIZE, GOOGLENET_SIZE, generator=gen)
    y = torch.randint(0, 4, (GOOGLENET_IMAGES,), generator=gen)
    train = RankSlices(FixedBatches(x, y, batch_size=4), world)
    config = TuningConfig(epochs=1, lr=0.01, weight_decay=5e-4, seed=11, show_progress=False)
    tune(model, find_head(model, 4), get_mode("vanilla-ft"), train, config)
    return {"before": before, "after": {k: v.clone() for k, v in model.state_dict().items()},
            "wraps": {"googlenet": wrap_model(build_model("googlenet", 4), torch.device("cpu")).find_unused_parameters,
                      "resnet9": wrap_model(build_model("resnet9", 4), torch.device("cpu")).find_unused_parameters}}


def _googlenet_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_googlenet_run(World(rank, WORLD, rank)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_googlenet_tunes_under_ddp_and_its_aux_heads_stay_as_they_came(tmp_path: Path) -> None:
    """Before, DDP stopped at the second step: GoogLeNet's aux heads run in training mode but their output is dropped,
    so their parameters never get a gradient. With unused parameters handled, both ranks end with the same weights,
    the main network moved, and the aux heads are untouched (no gradient, so weight decay skips them too, as in one
    process); only a model with such parameters pays for DDP's search for them."""
    mp.spawn(_googlenet_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    before, after = ranks[0]["before"], ranks[0]["after"]
    params = [k for k in after if after[k].is_floating_point() and "running_" not in k]
    aux = [k for k in params if k.startswith(("aux1.", "aux2."))]
    assert aux and all(torch.equal(after[k], before[k]) for k in aux)
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["conv1.conv.weight"], before["conv1.conv.weight"])
    for key in params:  # DDP kept the ranks in step (BatchNorm's running statistics stay per rank)
        assert torch.allclose(ranks[1]["after"][key], after[key], atol=1e-6, rtol=0), key
    assert all(rank["wraps"] == {"googlenet": True, "resnet9": False} for rank in ranks)


def test_only_trainable_parameters_without_a_gradient_ask_for_ddps_search() -> None:
    from fst_plugin.models import build_model

    googlenet, inception = build_model("googlenet", 4), build_model("inception_v3", 4)
    assert has_idle_parameters(googlenet) and has_idle_parameters(inception)
    assert not has_idle_parameters(build_model("resnet9", 4)) and not has_idle_parameters(_model())
    for module in (googlenet.aux1, googlenet.aux2):
        module.requires_grad_(False)  # e.g. lp / fst freeze the backbone: DDP does not track them at all
    assert not has_idle_parameters(googlenet)


# ----- the command: torchrun --nproc_per_node 2 -m fst_plugin run ... ------------------------------------------
RECORDS_WRITES = '''
import os
_replace = os.replace
_checkpoints = 0
def _logged_replace(src, dst, *args, **kwargs):
    global _checkpoints
    _replace(src, dst, *args, **kwargs)
    with open(os.environ["FST_WRITE_LOG"], "a") as fh:
        fh.write(f"{os.environ.get('RANK', '-')} {dst}\\n")
    if str(dst).endswith("last.pt"):
        _checkpoints += 1
        if _checkpoints == int(os.environ.get("FST_EXIT_AFTER_CHECKPOINTS", "0")):
            os._exit(9)  # the writer dies right after this epoch's checkpoint is in place
os.replace = _logged_replace
'''


def _run_command(fixture: TinyBB, tmp: Path, name: str, method: str, pipeline: str, processes: int, *extra: str,
         exit_after_checkpoints: int = 0) -> subprocess.CompletedProcess:
    """``fst-plugin run`` in a fresh interpreter (1 process) or under torchrun, on the record ``tmp/name``
    (copied from the fixture on first use); every atomic write (the final ``os.replace``) is recorded with the
    writer's RANK by a sitecustomize on the PYTHONPATH, which can also kill the writer after its n-th checkpoint."""
    hooks = tmp / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(RECORDS_WRITES)
    record = tmp / "record" / name
    if not record.exists():
        record = copy_record(fixture, name, root=tmp)
    argv = ["run", method, "--record", str(record), "--yaml_path", str(write_yaml(tmp / f"{name}.yaml")),
            "--dataset_path", str(fixture.data), "--epochs", "3", "--ratio", "0.25", "--device", "cpu",
            "--random_seed", "7", "--input_pipeline", pipeline, *extra]
    launcher = ([sys.executable, "-m", "fst_plugin"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "fst_plugin"])
    env = child_env({"FST_WRITE_LOG": str(tmp / f"{name}.writes"),
                     "FST_EXIT_AFTER_CHECKPOINTS": str(exit_after_checkpoints)})
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), env["PYTHONPATH"]])
    return subprocess.run(launcher + argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def _launch(fixture: TinyBB, tmp: Path, name: str, method: str, pipeline: str, processes: int, *extra: str) -> dict:
    """:func:`_run_command`, which must succeed, and what it wrote."""
    proc = _run_command(fixture, tmp, name, method, pipeline, processes, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = tmp / "record" / name
    out = record / "defense" / method
    writes = [line.split(" ", 1) for line in (tmp / f"{name}.writes").read_text().splitlines()]
    return {"out": out, "stderr": proc.stderr, "writes": writes,
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
            "csv": __import__("pandas").read_csv(out / f"{method}_df.csv"),
            "run_info": json.loads((out / "run_info.json").read_text()),
            "model": torch.load(out / "defense_result.pt")["model"],
            "log": "".join(p.read_text() for p in (out / "log").glob("*.log"))}


@pytest.mark.parametrize("method, pipeline", [("lp", "tensor"), ("fst", "backdoorbench")])
def test_torchrun_with_two_processes_writes_one_process_files_once_from_rank_zero(
        tmp_path: Path, method: str, pipeline: str, bb: TinyBB) -> None:
    one = _launch(bb, tmp_path, "one", method, pipeline, 1)
    two = _launch(bb, tmp_path, "two", method, pipeline, 2)
    # the same files, each written (renamed into place) as often as by one process, and only by rank 0
    assert [f for f in two["files"] if not f.endswith(".log")] == [f for f in one["files"] if not f.endswith(".log")]
    assert sum(f.endswith(".log") for f in two["files"]) == 1
    assert {rank for rank, _ in two["writes"]} == {"0"}
    relative = lambda run: sorted(str(Path(p).relative_to(run["out"])) for _, p in run["writes"])  # noqa: E731
    assert "defense_result.pt" in relative(one) and relative(two) == relative(one)
    assert_outputs_complete(two["out"])
    assert (two["out"] / "log" / "index.txt").read_text() == (one["out"] / "log" / "index.txt").read_text()
    # the log is rank 0's alone and names the world size
    assert two["log"].count("world size 2 (torchrun): global batch 16, 8 per process") == 1
    assert two["log"].count(f"before {method}:") == 1
    assert two["run_info"]["world_size"] == 2 and one["run_info"]["world_size"] == 1
    # the evaluation before tuning is sharded and summed: one process's numbers
    for key, value in one["run_info"]["before"].items():
        assert two["run_info"]["before"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    if method == "lp":  # frozen BatchNorm, same global batches (tensor path): the same run up to float rounding
        for key, value in one["model"].items():
            assert torch.allclose(two["model"][key].float(), value.float(), atol=1e-5, rtol=0), key
        for column in ("train_acc", "test_acc", "test_asr", "test_ra"):
            assert two["csv"][column].tolist() == pytest.approx(one["csv"][column].tolist(), abs=1e-9), column
        for column in ("train_epoch_loss_avg_over_batch", "clean_test_loss_avg_over_batch",
                       "bd_test_loss_avg_over_batch"):
            assert two["csv"][column].tolist() == pytest.approx(one["csv"][column].tolist(), rel=1e-5), column
    else:  # per-rank BatchNorm and the DistributedSampler's order: another valid run, not the same one
        assert two["csv"]["test_acc"].notna().all() and len(two["csv"]) == 3


def test_a_bad_value_under_torchrun_stops_every_rank_before_anything_is_written(tmp_path: Path, bb: TinyBB) -> None:
    record = copy_record(bb, "bad", root=tmp_path)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fst_plugin",
            "run", "fst", "--record", str(record), "--yaml_path", str(write_yaml(tmp_path / "bad.yaml")),
            "--dataset_path", str(bb.data), "--batch_size", "15"]
    proc = subprocess.run(argv, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: batch_size 15 is the global batch")]
    assert len(errors) == 2  # each rank refused it on its own, before the process group existed
    assert not (record / "defense").exists()


def test_torchrun_killed_after_an_epoch_resumes_to_the_uninterrupted_result(tmp_path: Path, bb: TinyBB) -> None:
    """``--resume`` under torchrun: rank 0 dies right after the second epoch's checkpoint (torchrun then stops
    rank 1); the same command with ``--resume`` continues from that checkpoint on both ranks and ends where an
    uninterrupted two-process run ends. LP on the tensor path (frozen BatchNorm, same global batches) is the
    mode whose two-process run is reproducible up to float rounding, so the comparison can be that tight."""
    whole = _launch(bb, tmp_path, "whole", "lp", "tensor", 2)
    killed = _run_command(bb, tmp_path, "cut", "lp", "tensor", 2, "--resume", exit_after_checkpoints=2)
    out = tmp_path / "record" / "cut" / "defense" / "lp"
    assert killed.returncode != 0
    assert (out / "checkpoint" / "last.pt").is_file() and not (out / "defense_result.pt").exists()
    resumed = _launch(bb, tmp_path, "cut", "lp", "tensor", 2, "--resume")
    assert resumed["log"].count("resuming lp from epoch 2 of 3") == 1
    assert len(resumed["csv"]) == 3 and not (out / "checkpoint" / "last.pt").exists()
    for key, value in whole["model"].items():
        assert torch.allclose(resumed["model"][key].float(), value.float(), atol=1e-5, rtol=0), key
    for column in ("train_acc", "test_acc", "test_asr", "test_ra"):
        assert resumed["csv"][column].tolist() == pytest.approx(whole["csv"][column].tolist(), abs=1e-9), column
