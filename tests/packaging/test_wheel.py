"""The wheel: what it holds, and that a regular (non-editable) install finds its configs and defenses from the
repository root (where the repository's ``fst_plugin/`` shadows the installed one) and from any other folder."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from fst_plugin import __version__
from fst_plugin.config import shipped_config, shipped_configs_dir
from fst_plugin.core.modes import MODES
from tests.builders import REPO

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
    assert not any(n.startswith(("tests/", "bench_scripts/", "defense_configs/")) for n in names)
    assert f"Version: {__version__}" in metadata and "Provides-Extra: test" in metadata


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway virtual environment with the wheel installed non-editably; its dependencies come from this
    environment's site-packages through a .pth line (a path line adds the folder, and runs none of its .pth
    files, so this environment's editable install stays out)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    if shutil.which("uv"):
        _run(["uv", "venv", "-q", "--python", sys.executable, str(venv)], cwd=REPO)
        python = venv / "bin" / "python"
        install = ["uv", "pip", "install", "-q", "--no-deps", "--python", str(python), str(wheel)]
    else:
        _run([sys.executable, "-m", "venv", str(venv)], cwd=REPO)
        python = venv / "bin" / "python"
        install = [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=REPO).stdout.strip())
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(install, cwd=REPO, env={**os.environ, "VIRTUAL_ENV": str(venv)})
    return venv


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_a_regular_install_lists_the_defenses_and_finds_its_configs(installed: Path, where: str,
                                                                    tmp_path: Path) -> None:
    cwd = REPO if where == "repository root" else tmp_path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    listed = _run([str(installed / "bin" / "fst-plugin"), "list"], cwd=cwd, env=env).stdout
    assert [line.split()[0] for line in listed.splitlines()] == sorted(MODES)
    lookup = ("import fst_plugin, fst_plugin.config as c; "
              "print(fst_plugin.__file__); print(c.shipped_config('fst', 'gtsrb').read_text())")
    out = _run([str(installed / "bin" / "python"), "-c", lookup], cwd=cwd, env=env).stdout
    package_file, text = out.split("\n", 1)
    # from the repository root, python puts the cwd first, so the repository's fst_plugin/ is imported
    assert Path(package_file).is_relative_to(REPO if where == "repository root" else installed)
    assert text.rstrip("\n") == (REPO / "defense_configs" / "fst" / "gtsrb.yaml").read_text().rstrip("\n")


def test_the_shipped_configs_resolve_through_the_package_link_to_the_top_level_folder() -> None:
    assert shipped_configs_dir().resolve() == (REPO / "defense_configs").resolve()
    assert shipped_config("lp", "config") == shipped_configs_dir() / "lp" / "cifar10.yaml"
