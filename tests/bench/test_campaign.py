"""The campaign (bench_scripts.campaign, issue 20): the plan lists every stage with an estimate and the measured
figure it rests on; the budget decides which stages start; and the tiny campaign runs end to end on the CPU,
is killed while its records train, resumes from their checkpoints and leaves the layout make_table reads and
at most 8 files of at most 16 MB in --out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench_scripts.campaign import __main__ as campaign
from bench_scripts.campaign.plan import Paths, build_plan, format_plan
from bench_scripts.campaign.profiles import HELLO_KITTY, PROFILES
from bench_scripts.campaign.runner import Runner
from bench_scripts.protocols import BB_METHODS, QRA_MAX_ASR
from fst_plugin.demo import synthetic_images, write_image_folders

STAGES = ("smoke", "speed", "records", "defenses", "builtins", "reference", "retune", "pam", "evaluate", "table",
          "collect")
REPO = Path(__file__).resolve().parents[2]


def _fake_backdoorbench(root: Path) -> Path:
    """A folder shaped like a BackdoorBench checkout: defense/ and the Hello-Kitty key image (a random one)."""
    (root / "defense").mkdir(parents=True)
    (root / HELLO_KITTY).parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / HELLO_KITTY)
    return root


def test_the_dry_run_lists_every_stage_with_an_estimate_and_its_measured_source(tmp_path, capsys) -> None:
    (tmp_path / "data").mkdir()
    assert campaign.main(["--protocol", "gpu", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for stage in STAGES:
        line = next(line for line in text.splitlines() if line.startswith(f"{stage} "))
        assert " est " in line and " min" in line
    bases = [line for line in text.splitlines() if "estimate rests on:" in line]
    assert len(bases) == len(STAGES)
    assert sum("h100-2026-11-25" in line for line in bases) >= 8  # the GPU estimates rest on the H100 figures
    assert "skipped: no BackdoorBench checkout" in text
    assert "skipped: pam not registered" not in text and "--methods pam fst-pam" in text  # pam is registered here
    assert "torchrun --nproc_per_node 1 (nccl)" in text and "--stop-after-s" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # a dry run writes nothing


def test_the_budget_decides_which_stages_start(tmp_path) -> None:
    """A stage starts only with at least its min_s left after the reserve for evaluate, table and collect."""
    now = [1000.0]
    plan = build_plan(PROFILES["gpu"], Paths(tmp_path, tmp_path / "work", tmp_path / "out"), budget_s=540,
                      backdoorbench=_fake_backdoorbench(tmp_path / "bb"))
    runner = Runner(plan, clock=lambda: now[0])
    assert runner.decide(plan.stage("smoke")) is None
    now[0] += 540 - runner.reserve - plan.stage("records").min_s + 1  # one second too little for the records
    assert runner.decide(plan.stage("records")).status == "not started"
    assert runner.decide(plan.stage("evaluate")) is None  # the finishing stages have their reserve
    now[0] = 1000.0 + 540 - runner.reserve - plan.stage("pam").min_s + 1  # one second too little for PAM
    assert runner.decide(plan.stage("pam")).status == "not started"
    assert "blended-hello_kitty_0.01_s0" in format_plan(plan)


def test_a_partial_records_stage_names_each_unfinished_record_with_its_checkpoint_progress(tmp_path) -> None:
    """The progress comes from the checkpoint sidecar make_records writes; a finished record is not listed."""
    plan = build_plan(PROFILES["gpu"], Paths(tmp_path, tmp_path / "work", tmp_path / "out"), budget_s=540,
                      backdoorbench=_fake_backdoorbench(tmp_path / "bb"))
    stage, root = plan.stage("records"), tmp_path / "work" / "cache" / PROFILES["gpu"].records_folder
    paused, finished, *others = [step.makes for step in stage.steps if step.makes]
    (root / "attack_checkpoint").mkdir(parents=True)
    (root / "attack_checkpoint" / f"{paused}.pt.json").write_text(json.dumps({"epochs_done": 34, "epochs": 100}))
    (root / "record" / finished).mkdir(parents=True)
    (root / "record" / finished / "attack_result.pt").write_bytes(b"x")
    unfinished = Runner(plan).unfinished_records(stage)
    assert unfinished == [f"{paused} 34/100 epochs", *(f"{name} not started" for name in others)]


def test_the_builtins_stage_runs_every_builtin_of_the_one_list_through_run_defenses_under_the_profile_cap(tmp_path):
    plan = build_plan(PROFILES["gpu"], Paths(tmp_path, tmp_path / "work", tmp_path / "out"), budget_s=540,
                      backdoorbench=_fake_backdoorbench(tmp_path / "bb"))
    stage = plan.stage("builtins")
    assert stage.skip is None
    ran = {(step.needs, step.argv[step.argv.index("--bb-defenses") + 1]) for step in stage.steps}
    assert {d for _, d in ran} == set(BB_METHODS) and len(ran) == len(stage.steps)
    for step in stage.steps:
        assert step.argv[1:3] == ("-m", "bench_scripts.defenses")
        settings = step.argv[step.argv.index("--set") + 1:step.argv.index("--cache")]
        assert f"bb_cap_s={PROFILES['gpu'].builtin_cap_s}" in settings
    retune = plan.stage("retune")    # then every model of every record, built-ins included, is retuned and QRA'd
    assert {step.needs for step in retune.steps} == {n for n, _ in ran}
    for step in retune.steps:
        argv = list(step.argv)
        assert argv[1:3] == ["-m", "bench_scripts.evaluation"] and "--retune" in argv and "--qra" in argv
        assert "--retune-variants" not in argv  # the default: every variant, the built-ins among them
        assert float(argv[argv.index("--qra-max-asr") + 1]) == QRA_MAX_ASR


def _wait_for(predicate, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_the_tiny_campaign_is_killed_resumes_and_brings_back_what_make_table_reads(tmp_path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "mydata"
    write_image_folders(data, "train", *synthetic_images(50, rng))
    write_image_folders(data, "test", *synthetic_images(10, rng))
    work, out = tmp_path / "work", tmp_path / "out"
    # issue 20's stages (issue 21's reference and retune add a minute on this CPU and only reuse the same runner)
    argv = [sys.executable, "-m", "bench_scripts.campaign", "--protocol", "tiny", "--data", str(data), "--out",
            str(out), "--work", str(work), "--backdoorbench", str(_fake_backdoorbench(tmp_path / "bb")),
            "--stage", "smoke", "speed", "records", "defenses", "evaluate", "table"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    records_root = work / "cache" / PROFILES["tiny"].records_folder
    assert records_root.name == "tiny+epochs=3+train_per_class=50"   # the profile's records are not the protocol's
    checkpoints = records_root / "attack_checkpoint"
    _wait_for(lambda: any(checkpoints.glob("*.pt.json")) or first.poll() is not None, 600)
    first.send_signal(signal.SIGTERM)  # killed while the records train
    assert first.wait(60) == 128 + signal.SIGTERM, first.stdout.read()
    paused = {p.name: json.loads(p.read_text()) for p in checkpoints.glob("*.pt.json")}
    assert any(0 < v["epochs_done"] < v["epochs"] for v in paused.values()), paused
    assert len(list((records_root / "record").glob("*/attack_result.pt"))) < 4
    assert json.loads((work / "state.json").read_text())["stages"]["smoke"]["status"] == "done"

    second = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = (work / "logs" / "records.log").read_text()
    assert "resuming attack training after epoch" in log
    assert "stage smoke: done (done in an earlier call)" in second.stderr

    results = pd.read_csv(work / "results" / "results.csv")
    records = {"sig_0.01_s0", "blended-hello_kitty_0.01_s0", "badnets_0.01_s0", "blended_0.01_s0"}
    assert records <= set(results.record)
    for record in records:
        assert {"none", "lp", "vanilla-ft", "fe-tuning", "ft-init", "fst", "fst_lr0.05"} <= set(
            results[results.record == record].variant)
    assert results[["test_acc", "test_asr"]].notna().all().all()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size <= 16 * 1024 * 1024 for f in files)
    assert {"results.csv", "timings.jsonl", "table.md", "speed.csv", "campaign.log", "provenance.json"} <= set(files)
    assert "| **average, all** |" in (out / "table.md").read_text()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["torch"] and provenance["commit"] and provenance["stages"]["records"]["status"] == "done"


def test_the_retune_estimate_counts_the_builtins_models_and_qra(tmp_path) -> None:
    """The retune stage retunes every model, the built-ins' among them when they run, then runs QRA on the purified
    ones: its estimate counts both, from the measured figures it names."""
    from bench_scripts.campaign import figures as fig

    paths = Paths(tmp_path, tmp_path / "work", tmp_path / "out")
    alone = build_plan(PROFILES["gpu"], paths, budget_s=540).stage("retune")
    with_bb = build_plan(PROFILES["gpu"], paths, budget_s=540,
                         backdoorbench=_fake_backdoorbench(tmp_path / "bb")).stage("retune")
    retune = fig.FST_DEFENSE.seconds / 2
    qra = retune * fig.QRA_ON_CPU.seconds / fig.RETUNE_ON_CPU.seconds
    assert alone.seconds == pytest.approx(8 * retune + 8 * fig.QRA_SHARE * qra)
    assert with_bb.seconds - alone.seconds == pytest.approx(len(BB_METHODS) * (retune + fig.QRA_SHARE * qra))
    assert "12 built-ins" in with_bb.basis and "QRA" in with_bb.basis and fig.QRA_ON_CPU.source in with_bb.basis
