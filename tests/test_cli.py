"""The installed commands (pyproject's [project.scripts]) print a user's mistake as one line with a
non-zero exit, as `python -m mlx_flash.X` does, never a traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def scripts() -> dict[str, str]:
    text = PYPROJECT.read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', text, flags=re.M))


def test_every_command_is_listed():
    assert set(scripts()) == {"mlx-flash-convert", "mlx-flash-generate", "mlx-flash-chat", "mlx-flash-server"}


@pytest.mark.parametrize("name", sorted(scripts()))
def test_command_reports_a_missing_model_in_one_line(name, tmp_path):
    module, func = scripts()[name].split(":")
    args = ["--model", str(tmp_path / "no-such-model")]
    if name == "mlx-flash-convert":
        args += ["--out", str(tmp_path / "out")]
    code = f"import sys; sys.argv = [{name!r}] + {args!r}; from {module} import {func}; {func}()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "no-such-model" in lines[0], r.stderr
