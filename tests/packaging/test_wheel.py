"""The wheel: what it holds, and that after a regular (non-editable) install the ``fst-plugin`` console script
lists the defenses, installs and exports into a BackdoorBench checkout, runs a defense on a record and runs the
demo, from the repository root and from any other folder, always with the installed package.

From the repository root, ``python -c``/``python -m fst_plugin`` put the cwd first on ``sys.path``, so there the
repository's ``fst_plugin/`` shadows the installed one; a console script puts its own folder (the venv's
``bin/``) first instead. Every command here reports which ``fst_plugin`` it imported, and the tests check it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from fst_plugin import __version__
from fst_plugin.defense.shipped import shipped_config, shipped_configs_dir
from fst_plugin.core.modes import MODES, PAPER_MODES
from fst_plugin.export.exporter import render_defense
from fst_plugin.export.installer import LAUNCHER, MANIFEST
from tests.builders import CLI_THREADS, REPO, TinyBB, assert_outputs_complete, backdoorbench_tree, copy_record

DATASETS = ("cifar10", "cifar100", "gtsrb", "tiny")


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of this repository: the sdist, then the wheel built from it (so no stale build/ folder
    of the checkout can leak into it); uv is the installer when this environment has no pip."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the build package is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)]
    if importlib.util.find_spec("pip") is None and shutil.which("uv"):
        cmd[3:3] = ["--installer", "uv"]
    _run(cmd, cwd=REPO)
    (found,) = out.glob("backdoorbench_fst-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_holds_the_package_every_shipped_yaml_and_the_entry_points(wheel: Path) -> None:
    assert wheel.name.startswith(f"backdoorbench_fst-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"backdoorbench_fst-{__version__}.dist-info"
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    for method in MODES:
        for dataset in DATASETS:
            assert f"fst_plugin/defense_configs/{method}/{dataset}.yaml" in names
        assert f"{method} = fst_plugin.adapter.defenses:" in entry_points
    assert "fst-plugin = fst_plugin.cli:main" in entry_points
    assert "fst_plugin/core/tuning.py" in names and "fst_plugin/defense_configs/__init__.py" in names
    assert "fst_plugin/export/defense.py.tmpl" in names  # the exported defense's template (package data)
    assert not any(n.startswith(("tests/", "bench_scripts/", "defense_configs/")) for n in names)
    assert f"Version: {__version__}" in metadata and "Provides-Extra: test" in metadata


def _own_environment(**more: str) -> dict[str, str]:
    """This process's environment without PYTHONPATH and VIRTUAL_ENV: a PYTHONPATH that points at a checkout would
    put the checkout's package beside the throwaway environment's (pip then takes the wheel as installed already and
    installs nothing, so the venv gets no ``fst-plugin``)."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}, **more}


def test_the_throwaway_environment_ignores_a_pythonpath_that_points_at_a_checkout(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("VIRTUAL_ENV", "/elsewhere")
    env = _own_environment(VIRTUAL_ENV="/throwaway")
    assert "PYTHONPATH" not in env and env["VIRTUAL_ENV"] == "/throwaway" and env["PATH"] == os.environ["PATH"]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway virtual environment with the wheel installed non-editably; its dependencies come from this
    environment's site-packages through a .pth line (a path line adds the folder, and runs none of its .pth
    files, so this environment's editable install stays out). No command here sees this process's PYTHONPATH."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    if shutil.which("uv"):
        _run(["uv", "venv", "-q", "--python", sys.executable, str(venv)], cwd=REPO, env=_own_environment())
        python = venv / "bin" / "python"
        install = ["uv", "pip", "install", "-q", "--no-deps", "--python", str(python), str(wheel)]
    else:
        _run([sys.executable, "-m", "venv", str(venv)], cwd=REPO, env=_own_environment())
        python = venv / "bin" / "python"
        install = [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=REPO, env=_own_environment()).stdout.strip())
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(install, cwd=REPO, env=_own_environment(VIRTUAL_ENV=str(venv)))
    return venv


# Reports, at exit, the file of the fst_plugin package the process imported (on PYTHONPATH: it shadows nothing).
WHICH_PACKAGE = """
import atexit, os, sys

def _report():
    with open(os.environ["FST_PLUGIN_IMPORTED_FROM"], "w") as fh:
        fh.write(getattr(sys.modules.get("fst_plugin"), "__file__", None) or "not imported")

if os.environ.get("FST_PLUGIN_IMPORTED_FROM"):
    atexit.register(_report)
"""
WHERE = ["repository root", "another folder"]


def _where(where: str, tmp_path: Path) -> Path:
    if where == "repository root":
        return REPO
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def _installed_run(installed: Path, cwd: Path, tmp_path: Path, *argv: str, timeout: int = 300) -> tuple[str, Path]:
    """``argv`` in ``cwd``, its first item a program of the venv's ``bin/`` (``fst-plugin`` or ``python``), with this
    environment's PYTHONPATH and VIRTUAL_ENV removed and the builders' CLI thread count; it must exit 0.
    Returns (stdout, the ``__init__.py`` of the fst_plugin package the process imported)."""
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(WHICH_PACKAGE)
    report = tmp_path / "imported_from.txt"
    report.unlink(missing_ok=True)  # no answer left over from an earlier command
    env = _own_environment(PYTHONPATH=str(probe), FST_PLUGIN_IMPORTED_FROM=str(report),
                           OMP_NUM_THREADS=str(CLI_THREADS))
    out = _run([str(installed / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env, timeout=timeout)
    return out.stdout, Path(report.read_text())


def _site_packages(installed: Path) -> Path:
    (site,) = (installed / "lib").glob("python3*/site-packages")
    return site


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_a_regular_install_lists_the_defenses_and_finds_its_configs(installed: Path, where: str,
                                                                    tmp_path: Path) -> None:
    cwd = _where(where, tmp_path)
    listed, package = _installed_run(installed, cwd, tmp_path, "fst-plugin", "list")
    assert [line.split()[0] for line in listed.splitlines()] == sorted(MODES)
    # a console script puts its own folder (the venv's bin/) first on sys.path, not the cwd: the installed package
    assert package == _site_packages(installed) / "fst_plugin" / "__init__.py"
    lookup = ("import fst_plugin, fst_plugin.defense.shipped as c; "
              "print(fst_plugin.__file__); print(c.shipped_config('fst', 'gtsrb').read_text())")
    out, _ = _installed_run(installed, cwd, tmp_path, "python", "-c", lookup)
    package_file, text = out.split("\n", 1)
    # `python -c` and `python -m` put the cwd first, so from the repository root the repository's fst_plugin/ is
    # imported (and reads its configs through the package's link to defense_configs/); elsewhere the installed one
    assert Path(package_file).is_relative_to(REPO if where == "repository root" else installed)
    assert text.rstrip("\n") == (REPO / "defense_configs" / "fst" / "gtsrb.yaml").read_text().rstrip("\n")
    listed_by_module, package = _installed_run(installed, cwd, tmp_path, "python", "-m", "fst_plugin", "list")
    assert listed_by_module == listed
    assert package == (REPO if where == "repository root" else _site_packages(installed)) / "fst_plugin" / "__init__.py"


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_a_regular_install_installs_into_a_backdoorbench_checkout(installed: Path, where: str,
                                                                 tmp_path: Path) -> None:
    checkout = backdoorbench_tree(tmp_path / "BackdoorBench")
    ft_before = (checkout / "defense" / "ft.py").read_text()
    cwd = _where(where, tmp_path)
    out, package = _installed_run(installed, cwd, tmp_path, "fst-plugin", "install", "--backdoorbench", str(checkout))
    assert package == _site_packages(installed) / "fst_plugin" / "__init__.py"
    written = {Path(line.removeprefix("wrote ")).relative_to(checkout.resolve()).as_posix()
               for line in out.splitlines() if line.startswith("wrote ")}
    assert written == {f"defense/{m}.py" for m in MODES} | {
        f"config/defense/{m}/{d}.yaml" for m in MODES for d in ("config", *DATASETS)}
    for method in MODES:
        assert (checkout / "defense" / f"{method}.py").read_text() == LAUNCHER.format(name=method)
        for dataset in DATASETS:
            installed_config = (checkout / "config" / "defense" / method / f"{dataset}.yaml").read_text()
            assert installed_config == (REPO / "defense_configs" / method / f"{dataset}.yaml").read_text()
        default = (checkout / "config" / "defense" / method / "config.yaml").read_text()
        assert default == (REPO / "defense_configs" / method / "cifar10.yaml").read_text()
    assert (checkout / MANIFEST).is_file()
    assert (checkout / "defense" / "ft.py").read_text() == ft_before  # BackdoorBench's own defense untouched
    # export reads its template from the installed package data and replaces the launcher
    _installed_run(installed, cwd, tmp_path, "fst-plugin", "export", "--backdoorbench", str(checkout), "--methods", "fst")
    assert (checkout / "defense" / "fst.py").read_text() == render_defense("fst")


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_a_regular_install_runs_a_defense_on_a_record(installed: Path, where: str, bb: TinyBB,
                                                      tmp_path: Path) -> None:
    record = copy_record(bb, "wheel_run", root=tmp_path)
    _, package = _installed_run(installed, _where(where, tmp_path), tmp_path, "fst-plugin", "run", "fst",
                                "--record", str(record), "--dataset_path", str(bb.data), "--device", "cpu",
                                "--num_workers", "0", "--epochs", "1", "--ratio", "0.25")
    assert package == _site_packages(installed) / "fst_plugin" / "__init__.py"
    save_dir = record / "defense" / "fst"
    checked = set(assert_outputs_complete(save_dir))
    assert {"defense_result.pt", "fst_df.csv", "fst_df_summary.csv", "run_info.json", "log/index.txt",
            "loss_metric_plots.png", "acc_like_metric_plots.png"} <= checked
    info = json.loads((save_dir / "run_info.json").read_text())
    assert info["versions"]["backdoorbench-fst"] == __version__ and info["config"]["epochs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("where", WHERE)
def test_a_regular_install_runs_the_demo(installed: Path, where: str, tmp_path: Path) -> None:
    """The smallest demo the command takes: one image per class and split, one epoch of attack and of tuning."""
    out = tmp_path / "demo"
    stdout, package = _installed_run(installed, _where(where, tmp_path), tmp_path, "fst-plugin", "demo",
                                     "--out", str(out), "--train-per-class", "1", "--test-per-class", "1",
                                     "--attack-epochs", "1", "--epochs", "1", "--device", "cpu")
    assert package == _site_packages(installed) / "fst_plugin" / "__init__.py"
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    assert " ".join(rows[0].split()) == "| defense | C-Acc | ASR | RA | time_s |"  # the header, padding aside
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["no defense", *PAPER_MODES]
    assert (out / "record" / "demo_badnet" / "attack_result.pt").is_file() and (out / "demo.log").is_file()


def test_the_shipped_configs_resolve_through_the_package_link_to_the_top_level_folder() -> None:
    assert shipped_configs_dir().resolve() == (REPO / "defense_configs").resolve()
    assert shipped_config("lp", "config") == shipped_configs_dir() / "lp" / "cifar10.yaml"
