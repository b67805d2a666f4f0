import itertools
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


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of our own on loopback (Debian's `postgresql` + psycopg), or a skip that
    says why (binaries or driver missing, or the server did not start)."""
    from quantatlas.atlas.local_postgres import LocalPostgres

    try:
        pg = LocalPostgres()
        pg.start()
    except RuntimeError as e:
        pytest.skip(f"PostgreSQL tests need a local server: {e}")
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request, tmp_path):
    """A factory of empty ledger URLs on each backend: SQLite files, or fresh PostgreSQL databases."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_server").database
    count = itertools.count()
    return lambda: f"sqlite:///{tmp_path / f'ledger{next(count)}.db'}"
