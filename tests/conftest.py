import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _isolated_state(tmp_path_factory):
    """Caches and the ledger go to a temporary folder, never the user's."""
    root = tmp_path_factory.mktemp("qa")
    os.environ["QUANTATLAS_CACHE"] = str(root / "cache")
    os.environ["QUANTATLAS_DB"] = f"sqlite:///{root / 'atlas.db'}"
    yield
