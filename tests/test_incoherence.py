"""Incoherence processing (issue 15, part 2): the rotations, GPTQ/RTN with `incoherence: true`,
decode(Packed) in the original basis, seeds from the run seed, and the outlier-column case."""
from __future__ import annotations

import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.quant.codecs import make_codec
from quantatlas.quant.config import build


def _problem(outliers: bool, rows=32, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, cols, generator=g) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g))
    W = torch.randn(rows, cols, generator=g)
    if outliers:  # a few input channels carry large activations and large weights
        X[:, :3] *= 8
        W[:, 3:6] *= 12
    return W, 2 * X.T @ X / X.shape[0]


def _proxy(W, H, Q):
    D = (Q - W).double()
    return float(((D @ H.double()) * D).sum())


def test_rotations_are_orthogonal_and_keep_the_proxy_loss():
    from quantatlas.quant.incoherence import Incoherence

    W, H = _problem(False, rows=24, cols=96)   # 24 = 12·2, 96 = 12·8: non-power-of-2 Hadamard sizes
    inc = Incoherence(24, 96, seed=5)
    Wd = W.double()
    assert torch.allclose(inc.unweight(inc.weight(Wd)), Wd, atol=1e-10)
    U, V = inc.out.matrix(), inc.inp.matrix()
    assert torch.allclose(inc.weight(Wd), U @ Wd @ V.T, atol=1e-10)
    assert torch.allclose(inc.hessian(H.double()), V @ H.double() @ V.T, atol=1e-8)
    Q = Wd + 0.1 * torch.randn(24, 96, dtype=torch.float64)
    assert _proxy(inc.weight(Wd), inc.hessian(H.double()), inc.weight(Q)) == pytest.approx(_proxy(Wd, H, Q), rel=1e-9)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 22"):
        Incoherence(22, 96, seed=0)


@pytest.mark.parametrize("codec_spec", [{"uniform": {"bits": 3, "group": 32}}, {"e8p": {"bits": 2, "group": 32}},
                                        {"d4": {"bits": 3, "group": 32}}])
def test_gptq_incoherence_decodes_to_w_hat_and_stores_the_seed(codec_spec):
    from quantatlas.quant.incoherence import SEED_KEY, IncoherentPacked, decode

    W, H = _problem(True)
    codec = build("codec", codec_spec)
    plain = build("solver", {"gptq": {}}).for_run(RunContext(0))
    w0, p0 = plain.solve(W, {"hessian": H.clone()}, codec)   # solve may overwrite the stats it is given
    solver = build("solver", {"gptq": {"incoherence": True}}).for_run(RunContext(0))
    w1, p1 = solver.solve(W, {"hessian": H}, codec)
    assert torch.equal(decode(codec, p1), w1)                          # Ŵ in the original basis
    assert not torch.allclose(codec.decode(p1), w1, atol=1e-3)         # the codes are of the rotated W
    assert p1.nbytes == p0.nbytes + 8 and SEED_KEY in p1.parts()       # the seed is stored and counted
    assert isinstance(p1, IncoherentPacked) and p1.inner.config == codec.config() == p0.config
    assert SEED_KEY not in p1.inner.data and torch.equal(p1.decode(), w1)   # decodes from its own contents
    assert _proxy(W, H, w1) < _proxy(W, H, w0)                         # outlier columns: incoherence helps
    with pytest.raises(Exception, match="incoherence"):                # a plain build refuses the pack
        build("codec", {p1.codec: p1.config})


def test_rtn_incoherence_lowers_the_proxy_loss_with_outliers_and_follows_the_run_seed():
    from quantatlas.quant.incoherence import decode

    W, H = _problem(True)
    codec = make_codec("uniform", {"bits": 3, "group": 32})
    plain = build("solver", {"rtn": {}})
    inc_cfg = {"rtn": {"incoherence": True}}
    w0, _ = plain.solve(W, None, codec)
    a = build("solver", inc_cfg).for_run(RunContext(1))
    w1, p1 = a.solve(W, None, codec)
    assert torch.equal(decode(codec, p1), w1)
    assert _proxy(W, H, w1) < 0.7 * _proxy(W, H, w0)
    again, _ = build("solver", inc_cfg).for_run(RunContext(1)).solve(W, None, codec)
    other, _ = build("solver", inc_cfg).for_run(RunContext(2)).solve(W, None, codec)
    assert torch.equal(again, w1) and not torch.equal(other, w1)
    second, _ = a.solve(W, None, codec)                 # the next matrix of a run gets its own signs
    assert not torch.equal(second, w1)


def test_incoherence_in_a_spec_is_seeded_and_runs_end_to_end(tiny_reference):
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    spec = parse_spec({"title": "inc", "data": {"eval": {"tokens": 2048, "ctx": 128},
                                                "calib": {"samples": 4, "seq_len": 128}},
                       "control": "gptq_inc", "arms": {
                           "gptq_inc": {"solver": "gptq", "solver_options": {"incoherence": True},
                                        "codec": {"e8p": {"bits": 2, "group": 32}}},
                           "rtn_inc": {"solver": "rtn", "solver_options": {"incoherence": True},
                                       "codec": {"uniform": {"bits": 4, "group": 32}}}}})
    assert spec.arms["rtn_inc"].seeded and spec.arms["gptq_inc"].seeded
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    r = {a: doc["arms"][a]["seeds"]["0"] for a in ("gptq_inc", "rtn_inc")}
    assert 2.5 < r["gptq_inc"]["bits_per_weight"] < 2.51          # 2 + 16/32, plus 8 bytes of seed per matrix
    assert 4.5 < r["rtn_inc"]["bits_per_weight"] < 4.51
    assert all(0 < x["kld_mean"] < 5 for x in r.values())


def test_gguf_export_refuses_incoherent_packs():
    from quantatlas.export.gguf import _packed_rows

    W, H = _problem(False, rows=32, cols=256)
    codec = make_codec("q4_0")
    _, packed = build("solver", {"rtn": {"incoherence": True}}).for_run(RunContext(0)).solve(W, None, codec)
    with pytest.raises(ValueError, match="incoherence-rotated codes"):
        _packed_rows("w", packed, (32, 256))
    _packed_rows("w", codec.encode(W), (32, 256))   # the plain pack still exports
