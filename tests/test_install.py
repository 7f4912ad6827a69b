"""A wheel built from this checkout installs and runs anywhere: its own configs (the
repository's conf/ as lmforge/conf), runtime dependencies declared, every module present.
An editable install keeps reading the checkout's conf/.

No network: the wheel is built with this environment's setuptools (--no-build-isolation,
--no-index), and the fresh venv gets this environment's site-packages as one plain sys.path
entry (a .pth line) instead of downloading the dependencies; the lmforge installed into the
fresh venv comes first on sys.path, and that is asserted."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GPT2_124M_PARAMS = 124_439_808


def _env() -> dict[str, str]:
    """This environment minus what would put the checkout's sources or a pip config first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP") and not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return env


def _run(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """What a build reads (pyproject.toml, README.md, src/, conf/), copied: a build in the
    checkout would write build/ and *.egg-info there, and a stale build/lib could leak
    deleted modules into the wheel. A user's machine-local conf/local/*.yaml is planted to
    check that it stays out of the wheel."""
    dst = tmp_path_factory.mktemp("source")
    shutil.copy2(REPO / "pyproject.toml", dst)
    shutil.copy2(REPO / "README.md", dst)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "src", dst / "src", ignore=skip)
    shutil.copytree(REPO / "conf", dst / "conf", ignore=skip)
    (dst / "conf" / "local").mkdir(exist_ok=True)
    (dst / "conf" / "local" / "zz_planted_by_test.yaml").write_text("trainer: {seed: 1}\n")
    return dst


def _fresh_venv(where: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a new venv without pip or any package."""
    _run([sys.executable, "-m", "venv", "--without-pip", where], cwd=where.parent)
    py = where / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=where.parent).stdout.strip()
    return py, Path(site)


def _pip_install(py: Path, wheel: Path) -> None:
    """This environment's pip installs `wheel` (no dependencies) into the venv of `py`."""
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
          "-q", wheel], cwd=wheel.parent)


def _borrow_site_packages(site: Path) -> None:
    """The dependencies come from this environment: its site-packages as plain sys.path
    entries after the venv's own (a path line in a .pth; .pth files found there, such as
    an editable lmforge's, are not processed). Written after the install, so pip never
    sees this environment's lmforge as already installed."""
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_borrowed_site_packages.pth").write_text("\n".join(sorted(ours)) + "\n")


def _where(py: Path, cwd: Path) -> tuple[Path, Path]:
    """(lmforge.__file__, lmforge.config.conf_dir()) as the interpreter `py` sees them."""
    out = _run([py, "-c", "import lmforge, lmforge.config as c; "
                "print(lmforge.__file__); print(c.conf_dir())"], cwd=cwd).stdout.split("\n")
    return Path(out[0]).resolve(), Path(out[1]).resolve()


def test_wheel_installs_and_runs_outside_the_checkout(source: Path, tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", wheel_dir, source], cwd=source)
    (wheel,) = wheel_dir.glob("lmforge-*.whl")

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    modules = {f"lmforge/{p.relative_to(source / 'src' / 'lmforge').as_posix()}"
               for p in (source / "src" / "lmforge").rglob("*.py")}
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    configs = {f"lmforge/conf/{p.relative_to(source / 'conf').as_posix()}"
               for p in (source / "conf").rglob("*.yaml")
               if p.relative_to(source / "conf").parts[0] != "local"}
    assert "lmforge/conf/train.yaml" in configs and "lmforge/conf/model/gpt2_124m.yaml" in configs
    assert not configs - names, f"configs missing from the wheel: {sorted(configs - names)}"
    assert not [n for n in names if n.startswith("lmforge/conf/local/")], \
        "conf/local/*.yaml (a user's machine-local overrides) must not ship"
    runtime = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)[^;\n]*$", metadata, re.M)
    assert "accelerate" in runtime, "accelerate must be a runtime dependency"
    assert re.search(r"^Requires-Python: >=3\.11$", metadata, re.M)

    py, site = _fresh_venv(tmp_path / "venv")
    _pip_install(py, wheel)
    _borrow_site_packages(site)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing found by relative paths
    elsewhere.mkdir()
    package, conf = _where(py, elsewhere)
    assert package.is_relative_to(site.resolve()), f"lmforge imported from {package}"
    assert conf == site.resolve() / "lmforge" / "conf", f"configs read from {conf}"

    run = tmp_path / "run"
    _run([py.parent / "lmforge-train", "model=gpt2_124m", "model.vocab_size=50257",
          "trainer.max_steps=0", f"hydra.run.dir={run}", "logging=quiet"], cwd=elsewhere)
    assert json.loads((run / "summary.json").read_text())["n_params"] == GPT2_124M_PARAMS
    _run([py.parent / "lmforge-plan", "model=gpt2_124m", "model.vocab_size=50257", "--out", run],
         cwd=elsewhere)
    assert json.loads((run / "plan.json").read_text())["n_params"] == GPT2_124M_PARAMS


def test_editable_install_reads_the_checkout_conf(source: Path, tmp_path: Path) -> None:
    """pip install -e builds this PEP 660 wheel; with conf/ mapped into the package,
    setuptools makes it an import-hook install, under which conf_dir() must still be the
    checkout's conf/ (edits there apply without reinstalling)."""
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
          "build_meta.build_editable(sys.argv[1])", wheel_dir], cwd=source)
    (wheel,) = wheel_dir.glob("lmforge-*.whl")
    py, site = _fresh_venv(tmp_path / "venv")
    _pip_install(py, wheel)
    _borrow_site_packages(site)
    package, conf = _where(py, tmp_path)
    assert package == (source / "src" / "lmforge" / "__init__.py").resolve()
    assert conf == (source / "conf").resolve()
