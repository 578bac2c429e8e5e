"""Every command of the README's "Use" section runs as written, from an empty
directory, and prints what the README says it prints.

The shell blocks of that section are run in order by one ``bash -e`` (they
share variables and files, as a reader's terminal would); the Python block
runs as a script.  The install and test lines at the top of the README are
what CI itself runs, so they are not repeated here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytest.importorskip("torch")
pytest.importorskip("keras")


def _use_section() -> str:
    s = README.read_text(encoding="utf-8")
    start = s.index("## Use\n")
    end = s.index("\n## ", start + 1)
    return s[start:end]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _use_section(), re.S)


def _env() -> dict:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # the README promises udfc picks the backend itself
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # the `udfc` and `python` a reader has: this interpreter's environment
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def test_readme_shell_commands_run_as_written(tmp_path):
    blocks = _blocks("bash")
    assert len(blocks) >= 2, "the Use section lost its shell examples"
    script = "set -e\n" + "\n".join(blocks)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    # what the comments promise
    claimed = re.search(r"# prints (top1=[0-9.]+)", _use_section()).group(1)
    assert claimed in r.stdout.split(), r.stdout
    # the synthetic images come from PyTorch's optimiser: the README promises a value, not its last digits
    about = float(re.search(r"# top1 about ([0-9.]+)", _use_section()).group(1))
    printed = [float(w[5:]) for w in r.stdout.split() if w.startswith("top1=")]
    assert printed[-1] == pytest.approx(about, abs=0.02), printed
    for f in ("small.safetensors", "report.json", "results.csv", "small.pt2", "small.keras", "net.safetensors",
              "net.keras", "back.safetensors", "synthetic.npz", "small_syn.safetensors"):
        assert (tmp_path / f).is_file(), f
    assert "udfc: error" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_readme_python_example_runs_and_prints_its_accuracy(tmp_path):
    (code,) = _blocks("python")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    claimed = float(re.search(r"NumPy forward: ([0-9.]+)", code).group(1))
    assert float(r.stdout.split()[-1]) == pytest.approx(claimed, abs=5e-4)
    assert (tmp_path / "small.safetensors").is_file()
