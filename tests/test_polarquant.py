"""PolarQuant (quant/polar.py, quant/codecs/polarquant.py): the polar transform inverts, the angle laws
match Gaussian vectors (and any vector after the Haar preconditioning), the codebooks meet the
Lloyd-Max conditions under those laws, the bits are what is stored, and the codec runs as a KV cache."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.codecs.polarquant import haar_rotation
from quantatlas.quant.polar import (
    angle_cdf,
    angle_codebook,
    angle_pdf,
    inverse_polar_transform,
    polar_transform,
)


@pytest.mark.parametrize("levels", [1, 3, 6])
def test_polar_transform_inverts(levels):
    g = torch.Generator().manual_seed(levels)
    x = torch.randn(500, 64, generator=g) * torch.rand(500, 1, generator=g) * 10
    angles, radii = polar_transform(x, levels)
    assert [a.shape[1] for a in angles] == [64 >> l for l in range(1, levels + 1)]
    assert radii.shape[1] == 64 >> levels
    assert float(angles[0].min()) >= 0 and float(angles[0].max()) < 2 * math.pi
    for a in angles[1:]:
        assert float(a.min()) >= 0 and float(a.max()) <= math.pi / 2
    back = inverse_polar_transform(angles, radii)
    torch.testing.assert_close(back, x, atol=2e-5 * float(x.abs().max()), rtol=0)   # fp32 rounding
    x64 = x.double()
    torch.testing.assert_close(inverse_polar_transform(*polar_transform(x64, levels)), x64, atol=1e-12, rtol=0)
    if levels == 6:                                   # the full recursion keeps one radius: the norm
        torch.testing.assert_close(radii[:, 0], x.norm(dim=1), rtol=1e-6, atol=0)


def _chi2_pvalue(samples: np.ndarray, level: int, pdf_level: int, bins: int = 24) -> float:
    """Chi-square goodness of fit of `samples` against f_{pdf_level}, bin probabilities from
    numerically integrating the pdf (scipy quad), bins equiprobable under the level's own CDF."""
    edges = np.interp(np.linspace(0, 1, bins + 1), angle_cdf(level, np.linspace(0, 2 * np.pi if level == 1
                      else np.pi / 2, 20001)), np.linspace(0, 2 * np.pi if level == 1 else np.pi / 2, 20001))
    probs = np.array([integrate.quad(lambda t: float(angle_pdf(pdf_level, t)), a, b, limit=200)[0]
                      for a, b in zip(edges[:-1], edges[1:])])
    counts = np.histogram(samples, edges)[0]
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return float(stats.chisquare(counts[keep], expected).pvalue)


def test_angle_laws_match_gaussian_vectors():
    """f_1 uniform on [0, 2π); f_l ∝ sin^(2^(l-1)-1)(2ψ) on [0, π/2]: a Monte-Carlo histogram of N(0, I_64)
    vectors' angles fits each level's law (chi-square), and a neighbouring level's law does not."""
    x = torch.randn(6000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles, _ = polar_transform(x, 6)
    for level, a in enumerate(angles, 1):
        samples = a.flatten().numpy()
        assert _chi2_pvalue(samples, level, level) > 1e-3, level
        if level >= 2:
            assert _chi2_pvalue(samples, level, level + 1) < 1e-8, level   # the test can fail
        # the pdf integrates to the CDF the codebooks' masses rest on
        top = 2 * np.pi if level == 1 else np.pi / 2
        for t in (0.3 * top, 0.5 * top, 0.77 * top):
            got = integrate.quad(lambda s: float(angle_pdf(level, s)), 0, t, limit=200)[0]
            assert got == pytest.approx(float(angle_cdf(level, t)), abs=1e-9)


def test_haar_preconditioning_gives_the_laws_to_any_vector():
    """One fixed spiky vector, rotated by 400 seeds' Haar matrices: its angles follow the same laws (KS),
    which a plain vector's do not (its level-2 angles are far from f_2)."""
    spiky = torch.zeros(32, dtype=torch.float64)
    spiky[:3] = torch.tensor([9.0, -4.0, 1.0])
    rotated = torch.stack([haar_rotation(32, s) @ spiky for s in range(400)])
    q = haar_rotation(32, 7)
    torch.testing.assert_close(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-12, rtol=0)
    angles, _ = polar_transform(rotated, 5)
    for level, a in enumerate(angles, 1):
        p = stats.kstest(a.flatten().numpy(), lambda t, lv=level: angle_cdf(lv, t)).pvalue
        assert p > 1e-3, level
    raw, _ = polar_transform(spiky[None].repeat(400, 1), 5)
    assert stats.kstest(raw[1].flatten().numpy(), lambda t: angle_cdf(2, t)).pvalue < 1e-8


@pytest.mark.parametrize("level", [2, 3, 5, 8])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codebooks_meet_the_lloyd_max_conditions(level, bits):
    """Each level is the centroid of its cell under f_l (scipy quad, independent of the codec's own
    quadrature) and the cells are cut at midpoints. f_l is log-concave ((m-1)·log sin 2ψ), so these
    conditions have one solution (Fleischer 1964): the Lloyd-Max quantizer."""
    cb = angle_codebook(level, bits)
    assert len(cb.levels) == 1 << bits and np.all(np.diff(cb.levels) > 0)
    np.testing.assert_allclose(cb.thresholds, 0.5 * (cb.levels[1:] + cb.levels[:-1]), atol=1e-15)
    edges = np.concatenate([[0.0], cb.thresholds, [np.pi / 2]])
    mse = 0.0
    for c, a, b in zip(cb.levels, edges[:-1], edges[1:]):
        mass = integrate.quad(lambda t: float(angle_pdf(level, t)), a, b, limit=200, epsabs=1e-14)[0]
        first = integrate.quad(lambda t: t * float(angle_pdf(level, t)), a, b, limit=200, epsabs=1e-14)[0]
        assert first / mass == pytest.approx(c, abs=1e-8)
        mse += integrate.quad(lambda t: (t - c) ** 2 * float(angle_pdf(level, t)), a, b, limit=200)[0]
    assert cb.mse == pytest.approx(mse, rel=1e-6)
    np.testing.assert_allclose(cb.levels + cb.levels[::-1], np.pi / 2, atol=1e-12)   # symmetric about π/4


def test_level_one_codebook_is_uniform():
    cb = angle_codebook(1, 4)
    np.testing.assert_allclose(cb.levels, (np.arange(16) + 0.5) * 2 * np.pi / 16, atol=1e-15)
    assert cb.mse == pytest.approx((2 * np.pi / 16) ** 2 / 12)


def _slow_polarquant(w: np.ndarray, rotation: np.ndarray, bits: list[int]) -> np.ndarray:
    """The algorithm one vector and one pair at a time (math.atan2, nearest level by search, circular
    distance at level 1), for the codec's output to be checked against."""
    out = []
    for x in w.astype(np.float64):
        y = rotation @ x
        angles, r = [], list(y)
        for level in range(1, len(bits) + 1):
            psi = [math.atan2(r[2 * j + 1], r[2 * j]) % (2 * math.pi) if level == 1
                   else math.atan2(r[2 * j + 1], r[2 * j]) for j in range(len(r) // 2)]
            r = [math.hypot(r[2 * j], r[2 * j + 1]) for j in range(len(r) // 2)]
            lv = angle_codebook(level, bits[level - 1]).levels
            if level == 1:
                dist = lambda p: np.abs(np.angle(np.exp(1j * (lv - p))))   # noqa: E731
            else:
                dist = lambda p: np.abs(lv - p)                             # noqa: E731
            angles.append([lv[int(np.argmin(dist(p)))] for p in psi])
        r = [float(np.float16(v)) for v in r]
        for psi in reversed(angles):
            r = [v for rr, p in zip(r, psi) for v in (rr * math.cos(p), rr * math.sin(p))]
        out.append(rotation.T @ np.array(r))
    return np.array(out)


def test_codec_equals_a_slow_direct_implementation_and_decodes_what_it_encodes():
    codec = make_codec("polarquant", {"bits": [4, 2, 2, 2], "seed": 3})
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1)) * 3
    packed = codec.encode(w)
    got = codec.decode(packed)
    want = _slow_polarquant(w.numpy(), haar_rotation(64, 3).numpy(), [4, 2, 2, 2])
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4 * float(w.abs().max()))
    assert torch.equal(got, codec.fake_quantize(w))                 # what a KV cache reads = what it stores
    assert torch.equal(packed.decode(), got)                        # a pack decodes from its own contents
    rel = float(((got - w) ** 2).mean() / (w ** 2).mean())
    assert 0.02 < rel < 0.045   # the per-level angle MSEs add up: 0.0129 + 0.0099 + 0.0062 + 0.0034 = 0.032
    other = make_codec("polarquant", {"bits": [4, 2, 2, 2], "seed": 4})
    assert not torch.equal(other.decode(other.encode(w)), got)      # the seed draws another Π
    from quantatlas.context import RunContext
    run = codec.for_run(RunContext(2))
    assert run.cfg.seed == 5 and torch.equal(run.encode(w).decode(), other.for_run(RunContext(1)).encode(w).decode())


@pytest.mark.parametrize("options, shape, angle_bits, radii", [
    ({"bits": [4, 2, 2, 2]}, (1024, 64), 32 * 4 + 16 * 2 + 8 * 2 + 4 * 2, 4),      # the paper's 3.875
    ({"bits": 3}, (512, 128), 127 * 3, 1),                                         # full recursion: 7 levels
    ({"bits": 2, "levels": 3, "group": 32}, (256, 96), 3 * (16 + 8 + 4) * 2, 3 * 4),
])
def test_bits_are_counted_from_the_stored_parts(options, shape, angle_bits, radii):
    codec = make_codec("polarquant", options)
    rows, cols = shape
    packed = codec.encode(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    per_row = angle_bits + 16 * radii
    assert packed.nbytes == sum(math.ceil(rows * n * b / 8) for n, b in _level_counts(options, cols)) \
        + rows * radii * 2 + 8
    assert packed.bits_per_weight == pytest.approx(per_row / cols + 64 / (rows * cols), abs=1e-12)
    assert codec.bits_per_weight(shape) == packed.bits_per_weight
    if options == {"bits": [4, 2, 2, 2]}:
        assert per_row / cols == 3.875


def _level_counts(options, cols):
    """(angles per row at a level, bits) for each level."""
    g = options.get("group") or cols
    bits = options["bits"] if isinstance(options["bits"], list) else \
        [options["bits"]] * (options.get("levels") or int(math.log2(g & -g)))
    return [((cols // g) * (g >> level), b) for level, b in enumerate(bits, 1)]


def test_config_errors_name_the_field():
    from quantatlas.quant.config import ConfigError

    with pytest.raises(ConfigError, match=r"polarquant\.bits: .*1 to 8"):
        make_codec("polarquant", {"bits": [4, 9]})
    with pytest.raises(ConfigError, match=r"polarquant: levels: 3 levels with bits for 4"):
        make_codec("polarquant", {"bits": [4, 2, 2, 2], "levels": 3})
    with pytest.raises(ConfigError, match=r"group: 4 levels need a group divisible by 16"):
        make_codec("polarquant", {"bits": [4, 2, 2, 2], "group": 40})
    with pytest.raises(ValueError, match=r"4 levels need vectors of a multiple of 16 values, got 40"):
        make_codec("polarquant", {"bits": [4, 2, 2, 2]}).encode(torch.randn(2, 40))


def test_polarquant_as_a_kv_cache_on_the_reference_model(tiny_reference):
    """Both halves through PolarQuant, one vector per token and head (head_dim 32): bits per value as
    stored, more bits less KLD, and the seed draws another preconditioner."""
    from quantatlas.runner import run_spec
    from quantatlas.spec import parse_spec

    def arm(bits):
        return {"kv": {"k": {"polarquant": {"bits": bits}}, "v": {"polarquant": {"bits": bits}}}}

    spec = parse_spec({"title": "polar", "data": {"eval": {"tokens": 512, "ctx": 64}}, "control": "p4222",
                       "arms": {"p4222": arm([4, 2, 2, 2]), "p1111": arm([1, 1, 1, 1])}})
    assert spec.arms["p4222"].seeded
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    r = {name: a["seeds"]["0"] for name, a in doc["arms"].items()}
    from quantatlas.quant.kv import BITS_ROWS, KVCacheConfig, KVCacheQuantizer
    assert r["p4222"]["kv_bits"] == pytest.approx(3.875 + 64 / (BITS_ROWS * 32))
    assert r["p1111"]["kv_bits"] == pytest.approx((16 + 8 + 4 + 2 + 2 * 16) / 32 + 64 / (BITS_ROWS * 32))
    assert 0 < r["p4222"]["kld_mean"] < r["p1111"]["kld_mean"]
    # another run seed, another preconditioner, other logits
    tokens = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    logits = []
    for seed in (0, 1):
        model = copy.deepcopy(tiny_reference.model)
        KVCacheQuantizer(KVCacheConfig.model_validate(arm([4, 2, 2, 2])["kv"]), seed).attach(model)
        with torch.no_grad():
            logits.append(model(tokens).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4
