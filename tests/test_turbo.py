"""The turbo and lloyd_max codecs against direct per-row implementations written from their docstrings."""
import numpy as np
import pytest
import scipy.linalg
import torch

from quantatlas.quant.codecs import codec_names, make_codec
from quantatlas.quant.hadamard import hadamard_matrix
from quantatlas.quant.lloyd_max import codebook


def _signs(g, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (g,), generator=gen) * 2 - 1).double().numpy()


def _direct_turbo(w, bits, g, seed, kind="sphere", norm_correction=True):
    """Row by row, group by group, in float64 with a dense Q = H diag(s) / sqrt(g)."""
    h = scipy.linalg.hadamard(g) if g & (g - 1) == 0 else hadamard_matrix(g).numpy()
    q = h @ np.diag(_signs(g, seed)) / np.sqrt(g)
    levels = codebook(bits, "sphere", g).levels * np.sqrt(g) if kind == "sphere" else codebook(bits).levels
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            nu = np.linalg.norm(x)
            if nu == 0:
                continue
            z = np.sqrt(g) * q @ x / nu
            z_hat = levels[np.abs(z[:, None] - levels[None, :]).argmin(1)]
            sigma = nu / np.linalg.norm(z_hat) if norm_correction else nu / np.sqrt(g)
            out[r, c:c + g] = float(np.float16(sigma)) * q.T @ z_hat
    return out


@pytest.mark.parametrize("bits,g,kind,nc", [(4, 64, "sphere", True), (3, 128, "gaussian", True),
                                            (2, 32, "sphere", False), (8, 64, "sphere", True),
                                            (3, 96, "sphere", True), (1, 16, "gaussian", True)])
def test_turbo_matches_direct(bits, g, kind, nc):
    gen = torch.Generator().manual_seed(100 + bits * g)
    w = torch.randn(12, 2 * g, generator=gen) * 0.02
    w[0] = 0.0                                     # an all-zero row
    w[1, :g] *= 50                                 # a loud group next to a quiet one
    codec = make_codec("turbo", {"bits": bits, "group": g, "seed": 5, "codebook": kind, "norm_correction": nc})
    got = codec.decode(codec.encode(w)).double().numpy()
    want = _direct_turbo(w.double().numpy(), bits, g, 5, kind, nc)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not np.isnan(got).any() and (got[0] == 0).all()


def test_turbo_bits_are_counted_from_storage():
    w = torch.randn(64, 512)
    p = make_codec("turbo", {"bits": 3, "group": 128}).encode(w)
    assert p.nbytes == 64 * 512 * 3 // 8 + 64 * 4 * 2 + 8   # codes + fp16 scale per row-group + 8-byte seed
    assert p.bits_per_weight == 3 + 16 / 128 + 64 / (64 * 512)
    assert make_codec("turbo", {"bits": 4, "group": 64}).bits_per_weight((32, 128)) == 4 + 16 / 64 + 64 / (32 * 128)


def test_turbo_norm_correction_keeps_group_norms():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    codec = make_codec("turbo", {"bits": 2, "group": 128})
    w_hat = codec.decode(codec.encode(w))
    ratio = w_hat.reshape(32, 2, 128).norm(dim=-1) / w.reshape(32, 2, 128).norm(dim=-1)
    assert (ratio - 1).abs().max() < 2 ** -10            # only σ's fp16 rounding is left
    plain = make_codec("turbo", {"bits": 2, "group": 128, "norm_correction": False})
    ratio = plain.decode(plain.encode(w)).reshape(32, 2, 128).norm(dim=-1) / w.reshape(32, 2, 128).norm(dim=-1)
    assert (ratio - 1).abs().max() > 0.01                # without it the norm shrinks (E ẑ² = 1 - D)


def test_turbo_gaussian_mse_near_lloyd_max():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    for bits in (2, 3, 4):
        codec = make_codec("turbo", {"bits": bits, "group": 128})
        mse = float(((codec.decode(codec.encode(w)) - w) ** 2).mean())
        assert 0.9 * codebook(bits).mse < mse < 1.03 * codebook(bits).mse


def test_sphere_codebook_beats_gaussian_in_small_groups():
    # for i.i.d. Gaussian weights, w/‖w‖ is uniform on the sphere, so the sphere marginal is exact
    w = torch.randn(2048, 64, generator=torch.Generator().manual_seed(2))
    err = {}
    for kind in ("sphere", "gaussian"):
        codec = make_codec("turbo", {"bits": 4, "group": 16, "codebook": kind})
        err[kind] = float(((codec.decode(codec.encode(w)) - w) ** 2).mean())
    assert err["sphere"] < 0.97 * err["gaussian"]


def test_turbo_as_a_block_quantizer():
    """The solver path: fit a whole group, quantize it, pack its codes; the seed drives the signs."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    codec = make_codec("turbo", {"bits": 3, "group": 128, "seed": 11})
    assert codec.block_width == codec.group_size == 128
    params = [codec.fit(w[:, c:c + 128]) for c in (0, 128)]
    parts = [codec.quantize(w[:, c:c + 128], p) for c, p in zip((0, 128), params)]
    grid = torch.cat([q.values for q in parts], 1)
    packed = codec.pack(torch.cat([q.codes for q in parts], 1), params)
    assert torch.allclose(codec.decode(packed), grid, atol=1e-6)
    assert torch.equal(codec.decode(packed), codec.decode(codec.encode(w)))
    # an updated block (as GPTQ hands over after error feedback) is still coded with the fitted scale
    moved = codec.quantize(w[:, :128] + 0.01, params[0])
    repacked = codec.pack(torch.cat([moved.codes, parts[1].codes], 1), params)
    assert torch.allclose(codec.decode(repacked)[:, :128], moved.values, atol=1e-6)
    with pytest.raises(ValueError, match="whole groups"):
        codec.quantize(w[:, :64], params[0])
    other = make_codec("turbo", {"bits": 3, "group": 128, "seed": 12})
    assert not torch.equal(other.decode(other.encode(w)), codec.decode(packed))
    with pytest.raises(ValueError, match="seed"):
        other.decode(packed)


def _direct_lloyd_max(w, bits, g, scale):
    levels = codebook(bits).levels
    out = np.zeros_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            s = np.sqrt(np.mean(x ** 2)) if scale == "rms" else np.abs(x).max() / levels[-1]
            s = float(np.float16(s))
            if s == 0:
                continue
            out[r, c:c + g] = s * levels[np.abs(x[:, None] / s - levels[None, :]).argmin(1)]
    return out


@pytest.mark.parametrize("bits,g,scale", [(4, 32, "rms"), (3, 64, "absmax"), (2, 16, "rms"), (8, 64, "absmax")])
def test_lloyd_max_codec_matches_direct(bits, g, scale):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[0] = 0.0
    codec = make_codec("lloyd_max", {"bits": bits, "group": g, "scale": scale})
    packed = codec.encode(w)
    np.testing.assert_allclose(codec.decode(packed).double().numpy(),
                               _direct_lloyd_max(w.double().numpy(), bits, g, scale), rtol=1e-5, atol=1e-7)
    assert packed.bits_per_weight == bits + 16 / g
    assert codec.block_width == 1


@pytest.mark.parametrize("name,opts,field", [
    ("turbo", {"bits": 0}, "turbo.bits"), ("turbo", {"bits": 9}, "turbo.bits"),
    ("turbo", {"bits": 2, "group": 90}, "turbo.group"), ("turbo", {"bits": 2, "group": 1}, "turbo.group"),
    ("turbo", {"bits": 2, "seed": -1}, "turbo.seed"), ("turbo", {"bits": 2, "codebook": "laplace"}, "turbo.codebook"),
    ("turbo", {"bits": 2, "norm_correction": "yes"}, "turbo.norm_correction"),
    ("turbo", {"bits": 2, "nonsense": 1}, "turbo.nonsense"), ("turbo", {}, "turbo.bits: Field required"),
    ("lloyd_max", {"bits": 2.5}, "lloyd_max.bits"), ("lloyd_max", {"bits": 2, "scale": "max"}, "lloyd_max.scale"),
    ("lloyd_max", {"bits": 2, "group": 0}, "lloyd_max.group")])
def test_bad_options(name, opts, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_codec(name, opts)


def test_registered():
    assert {"turbo", "lloyd_max"} <= set(codec_names())
    with pytest.raises(ValueError, match="multiple of group size"):
        make_codec("turbo", {"bits": 4, "group": 64}).encode(torch.zeros(2, 96))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_turbo_on_cuda_matches_cpu():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    codec = make_codec("turbo", {"bits": 4, "group": 128})
    cpu = codec.decode(codec.encode(w))
    gpu = codec.decode(codec.encode(w.cuda()))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_experiment_seed_redraws_turbo_signs():
    """A seed changes what is random in an arm: turbo's rotation signs follow the run seed."""
    import torch

    from quantatlas.quant.codecs import make_codec
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.spec import Arm

    from quantatlas.context import RunContext

    codec = make_codec("turbo", {"bits": 3, "group": 64, "seed": 5})
    assert codec.seeded and codec.for_run(RunContext(0)) is codec
    other = codec.for_run(RunContext(2))
    assert other.seed == 7 and other.config() == {**codec.config(), "seed": 7}
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(codec.decode(codec.encode(w)), other.decode(other.encode(w)))
    assert Arm(codec={"turbo": {"bits": 3}}).seeded
    assert not Arm(codec={"uniform": {"bits": 3}}).seeded
    assert not Arm(codec={"uniform": {"bits": 3}}).seeded
