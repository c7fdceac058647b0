import sys
from pathlib import Path

import pytest

# the tests' helpers (tiny_models), and the tools' and benchmarks' scripts, imported by name
ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "tests", ROOT / "tools", ROOT / "benchmarks"):
    sys.path.insert(0, str(folder))


@pytest.fixture(autouse=True, scope="session")
def _private_flash_cache(tmp_path_factory):
    """Converted flash folders (the demo's included) go to a temporary cache, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLX_FLASH_CACHE", str(tmp_path_factory.mktemp("flash_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_moe_preset(tmp_path_factory):
    """tools/make_synthetic_model.py's tiny-moe preset, built once for the session (in shards of
    2 MiB, so that the folder has several), and its statistics card."""
    import make_synthetic_model as msm

    out = tmp_path_factory.mktemp("synthetic") / "tiny-moe"
    mp = pytest.MonkeyPatch()
    mp.setattr(msm, "SHARD_BYTES", 2 << 20)
    try:
        card = msm.build("tiny-moe", out, log=lambda *a: None)
    finally:
        mp.undo()
    return out, card
