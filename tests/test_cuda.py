"""Device checks (issue 18 part 4): every codec, the GPTQ solver and an end-to-end spec run on a
device B give the CPU's results within fp tolerance.

B is $QUANTATLAS_TEST_DEVICE if set, else "cuda" when available, else the module is skipped.
`QUANTATLAS_TEST_DEVICE=cpu` runs every test CPU against CPU: a dry run of the checks' logic on a
machine without a GPU (it must pass, and quickly).

Tolerances. Codecs whose codes follow from the weights by exact IEEE steps (min/max, one division,
round; llama.cpp's block formats; fp16/bf16/fp8 casts) must decode to the CPU's values within an
fp16 ulp. Codecs that search (trellis Viterbi, lattice nearest points, AQLM beams, k-means, a clip
or scale search, a rotation before a threshold) may pick another code where two candidates tie to
the last bit (a GPU sums in another order); for them the reconstruction MSE must agree within a
few %, and on B itself the values found by `quantize` must be what `decode(pack(codes))` gives.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

DEVICE = os.environ.get("QUANTATLAS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
if DEVICE is None:
    pytest.skip("no CUDA device (set QUANTATLAS_TEST_DEVICE=cpu for a dry run against the CPU)",
                allow_module_level=True)

from quantatlas.quant.codecs import codec_names, make_codec  # noqa: E402
from quantatlas.quant.solvers.gptq import gptq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
B = torch.device(DEVICE)

#: codec -> options for a 64 x 256 matrix (every group size divides 256; small searches so that a CPU
#: dry run stays fast). `gguf` is a per-tensor mixture of these codecs, not a matrix codec.
EXACT = {
    "uniform": {"bits": 4, "group": 128},
    "q8_0": {}, "q8_1": {}, "q8_k": {}, "q4_0": {}, "q4_1": {}, "q5_0": {}, "q5_1": {},
    "q2_k": {}, "q3_k": {}, "q4_k": {}, "q5_k": {}, "q6_k": {}, "iq4_nl": {}, "iq4_xs": {},
    "f16": {}, "bf16": {}, "fp8": {"group": 64},
    "sparse24": {"bits": 4, "group": 128},
}
SEARCHED = {
    "aqlm": {"codebooks": 1, "code_bits": 6, "iters": 3, "beam": 4},
    "gptvq": {"bits": 2, "dim": 2, "group": 128, "rows": 32, "iters": 5},
    "trellis": {"bits": 2, "L": 8, "T": 64},
    "d4": {"bits": 2, "group": 64},
    "e8": {"bits": 2, "group": 64},
    "e8p": {"bits": 3, "group": 128},
    "nestquant": {"bits": 3, "group": 64},
    "turbo": {"bits": 3, "group": 128},
    "lloyd_max": {"bits": 3, "group": 64},
    "dn": {"bits": 2, "n": 12, "group": None},      # 21 D12 blocks and a D4 block per row
    "tcq": {"bits": 2, "states": 16, "T": 64},
    "polarquant": {"bits": [4, 2, 2, 2], "group": 64},   # a rotation, then angle thresholds
    "leech": {"bits": 2, "group": 64},                  # 3x8 tiles, 64 rows padded to 66
}
#: extra configurations of codecs above that take another path (key: a label, value: (codec, options))
VARIANTS = {
    "uniform_asym_mse": ("uniform", {"bits": 3, "group": 64, "symmetric": False, "clip": "mse"}),
    "uniform_row": ("uniform", {"bits": 8, "group": None}),
}
SKIP = {"gguf"}
SHAPE = (64, 256)


def _registered() -> set[str]:
    # tests register toy codecs (conftest.py, test_new_family.py, ...): only the package's own count
    from quantatlas.quant.config import registry

    return {n for n in codec_names() if registry("codec")[n].__module__.startswith("quantatlas.")} - SKIP


def test_every_registered_codec_has_a_device_check():
    """A codec added later without an entry here fails this test (so it gets one)."""
    missing = _registered() - set(EXACT) - set(SEARCHED)
    assert not missing, f"add these codecs to EXACT or SEARCHED in tests/test_cuda.py: {sorted(missing)}"


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g) * torch.exp(0.5 * torch.randn(SHAPE[1], generator=g))  # uneven columns
    importance = torch.exp(torch.randn(SHAPE[1], generator=g))                                 # imatrix-like
    return w, importance


def _encode(codec, w, importance):
    """Codec.encode's steps, keeping what `quantize` found: (packed, the values of every group)."""
    g = codec.group_of(w.shape[1])
    params, codes, values = [], [], []
    for c in range(0, w.shape[1], g):
        p = codec.fit(w[:, c:c + g], importance[c:c + g])
        q = codec.quantize(w[:, c:c + g], p, 0)
        params.append(p)
        codes.append(q.codes)
        values.append(q.values)
    return codec.pack(torch.cat(codes, 1), params), torch.cat(values, 1)


def _to(packed, device):
    return type(packed)(packed.codec, packed.config, packed.shape, {k: t.to(device) for k, t in packed.data.items()})


def _cases():
    cases = [pytest.param(n, o, True, id=n) for n, o in EXACT.items()]
    cases += [pytest.param(n, o, False, id=n) for n, o in SEARCHED.items()]
    cases += [pytest.param(n, o, False, id=label) for label, (n, o) in VARIANTS.items()]
    return cases


@pytest.mark.parametrize("name,opts,exact", _cases())
def test_codec_on_device_matches_cpu(name, opts, exact):
    w, imp = _problem()
    codec_cpu, codec_b = make_codec(name, opts), make_codec(name, opts)  # no state shared between devices
    p_cpu, v_cpu = _encode(codec_cpu, w, imp)
    p_b, v_b = _encode(codec_b, w.to(B), imp.to(B))
    d_cpu, d_b = codec_cpu.decode(p_cpu), codec_b.decode(p_b)

    assert d_b.device.type == B.type and all(t.device.type == B.type for t in p_b.data.values())
    assert p_b.bits_per_weight == p_cpu.bits_per_weight
    assert sorted(p_b.data) == sorted(p_cpu.data)
    # on B: the values quantize found are what the stored codes decode to (codes are stored as found)
    torch.testing.assert_close(d_b, v_b.to(d_b.device).float(), rtol=1e-5, atol=1e-6)
    # a pack made on B decodes the same on the CPU (an artifact written on a GPU machine, read on another)
    torch.testing.assert_close(codec_cpu.decode(_to(p_b, "cpu")), d_b.cpu(), rtol=1e-5, atol=1e-6)
    p_b.to_bytes()  # the artifact bytes come from device tensors too

    d_b = d_b.cpu()
    if exact:  # within an fp16 ulp of a scale
        torch.testing.assert_close(d_b, d_cpu, rtol=2 ** -10, atol=1e-6,
                                   msg=lambda m: f"{name}: {(d_b != d_cpu).float().mean():.2%} of values differ\n{m}")
    else:
        mse_cpu, mse_b = ((d_cpu - w) ** 2).mean().item(), ((d_b - w) ** 2).mean().item()
        assert mse_b == pytest.approx(mse_cpu, rel=0.03), f"{name}: MSE {mse_b:.5g} on {B}, {mse_cpu:.5g} on cpu"


# -- GPTQ ----------------------------------------------------------------------------------------------
GPTQ_CASES = {
    "uniform4_g128": ({"uniform": {"bits": 4, "group": 128}}, {}),
    "uniform4_g128_act_order": ({"uniform": {"bits": 4, "group": 128}}, {"act_order": True, "static_groups": True}),
    "gptaq_uniform4_g128": ({"uniform": {"bits": 4, "group": 128}}, {"cross": True}),
    "e8p2_g128": ({"e8p": {"bits": 2, "group": 128}}, {}),
}


@pytest.fixture(scope="module")
def layer_problem():
    """A 256 x 512 layer with correlated inputs: H = (2/N) X Xᵀ and GPTAQ's cross term from X̃ = X + noise."""
    g = torch.Generator().manual_seed(1)
    rows, cols, n = 256, 512, 2048
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5   # correlated channels
    X = (torch.randn(n, cols, generator=g) * torch.exp(0.5 * torch.randn(cols, generator=g))) @ mix
    X_fp = X + 0.05 * torch.randn(n, cols, generator=g)
    W = 0.02 * torch.randn(rows, cols, generator=g)
    return W, 2 / n * X.T @ X, 2 / n * (X_fp - X).T @ X


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_on_device_matches_cpu(case, layer_problem):
    (codec_name, codec_opts), opts = next(iter(GPTQ_CASES[case][0].items())), dict(GPTQ_CASES[case][1])
    W, H, C = layer_problem
    cross = opts.pop("cross", False)

    def solve(dev):
        codec = make_codec(codec_name, codec_opts)
        w_hat, packed, info = gptq(W.to(dev), H.to(dev), codec, H_cross=C.to(dev) if cross else None, **opts)
        assert w_hat.device.type == torch.device(dev).type
        # decode(Packed) is Ŵ, on the device that solved it
        torch.testing.assert_close(codec.decode(packed).to(w_hat.device), w_hat, rtol=1e-5, atol=1e-6)
        return packed, info

    (p_cpu, i_cpu), (p_b, i_b) = solve("cpu"), solve(B)
    assert p_b.bits_per_weight == p_cpu.bits_per_weight
    assert i_b["damp"] == i_cpu["damp"] and i_b["dead_columns"] == i_cpu["dead_columns"]
    assert i_b["proxy_loss"] == pytest.approx(i_cpu["proxy_loss"], rel=0.01)
    if cross:  # GPTAQ's own objective, relative to the GPTQ loss's size (it is a difference, near 0)
        assert abs(i_b["asym_proxy_loss"] - i_cpu["asym_proxy_loss"]) <= 0.01 * i_cpu["proxy_loss"]


def test_batched_gptq_on_device_matches_one_at_a_time(layer_problem):
    """A MoE layer's experts solved in one batch (solvers/gptq.py `gptq_batched`): on B, each matrix's Ŵ is
    its own `gptq` solve's (bit for bit on the CPU, tests/test_gptq_batched.py; on a GPU batched and single
    matmuls may sum in another order, so within the rounding of a few ties) and decode(Packed) is Ŵ."""
    from quantatlas.quant.solvers.gptq import gptq_batched

    W, H, _ = layer_problem
    Ws = [(W * (1 + 0.5 * e)).to(B) for e in range(3)]
    Hs = [(H + e * 0.1 * torch.diag(torch.diagonal(H))).to(B) for e in range(3)]
    codec = make_codec("uniform", {"bits": 4, "group": 128})
    opts = {"act_order": True, "static_groups": True}
    batched = gptq_batched(Ws, [h.clone() for h in Hs], codec, **opts)
    for (w_hat, packed), W_e, H_e in zip(batched, Ws, Hs):
        alone, _, _ = gptq(W_e, H_e.clone(), codec, losses=False, **opts)
        assert w_hat.device.type == B.type
        torch.testing.assert_close(codec.decode(packed).to(w_hat.device), w_hat, rtol=1e-5, atol=1e-6)
        differ = (w_hat != alone).float().mean().item()
        assert differ < 0.01, f"{differ:.2%} of the weights differ from the one-matrix solve"


# -- end to end -------------------------------------------------------------------------------------------
DATA = {"eval": {"tokens": 2048, "ctx": 128}, "calib": {"samples": 4, "seq_len": 64}}
INT4 = {"uniform": {"bits": 4, "group": 32}}
#: the arms issue 18 names: weights by RTN and GPTQ, a KV-cache arm and an activation arm
ARMS = {
    "rtn_int4": {"codec": INT4},
    "gptq_int4": {"solver": "gptq", "codec": INT4},
    "kv_q8_0": {"kv": {"k": "q8_0", "v": "q8_0"}},
    "w8a8": {"codec": {"uniform": {"bits": 8, "group": None}}, "act": "W8A8"},
}
#: the other steps of a recipe, each one arm: solvers, transforms, a mixture with an imatrix, an
#: allocation (sensitivity passes), recovery (training), KIVI-style KV. Those that search, train or
#: choose may land elsewhere on a GPU, so their KLD gets a looser tolerance (LOOSE).
MORE_ARMS = {
    "gptaq_int4": {"solver": "gptaq", "codec": INT4},
    "gptq_incoherence": {"solver": "gptq", "solver_options": {"incoherence": True}, "codec": INT4},
    "awq_hadamard": {"codec": INT4, "transforms": [{"awq": {"grid": 5}}, {"hadamard": {}}]},
    "gguf_q4_k_m_imatrix": {"codec": {"gguf": {"ftype": "Q4_K_M", "imatrix": True}}},
    "rtn_nestquant3": {"codec": {"nestquant": {"bits": 3, "group": 32}}},
    "rtn_sparse24": {"codec": {"sparse24": {"bits": 4, "group": 32}}},
    "aqlm": {"solver": "aqlm", "solver_options": {"rounds": 1, "adam_steps": 5},
             "codec": {"aqlm": {"codebooks": 2, "code_bits": 3, "iters": 3}}},
    "allocate": {"codec": {"uniform": {"bits": 3, "group": 32}},
                 "allocate": {"candidates": [{"uniform": {"bits": 6, "group": 32}}],
                              "target": {"bits_per_weight": 4.0}}},
    "kd_ste": {"codec": {"uniform": {"bits": 2, "group": 32}},
               "recovery": {"method": "kd_ste", "samples": 4, "seq_len": 32, "batch": 2, "steps": 4}},
    "kivi2": {"kv": {"k": {"uniform": {"bits": 2, "group": None, "symmetric": False}},
                     "v": {"uniform": {"bits": 2, "group": None, "symmetric": False}},
                     "k_granularity": "channel", "residual": 16}},
}
LOOSE = {"awq_hadamard", "gguf_q4_k_m_imatrix", "rtn_nestquant3", "aqlm", "allocate", "kd_ste"}
SAME_KEYS = ("bits_per_weight", "bits_per_param", "bytes_packed", "kv_bits_k", "kv_bits_v", "kv_bits", "act_bits")


def _compare_runs(arms: dict, loose: set, tiny_reference) -> None:
    """Run the arms on the CPU and on B (the model copied there), compare arm by arm."""
    from quantatlas import runner
    from quantatlas.models.load import LoadedModel

    spec = {"title": "device check", "hypothesis": "the device does not change the measurement",
            "data": DATA, "seeds": [0], "arms": arms}
    quiet = {"ledger": False, "compress": False, "log": lambda m: None}
    cpu = runner.run_spec(spec, device="cpu", loaded=tiny_reference, **quiet)
    on_b = LoadedModel(copy.deepcopy(tiny_reference.model).to(B), tiny_reference.source,
                       tiny_reference.model_hash, tiny_reference.tokenizer)
    dev = runner.run_spec(spec, device=str(B), loaded=on_b, **quiet)
    assert dev["environment"]["device"].startswith(B.type)  # the run records where it ran
    for arm in arms:
        a, b = cpu["arms"][arm]["seeds"]["0"], dev["arms"][arm]["seeds"]["0"]
        for k in SAME_KEYS:
            if a.get(k) is None or b.get(k) is None:
                assert a.get(k) == b.get(k), f"{arm}.{k}: {b.get(k)} on {B}, {a.get(k)} on cpu"
            elif arm in loose:  # an allocation or a search may pick another (same-size) code
                assert b.get(k) == pytest.approx(a.get(k), rel=0.02), f"{arm}.{k}: {b.get(k)} on {B}, {a.get(k)} on cpu"
            else:
                assert b.get(k) == a.get(k), f"{arm}.{k}: {b.get(k)} on {B}, {a.get(k)} on cpu"
        # 2% of the CPU's KLD (10% where the arm searches or trains), with a floor for KLDs near 0
        rel = 0.10 if arm in loose else 0.02
        assert b["kld_mean"] == pytest.approx(a["kld_mean"], rel=rel, abs=2e-5), \
            f"{arm}: KLD {b['kld_mean']:.6g} on {B}, {a['kld_mean']:.6g} on cpu"
        assert b["ppl"] == pytest.approx(a["ppl"], rel=rel / 2), arm
        assert b["same_top"] == pytest.approx(a["same_top"], abs=0.01 if arm not in loose else 0.03), arm
        assert a["kld_mean"] > 0 or arm.startswith("kv"), arm   # every arm did quantize something


def test_spec_run_on_device_matches_cpu(tiny_reference):
    _compare_runs(ARMS, set(), tiny_reference)


def test_other_recipe_steps_on_device_match_cpu(tiny_reference):
    _compare_runs(MORE_ARMS, LOOSE, tiny_reference)
