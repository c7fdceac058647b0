import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _private_flash_cache(tmp_path_factory):
    """Converted flash folders (the demo's included) go to a temporary cache, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLX_FLASH_CACHE", str(tmp_path_factory.mktemp("flash_cache")))
    yield
    mp.undo()
