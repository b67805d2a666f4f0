"""Issue 23, parts 3 and 6 on the codec/solver side: every random choice of a codec, a solver's
incoherence signs, a transform and a KV/activation rotation comes from the run context (with the
historical derivations, written out here), a run does not read the global random state, and every
packed tensor decodes from its own contents after a trip through the artifact file."""
from __future__ import annotations

import copy
import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.eval.bits import MAGIC, Artifact, load_artifact
from quantatlas.quant.codecs import Codec, codec_names
from quantatlas.quant.config import build
from quantatlas.quant.incoherence import SEED_KEY, IncoherentPacked, decode


# ---- the historical derivations, written out ---------------------------------------------------
def _sha256_seed(*parts) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def test_seeds_come_from_the_context_with_the_historical_derivations():
    from quantatlas.quant.kv import KVCacheConfig, KVCacheQuantizer

    ctx = RunContext(7)
    # a solver's i-th matrix: SeedSequence([run seed, i, 0x1C0]), first 64-bit word mod 2^62
    solver = build("solver", {"rtn": {"incoherence": True}}).for_run(ctx)
    want = [int(np.random.SeedSequence([7, i, 0x1C0]).generate_state(1, np.uint64)[0]) % 2 ** 62 for i in range(3)]
    assert [solver.next_tensor_seed() for _ in range(3)] == want
    assert build("solver", "rtn").for_run(ctx).next_tensor_seed() == want[0]   # each run copy counts afresh
    # a config's own seed shifted by the run seed (turbo, gptvq, aqlm; the KV rotation)
    for name, opts in (("turbo", {"bits": 3}), ("gptvq", {"bits": 2}), ("aqlm", {"codebooks": 1, "code_bits": 4})):
        codec = build("codec", {name: {**opts, "seed": 2 ** 63 - 3}})
        assert codec.for_run(ctx).config()["seed"] == 4 and codec.for_run(RunContext(0)) is codec
    kv = KVCacheQuantizer(KVCacheConfig(k="q8_0", rotate=True, rotation_seed=5), 7)
    assert kv._halves(64)[0].rotation.seed == 12
    # a rotation named by its place: sha256 of "seed/tag/..."
    assert ctx.sub_seed("named", "online", "down", 1) == _sha256_seed(7, "online", "down", 1)


def _tiny_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():   # all weights set here, none from the global state
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


W = torch.randn(32, 256, generator=torch.Generator().manual_seed(11))
MODEL = None


def _turbo():
    return build("codec", {"turbo": {"bits": 3, "group": 128}}).for_run(RunContext(3)).encode(W).data


def _gptvq():
    return build("codec", {"gptvq": {"bits": 2, "group": 128, "iters": 3}}).for_run(RunContext(3)).encode(W).data


def _incoherence():
    solver = build("solver", {"rtn": {"incoherence": True}}).for_run(RunContext(3))
    codec = build("codec", {"uniform": {"bits": 3, "group": 32}})
    return [solver.solve(W, None, codec)[0] for _ in range(2)]


def _transform():
    global MODEL
    if MODEL is None:
        MODEL = _tiny_model()
    model = copy.deepcopy(MODEL)
    build("transform", {"hadamard": {"online": ["o", "down"]}}).apply(model, None, RunContext(3))
    x = torch.arange(12)[None] % 64
    with torch.no_grad():
        return [p.detach().clone() for p in model.parameters()] + [model(x).logits]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("run", [_turbo, _gptvq, _incoherence, _transform], ids=lambda f: f.__name__[1:])
def test_a_run_does_not_read_the_global_random_state(run):
    torch.manual_seed(123)
    np.random.seed(123)
    first = run()
    torch.manual_seed(99)   # another global state, and draws from it
    np.random.seed(99)
    torch.rand(17), np.random.rand(5)
    second = run()
    unseeded = run()        # and whatever state the first runs left
    assert _equal(first, second) and _equal(first, unseeded)
    other_seed = {  # a different run context does change the random parts (so the check above can fail)
        "_turbo": lambda: build("codec", {"turbo": {"bits": 3, "group": 128}}).for_run(RunContext(4)).encode(W).data,
    }.get(run.__name__)
    if other_seed is not None:
        assert not _equal(first, other_seed())


# ---- packs decode from their own contents ------------------------------------------------------
OPTIONS = {"aqlm": {"codebooks": 1, "code_bits": 4, "iters": 2, "beam": 2}, "gptvq": {"bits": 2, "iters": 2},
           "trellis": {"bits": 2}, "turbo": {"bits": 3}, "uniform": {"bits": 3}, "lloyd_max": {"bits": 3},
           "d4": {"bits": 3}, "e8": {"bits": 3}, "nestquant": {"bits": 3},
           "dn": {"n": 12, "bits": 3, "group": None}, "tcq": {"bits": 2, "states": 16},
           "polarquant": {"bits": [4, 2, 2, 2]}, "leech": {"bits": 2, "gain_bits": 2}}


def _codecs():
    out = []
    for name in codec_names():
        if name.startswith("toy_"):
            continue
        if name == "gguf":   # a per-tensor mixture of the ggml codecs, not a codec of its own
            continue
        out.append(name)
    return out


def _through_file(packed):
    """The pack after Artifact.to_bytes / load_artifact, and the file's header entry."""
    blob = Artifact({"w": packed}, {}).to_bytes(seed=5)
    (n,) = struct.unpack("<Q", blob[len(MAGIC):len(MAGIC) + 8])
    header = json.loads(blob[len(MAGIC) + 8:len(MAGIC) + 8 + n])
    loaded, _ = load_artifact(blob)
    return loaded.packed["w"], header["tensors"][0]


@pytest.mark.parametrize("name", _codecs())
def test_every_codec_pack_decodes_from_its_own_contents(name, one_thread):
    codec = build("codec", {name: OPTIONS.get(name, {})})
    assert isinstance(codec, Codec)
    run = codec.for_run(RunContext(5))
    packed = run.encode(W)
    loaded, entry = _through_file(packed)
    assert type(loaded) is type(packed) and loaded.codec == name and loaded.config == packed.config
    assert loaded.nbytes == packed.nbytes and loaded.to_bytes() == packed.to_bytes()   # bits unchanged
    assert torch.equal(loaded.decode(), run.decode(packed))
    assert [p["key"] for p in entry["parts"]] == sorted(packed.data)
    if run.seeded:   # the run's seed is in the pack's config, not only in the run codec
        assert loaded.config["seed"] == codec.config()["seed"] + 5


@pytest.mark.parametrize("codec_spec", [{"uniform": {"bits": 3, "group": 32}}, {"turbo": {"bits": 3, "group": 64}},
                                        {"q4_0": {}}])
def test_an_incoherence_pack_is_typed_and_decodes_from_its_own_contents(codec_spec, one_thread):
    codec = build("codec", codec_spec).for_run(RunContext(2))
    solver = build("solver", {"rtn": {"incoherence": True}}).for_run(RunContext(2))
    w_hat, packed = solver.solve(W, None, codec)
    assert isinstance(packed, IncoherentPacked) and SEED_KEY not in packed.inner.data
    assert packed.seed == RunContext(2).sub_seed("tensor", 0)
    assert packed.nbytes == packed.inner.nbytes + 8                       # the seed is stored and counted
    assert torch.equal(packed.decode(), w_hat) and torch.equal(decode(codec, packed), w_hat)
    loaded, entry = _through_file(packed)
    assert isinstance(loaded, IncoherentPacked) and loaded.seed == packed.seed
    assert torch.equal(loaded.decode(), w_hat) and loaded.nbytes == packed.nbytes
    # the file keeps the format it always had: the codec's entry, flagged, with the seed as a part
    assert entry["codec"] == packed.codec and entry["config"] == {**codec.config(), "incoherence": True}
    assert [p["key"] for p in entry["parts"]] == sorted([*packed.inner.data, SEED_KEY])
    assert next(p for p in entry["parts"] if p["key"] == SEED_KEY) == {"key": SEED_KEY, "dtype": "int64",
                                                                      "shape": [1], "nbytes": 8}
    sizes = Artifact({"w": packed}, {}).measure(compress=False)
    assert sizes["bits_per_weight"] == 8 * (packed.inner.nbytes + 8) / W.numel()


def test_streamed_shards_keep_incoherence_packs(tmp_path):
    from quantatlas.models.stream import load_packed, save_packed

    codec = build("codec", {"uniform": {"bits": 4, "group": 32}})
    w_hat, packed = build("solver", {"rtn": {"incoherence": True}}).for_run(RunContext(1)).solve(W, None, codec)
    plain = codec.encode(W)
    save_packed({"a.weight": packed, "b.weight": plain}, tmp_path / "packed_00000.safetensors")
    back = load_packed(tmp_path)
    assert isinstance(back["a.weight"], IncoherentPacked) and type(back["b.weight"]) is type(plain)
    assert torch.equal(back["a.weight"].decode(), w_hat) and back["a.weight"].nbytes == packed.nbytes
    assert torch.equal(back["b.weight"].decode(), codec.decode(plain))
