"""What comes back from the device: at most 8 files of at most 16 MB in ``--out``.

``results.csv``, ``timings.jsonl``, ``table.md`` and ``speed.csv`` as the scripts wrote them (when they exist);
``campaign.log`` (the plan, then each stage's log, the tail of each kept so the file stays under the limit);
``provenance.json`` (exact versions, the GPU's name, the commit, the command, every stage's outcome); and, in the
slots left, the finished records' weights as bf16 state_dicts in one ``torch.save`` file split into
``weights.pt.part<NN>`` pieces (``cat weights.pt.part* > weights.pt``; records dropped from the end of the plan's
order until the pieces fit).
"""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench_scripts.campaign.plan import Plan, format_plan
from bench_scripts.campaign.profiles import CLEAN_REFERENCE, RECORDS
from bench_scripts.campaign.runner import State
from fst_plugin.record.layout import attack_result

MAX_FILES = 8
MAX_BYTES = 16 * 1024 * 1024 - 4096   # "at most 16 MB", with room to spare
COPIED = ("results.csv", "timings.jsonl", "table.md", "speed.csv")
WRITTEN = ("campaign.log", "provenance.json")
WEIGHTS_PREFIX = "weights.pt.part"


def provenance(plan: Plan, state: State, commit: str | None) -> dict[str, Any]:
    """Exact versions, the device, the commit and every stage's outcome."""
    import torchvision

    from fst_plugin import __version__

    cuda = torch.cuda.is_available()
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "commit": git.stdout.strip() if git.returncode == 0 else commit or "unknown",
        "backdoorbench_fst": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "command": " ".join(["python -m bench_scripts.campaign", *sys.argv[1:]]), "profile": plan.profile.name, "protocol": plan.profile.protocol,
        "budget_s": plan.budget_s, "stages": state.data["stages"],
    }


def _log_text(plan: Plan, limit: int) -> str:
    """The plan, then every stage's log, each cut to its tail so the whole stays under ``limit`` bytes."""
    logs = [p for p in (plan.paths.logs / f"{s.name}.log" for s in plan.stages) if p.is_file()]
    head = format_plan(plan) + "\n"
    share = max(1024, (limit - len(head.encode()) - 200 * len(logs)) // max(1, len(logs)))
    parts = [head]
    for path in logs:
        data = path.read_bytes()
        cut = f"[... {len(data) - share} earlier bytes cut ...]\n" if len(data) > share else ""
        parts.append(f"\n===== {path.name} =====\n{cut}{data[-share:].decode(errors='replace')}")
    return "".join(parts)


def _bf16_weights(plan: Plan) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The finished records' weights in bf16, in the plan's order: [(record, state_dict)]."""
    from fst_plugin.record import load_untrusted

    out = []
    for spec in (*RECORDS, CLEAN_REFERENCE):
        path = attack_result(plan.paths.record(plan.profile.records_folder, spec.name()))
        if path.is_file():
            state_dict = load_untrusted(path, "attack record")["model"]
            out.append((spec.name(), {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                      for k, v in state_dict.items()}))
    return out


def collect(plan: Plan, state: State, commit: str | None = None) -> list[Path]:
    """Write what comes back into ``plan.paths.out`` (replacing an earlier call's files); the files written."""
    out = plan.paths.out
    out.mkdir(parents=True, exist_ok=True)
    for old in [*(out / n for n in COPIED + WRITTEN), *out.glob(f"{WEIGHTS_PREFIX}*")]:
        old.unlink(missing_ok=True)
    written = []
    for name in COPIED:
        source = plan.paths.results / name
        if source.is_file() and source.stat().st_size <= MAX_BYTES:
            written.append(Path(shutil.copyfile(source, out / name)))
    (out / "campaign.log").write_text(_log_text(plan, MAX_BYTES - 4096))
    (out / "provenance.json").write_text(json.dumps(provenance(plan, state, commit), indent=1, default=str))
    written += [out / "campaign.log", out / "provenance.json"]
    slots = MAX_FILES - len(written)
    weights = _bf16_weights(plan)
    while weights:
        buffer = io.BytesIO()
        torch.save(dict(weights), buffer)
        data = buffer.getvalue()
        pieces = [data[i:i + MAX_BYTES] for i in range(0, len(data), MAX_BYTES)]
        if len(pieces) <= slots:
            for i, piece in enumerate(pieces):
                (out / f"{WEIGHTS_PREFIX}{i:02d}").write_bytes(piece)
                written.append(out / f"{WEIGHTS_PREFIX}{i:02d}")
            break
        weights.pop()
    assert len(written) <= MAX_FILES and all(p.stat().st_size <= 16 * 1024 * 1024 for p in written)
    return written
