import itertools
import os

import pytest
import torch

from quantatlas.quant.codecs.base import Codec, Packed, Quantized
from quantatlas.quant.config import CodecConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class ToyIdentityConfig(CodecConfig):
    name = "toy_identity"

    def build(self):
        return ToyIdentity(self)


class ToyIdentity(Codec):
    """Stores the values as they are (16 bits counted): a KV cache through it is the fp cache."""

    name = "toy_identity"

    def fit(self, w, importance=None):
        return None

    def quantize(self, w, params, col=0):
        return Quantized(w.float().clone(), torch.zeros(w.shape[0], 0, dtype=torch.int64))

    def pack(self, codes, params):
        return Packed(self.name, {}, (codes.shape[0], 0), {})

    def decode(self, packed):
        return torch.zeros(packed.shape)


class ToyZeroConfig(CodecConfig):
    name = "toy_zero"

    def build(self):
        return ToyZero(self)


class ToyZero(ToyIdentity):
    """Stores nothing and decodes zeros: V through it is V = 0."""

    name = "toy_zero"

    def quantize(self, w, params, col=0):
        return Quantized(torch.zeros_like(w, dtype=torch.float32), torch.zeros(w.shape[0], 0, dtype=torch.int64))


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: one thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def tiny_reference():
    """A tiny random Qwen3 with the reference model's byte vocabulary, as a LoadedModel (fast end-to-end runs)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from quantatlas.models.load import LoadedModel
    from quantatlas.reference.corpus import VOCAB_SIZE

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # a less flat output distribution than the default init gives
        model.lm_head.weight.mul_(20)
    return LoadedModel(model, "tiny", "tiny-qwen3-seed0", None)
