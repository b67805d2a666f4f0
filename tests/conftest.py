import os
import shutil
import subprocess

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
    """A PostgreSQL server of our own on loopback (Debian's `postgresql` + psycopg), or a skip."""
    from quantatlas.atlas.local_postgres import LocalPostgres, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"PostgreSQL tests need a local server: {why}")
    pg = LocalPostgres()
    try:
        pg.start()
    except subprocess.CalledProcessError as e:      # binaries present but no server: say why, do not hide it
        shutil.rmtree(pg.tmp, ignore_errors=True)
        pytest.skip(f"PostgreSQL tests: the local server did not start: {' '.join(map(str, e.cmd))}: "
                    f"{(e.stderr or '').strip()[-300:]}")
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request, tmp_path):
    """A factory of empty ledger URLs on each backend: SQLite files, or fresh PostgreSQL databases."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_server").database
    count = iter(range(1_000_000))
    return lambda: f"sqlite:///{tmp_path / f'ledger{next(count)}.db'}"
