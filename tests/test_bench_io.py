"""benchmarks/bench_io.py: it says clearly when fio, its reference, is missing."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_io.py"


def test_bench_io_says_fio_is_missing(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_io_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_io_under_test", bench)
    spec.loader.exec_module(bench)
    real_which = shutil.which
    monkeypatch.setattr(bench.shutil, "which", lambda name: None if name == "fio" else real_which(name))
    assert bench.main(["--out", str(tmp_path / "out"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "fio is not installed" in err and "apt-get install fio" in err
    assert not (tmp_path / "out").exists()  # nothing written before the check
