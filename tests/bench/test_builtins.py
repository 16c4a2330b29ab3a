"""BackdoorBench's built-ins on our records (issue 21), against a fake BackdoorBench-shaped tree written here:
its ``generate_cls_model`` knows no model at all, so a defense script that builds ``resnet9_cpu`` works only
through the runner's import hook. The time cap, the failure reasons, the rows evaluate.py makes of them and
make_table's side-by-side section are checked on the same tree."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench_scripts.defenses import builtins
from bench_scripts.evaluation import evaluate
from bench_scripts.evaluation.per_model import Probing
from bench_scripts.protocols import BUILTIN, get_protocol
from bench_scripts.report.side_by_side import FIGURE, leaders, side_by_side_figure, side_by_side_section
from bench_scripts.jobs.graph import Graph, run_graph
from bench_scripts.jobs.local import LocalExecutor
from bench_scripts.defenses.run import builtin_jobs
from fst_plugin.attacks import Attack, Split, TrainConfig, backdoor_and_record, badnets_trigger
from fst_plugin.demo import synthetic_images, write_image_folders

RECORD = "tiny_r9"

FACTORY = '''
def generate_cls_model(model_name, num_classes=10, image_size=32, **kwargs):
    raise SystemError("NO valid model match in function generate_cls_model!")
'''
# a defense script shaped like BackdoorBench's: binds generate_cls_model at import, writes defense_result.pt
DEFENSE = '''
import argparse, os, sys
sys.path.append(os.getcwd())
import torch
from utils.aggregate_block.model_trainer_generate import generate_cls_model
parser = argparse.ArgumentParser()
for flag in ("--result_file", "--model", "--yaml_path", "--dataset", "--device", "--num_workers", "--ratio",
             "--epochs"):
    parser.add_argument(flag)
args, _ = parser.parse_known_args()
record = os.path.join("record", args.result_file)
res = torch.load(os.path.join(record, "attack_result.pt"), weights_only=False)
model = generate_cls_model(args.model, res["num_classes"])
model.load_state_dict(res["model"])
out = os.path.join(record, "defense", os.path.splitext(os.path.basename(sys.argv[0]))[0])
os.makedirs(out, exist_ok=True)
torch.save({"model_name": args.model, "num_classes": res["num_classes"], "model": model.state_dict()},
           os.path.join(out, "defense_result.pt"))
with open(os.path.join(out, "seen.json"), "w") as fh:
    fh.write(__import__("json").dumps({"argv": sys.argv[1:], "built_by": type(model).__module__,
                                        "harness": os.environ.get("HARNESS_RAN")}))
'''
# sleeps with a child process: the cap must kill the whole group
SLEEPER = '''
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(os.path.join(os.getcwd(), "sleeper_child.pid"), "w").write(str(child.pid))
time.sleep(600)
'''
BROKEN = '''
def unlearn():
    raise RuntimeError("the fixed point did not converge")
unlearn()
'''
HARNESS = '''
import os
os.environ["HARNESS_RAN"] = "yes"
'''


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A fake checkout (bb/), a harness folder with its own sitecustomize, and an untrained resnet9_cpu record."""
    root = tmp_path_factory.mktemp("builtins")
    bb = root / "bb"
    for package in ("utils", "utils/aggregate_block"):
        (bb / package).mkdir(parents=True)
        (bb / package / "__init__.py").write_text("")
    (bb / "utils/aggregate_block/model_trainer_generate.py").write_text(FACTORY)
    (bb / "defense").mkdir()
    for name, script in (("ft", DEFENSE), ("ft-sam", SLEEPER), ("sau", BROKEN)):
        (bb / "defense" / f"{name}.py").write_text(script)
        (bb / "config" / "defense" / name).mkdir(parents=True)
        (bb / "config" / "defense" / name / "cifar10.yaml").write_text("epochs: 100\nratio: 0.05\nn_rounds: 5\n")
    (root / "harness").mkdir()
    (root / "harness" / "sitecustomize.py").write_text(HARNESS)
    rng = np.random.default_rng(0)
    data = root / "data" / "cifar10"
    x_train, y_train = write_image_folders(data, "train", *synthetic_images(10, rng))
    x_test, y_test = write_image_folders(data, "test", *synthetic_images(2, rng))
    poisoned = np.flatnonzero(y_train != 0)[:5]
    backdoor_and_record(root / "cache" / "record" / RECORD, model_name="resnet9_cpu", dataset="cifar10",
                        train=Split(x_train, y_train), test=Split(x_test, y_test),
                        attack=Attack(badnets_trigger(), poisoned, 0),
                        train_config=TrainConfig(epochs=0, device="cpu", seed=0), keep_bd_train=True)
    return root


@pytest.fixture(scope="module")
def ran(tree):
    """ft (through the hook), sau (raises), nad (tied to other models), i-bau (needs CUDA), clp (not in this
    checkout), ft-sam (asleep past a 3-second cap)."""
    with pytest.MonkeyPatch.context() as patch:   # the harness's sitecustomize first, as a test harness puts it
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(tree / "harness"), os.environ.get("PYTHONPATH")))))
        for defenses, cap in ((["ft", "sau", "nad", "i-bau", "clp"], 600), (["ft-sam"], 3)):
            protocol = dataclasses.replace(get_protocol("cpu"), bb_cap_s=cap)
            jobs = builtin_jobs([tree / "cache" / "record" / RECORD], defenses, tree / "bb", protocol,
                                tree / "data" / "cifar10", tree / "results", python=sys.executable)
            report = run_graph(Graph(jobs), LocalExecutor())
            assert not report.failures   # a built-in's failure is its outcome, not the runner's
            assert report.outcomes[0].note == ("" if defenses[0] == "ft" else f"exceeded the cap: exceeded the {cap}-s cap")
    return tree / "cache" / "record" / RECORD / "defense"


def _outcome(ran: Path, name: str) -> builtins.BuiltinRun:
    outcome = builtins.BuiltinRun.read(ran / name)
    assert outcome is not None, f"no {builtins.RUN_FILE} for {name}"
    return outcome


def test_the_hook_lets_backdoorbench_build_resnet9_cpu_with_our_ratio_and_epoch_cap(ran, tree):
    assert _outcome(ran, "ft").status == builtins.OK
    seen = json.loads((ran / "ft" / "seen.json").read_text())
    assert seen["built_by"] == "fst_plugin.models.resnet9"      # its own factory raises for every name
    assert seen["harness"] == "yes"                               # the other sitecustomize still ran
    argv = seen["argv"]
    assert argv[argv.index("--model") + 1] == "resnet9_cpu"
    assert argv[argv.index("--ratio") + 1] == "0.02"
    assert argv[argv.index("--epochs") + 1] == "10"               # the yaml's 100, capped at the cpu protocol's 10
    assert "--n_rounds" not in argv                               # ft has no such length; never added
    assert (tree / "bb" / "record" / RECORD).resolve() == (tree / "cache" / "record" / RECORD).resolve()


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_the_cap_kills_the_whole_process_group_and_says_so(ran, tree):
    outcome = _outcome(ran, "ft-sam")
    assert outcome.status == builtins.EXCEEDED and outcome.reason == "exceeded the 3-s cap"
    assert not (ran / "ft-sam" / "defense_result.pt").exists()
    child = int((tree / "bb" / "sleeper_child.pid").read_text())
    for _ in range(50):   # the group gets SIGTERM, then SIGKILL; on a loaded machine the child takes a moment to go
        if _dead(child):
            break
        time.sleep(0.1)
    assert _dead(child)


def test_a_failing_defense_gets_its_one_line_reason_and_a_model_or_cuda_bound_one_is_not_started(ran):
    failed = _outcome(ran, "sau")
    assert failed.status == builtins.FAILED
    assert "RuntimeError: the fixed point did not converge" in failed.reason and "defense/sau.py:3" in failed.reason
    bound = _outcome(ran, "nad")
    assert bound.status == builtins.CANNOT and bound.reason == f"resnet9_cpu: {BUILTIN['nad'].bound_by}"
    cuda = _outcome(ran, "i-bau")
    assert cuda.status == builtins.CANNOT and cuda.reason == f"on cpu: {BUILTIN['i-bau'].cuda_only}"
    absent = _outcome(ran, "clp")
    assert absent.status == builtins.FAILED and absent.reason == "this checkout has no defense/clp.py or " \
        "config/defense/clp/cifar10.yaml"
    for name in ("nad", "i-bau", "clp"):
        assert not (ran / name / builtins.LOG_FILE).exists()


def test_evaluate_measures_and_retunes_the_builtins_output_and_keeps_a_row_with_the_reason_of_each_other(ran, tree):
    retune = evaluate.Retune(True, Probing(tree / "data", "cpu", 0.5, tree / "results"), None,
                             variants={"ft", "ft-sam", "sau", "nad", "i-bau"})
    rows = pd.DataFrame(evaluate.evaluate_record(tree / "cache" / "record" / RECORD, tree / "data" / "cifar10",
                                                 "cpu", retune))
    by = rows.set_index("variant")
    assert (ran / "ft" / "retune" / "retune_result.pt").is_file() and not np.isnan(by.loc["ft", "retune_asr"])
    assert by.loc["ft", "source"] == "backdoorbench" and by.loc["ft", "bb_status"] == builtins.OK
    assert by.loc["ft", "test_asr"] == pytest.approx(by.loc["none", "test_asr"])  # the fake returns the model
    assert by.loc["ft", "defense_wall_s"] == _outcome(ran, "ft").wall_s
    for name, status in (("ft-sam", builtins.EXCEEDED), ("sau", builtins.FAILED), ("nad", builtins.CANNOT),
                         ("i-bau", builtins.CANNOT)):
        assert by.loc[name, "bb_status"] == status and by.loc[name, "bb_reason"] == _outcome(ran, name).reason
        assert np.isnan(by.loc[name, "test_asr"])


def test_fp_like_pruned_results_are_read_as_the_pruned_weights(ran, tree):
    """BackdoorBench's fp saves the model while torch.nn.utils.prune's mask is on its last linear layer."""
    from torch.nn.utils import prune

    from fst_plugin.models import build_model
    from fst_plugin.record.result_model import load_result_model

    model = build_model("resnet9_cpu", 10)
    prune.custom_from_mask(model.linear, name="weight", mask=(torch.arange(256) % 2 == 0).float().expand(10, 256))
    path = tree / "pruned.pt"
    torch.save({"model_name": "resnet9_cpu", "num_classes": 10, "model": model.state_dict()}, path)
    loaded = load_result_model(path, "defense result").model
    assert torch.equal(loaded.linear.weight, model.linear.weight)
    assert (loaded.linear.weight[:, 1::2] == 0).all() and (loaded.linear.weight[:, ::2] != 0).any()


def _results() -> pd.DataFrame:
    base = {"attack": "badnets", "trigger_key": None, "seed": 0}
    rows = []
    for record, rate in (("badnets_0.01_s0", 0.01), ("badnets_0.005_s0", 0.005), ("badnets_0.05_s0", 0.05)):
        rows += [{**base, "record": record, "rate": rate, "variant": "none", "test_acc": 0.86, "test_asr": 0.9,
                  "retune_asr": 0.95, "defense_wall_s": 0.0},
                 {**base, "record": record, "rate": rate, "variant": "fst", "test_acc": 0.72, "test_asr": 0.01,
                  "retune_asr": 0.02, "defense_wall_s": 40.0},
                 {**base, "record": record, "rate": rate, "variant": "ft", "test_acc": 0.84, "test_asr": 0.5 + rate,
                  "retune_asr": 0.9, "defense_wall_s": 300.0, "bb_status": "ok", "bb_reason": ""},
                 {**base, "record": record, "rate": rate, "variant": "nad", "test_acc": np.nan, "test_asr": np.nan,
                  "bb_status": "cannot run", "bb_reason": "resnet9_cpu: defense/nad.py ..."},
                 {**base, "record": record, "rate": rate, "variant": "fp", "test_acc": np.nan, "test_asr": np.nan,
                  "bb_status": builtins.EXCEEDED, "bb_reason": "exceeded the 45-min cap"}]
    return pd.DataFrame(rows)


def test_the_side_by_side_section_has_each_defense_its_reason_and_the_low_rate_means(tmp_path):
    text = side_by_side_section(_results())
    lines: dict[str, str] = {}   # the summary table's row of each defense (the per-record table comes after it)
    for line in text.splitlines():
        if line.startswith("| "):
            lines.setdefault(line.split(" | ")[0].lstrip("| "), line)
    per_record = text.split("Per record")[1]
    assert "| BB ft | 84.00 / 50.50 → 90.00 | 84.00 / 51.00 → 90.00 |" in per_record  # 0.5%, then 1%
    # ft's ASR over the two low-rate records only (the 5% record is left out): (0.51 + 0.505) / 2
    assert lines["BB ft"].split(" | ")[2:7] == ["2/2", "84.00", "50.75", "90.00", "300"]
    assert "cannot run: resnet9_cpu: defense/nad.py ..." in lines["BB nad"]
    assert lines["BB fp"].endswith("| – | exceeded the 45-min cap |")
    assert lines["FST"].split(" | ")[2:7] == ["2/2", "72.00", "1.00", "2.00", "40"]
    assert "not run" in lines["BB sau"]
    # fp exceeded its cap on one record and was never started on the other: the row says both
    partial = _results().drop(index=_results().query("variant == 'fp' and record == 'badnets_0.005_s0'").index)
    fp = [line for line in side_by_side_section(partial).splitlines() if line.startswith("| BB fp |")][0]
    assert fp.endswith("| exceeded the 45-min cap; not attempted on 1 record |")
    assert "badnets 5%" not in text and "badnets 0.5%" in text
    # the leaders, over both low-rate records: FST has the lowest ASR before and after retuning, at 14 points
    assert "| every low-rate record (2) | FST: ASR 1.00, C-Acc 72.00 (-14.00) | FST: ASR 2.00, C-Acc 72.00 (-14.00) |" in text
    board = {row["group"]: row for row in leaders(_results())}
    assert set(board) == {"every low-rate record", "badnets"} and board["badnets"]["records"] == 2
    better_ft = _results()
    better_ft.loc[better_ft["variant"] == "ft", "test_asr"] = 0.001   # a built-in that beats FST is named
    assert leaders(better_ft)[0]["test_asr"][:2] == ("ft", 0.001)
    assert leaders(better_ft)[0]["retune_asr"][0] == "fst"
    assert side_by_side_figure(_results(), tmp_path) == FIGURE and (tmp_path / FIGURE).is_file()
