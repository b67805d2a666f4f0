"""Freeze-dry (quant/freeze_dry.py, quant/steps/freeze_dry.py): what decode rebuilds is what the filter
promised, the drop rule matches a row-by-row walk, bits and bytes come from the stored parts, and the
step runs in an arm with the model holding the rebuilt weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantatlas.quant.codecs import make_codec
from quantatlas.quant.freeze_dry import FLAG, FrozenPacked, freeze_dry
from quantatlas.quant.incoherence import read_pack


def _smooth(rows=48, cols=256, seed=0):
    """Rows with correlated neighbours (a random walk plus noise): the interpolation has something to predict."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).cumsum(1) * 0.1 + 0.05 * torch.randn(rows, cols, generator=g)


def _walk(values: np.ndarray, coef: np.ndarray, tol: float) -> np.ndarray:
    """The drop rule one weight at a time: an interior weight is dropped when its neighbours' prediction
    is within tol·RMS(row) of it and its left neighbour was kept (so both neighbours stay kept)."""
    rows, cols = values.shape
    a, b = (np.float32(c) for c in coef)
    mask = np.zeros((rows, cols), dtype=bool)
    for i in range(rows):
        bound = np.float32(tol) * np.sqrt(np.mean(values[i].astype(np.float32) ** 2, dtype=np.float32))
        for j in range(1, cols - 1):
            p = a * values[i, j - 1] + b * values[i, j + 1]
            mask[i, j] = abs(p - values[i, j]) <= bound and not mask[i, j - 1]
    return mask


CODECS = [("uniform", {"bits": 4, "group": 128}), ("uniform", {"bits": 3, "group": 64, "symmetric": False}),
          ("lloyd_max", {"bits": 3, "group": 128})]


@pytest.mark.parametrize("name, options", CODECS)
@pytest.mark.parametrize("tol", [0.05, 0.3])
def test_decode_rebuilds_what_the_filter_promised(name, options, tol):
    w = _smooth()
    packed = make_codec(name, options).encode(w)
    values = packed.decode()
    frozen = freeze_dry(packed, tol)
    # the coefficients: least squares of V_ij on (V_i,j-1, V_i,j+1), by numpy, rounded to fp16
    v = values.double().numpy()
    X = np.stack([v[:, :-2].ravel(), v[:, 2:].ravel()], 1)
    want = np.linalg.lstsq(X, v[:, 1:-1].ravel(), rcond=None)[0].astype(np.float16)
    np.testing.assert_array_equal(frozen.coef.numpy(), want)
    assert abs(float(frozen.coef[0])) > 0.2         # smooth rows: the neighbours do predict
    # the mask is the walk's, and no two dropped weights touch, nor the first and last columns
    mask = frozen.mask.numpy()
    np.testing.assert_array_equal(mask, _walk(values.numpy(), frozen.coef.float().numpy(), tol))
    assert not (mask[:, 1:] & mask[:, :-1]).any() and not mask[:, 0].any() and not mask[:, -1].any()
    assert 0.02 < mask.mean() < 0.5
    # kept weights exact, dropped ones within tol × their row's RMS of the code value
    rebuilt = frozen.decode()
    assert torch.equal(rebuilt[~frozen.mask], values[~frozen.mask])
    bound = (tol * values.pow(2).mean(1, keepdim=True).sqrt()).expand_as(values)
    assert ((rebuilt - values).abs()[frozen.mask] <= bound[frozen.mask]).all()
    assert (rebuilt != values)[frozen.mask].float().mean() > 0.5   # the dropped ones are rebuilt, not stored
    # the file's parts alone decode to the same matrix
    again = read_pack(frozen.codec, frozen.config, frozen.shape, frozen.parts())
    assert isinstance(again, FrozenPacked) and torch.equal(again.decode(), rebuilt)
    assert again.config[FLAG] == tol


def test_bits_and_bytes_are_counted_from_the_stored_parts():
    from quantatlas.eval.bits import Artifact, load_artifact

    w = _smooth(rows=64, cols=256, seed=1)
    packed = make_codec("uniform", {"bits": 4, "group": 128}).encode(w)
    frozen = freeze_dry(packed, 0.2)
    rows, cols = w.shape
    kept = int((~frozen.mask).sum())
    parts = frozen.parts()
    assert set(parts) == {"scale", "codes", "freeze_mask", "freeze_coef"}
    assert parts["codes"].numel() == math.ceil(kept * 4 / 8)                # only the kept codes
    assert parts["freeze_mask"].numel() == math.ceil(rows * cols / 8)        # one bit per weight
    assert frozen.nbytes == packed.data["scale"].numel() * 2 + math.ceil(kept * 4 / 8) + rows * cols // 8 + 4
    assert frozen.bits_per_weight == 8 * frozen.nbytes / (rows * cols)
    # through the artifact file: counted and decoded from what the file holds
    art = Artifact({"m.weight": frozen}, {"n.weight": torch.ones(8)})
    sizes = art.measure(compress=True)
    assert sizes["bytes_packed"] == frozen.nbytes + 16
    back, _ = load_artifact(art.to_bytes())
    assert torch.equal(back.packed["m.weight"].decode(), frozen.decode())
    import zstandard
    assert sizes["bytes_zstd"] == len(zstandard.ZstdCompressor(level=22).compress(art.to_bytes()))


def test_codecs_without_plain_codes_are_refused():
    from quantatlas.quant.incoherence import Incoherence

    w = torch.randn(16, 256)
    for name, opts in [("e8p", {"bits": 2}), ("q4_0", {}), ("sparse24", {"bits": 4})]:
        with pytest.raises(ValueError, match="freeze-dry filters scalar codecs"):
            freeze_dry(make_codec(name, opts).encode(w), 0.1)
    inc = Incoherence(16, 256, 0).wrap(make_codec("uniform", {"bits": 4}).encode(w))
    with pytest.raises(ValueError, match="incoherence"):
        freeze_dry(inc, 0.1)


def _spec(**extra):
    four = {"uniform": {"bits": 4, "group": 32}}
    return {"title": "fd", "model": "tiny", "data": {"eval": {"tokens": 512, "ctx": 64}}, "control": "int4",
            "arms": {"int4": {"codec": four}, "int4_fd": {"codec": four, "freeze_dry": {"tol": 0.3}, **extra}}}


def test_the_spec_refuses_an_arm_it_cannot_filter_before_any_work():
    from quantatlas.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=r"arms\.int4_fd\.freeze_dry: .*codec e8p does not store one code"):
        parse_spec(_spec(codec={"e8p": {"bits": 2}}))
    with pytest.raises(SpecError, match=r"arms\.int4_fd\.freeze_dry: .*incoherence"):
        parse_spec(_spec(solver="gptq", solver_options={"incoherence": True}))
    with pytest.raises(SpecError, match=r"arms\.int4_fd\.freeze_dry\.tol"):
        parse_spec(_spec(freeze_dry={"tol": 2}))


def test_the_step_filters_every_matrix_and_the_model_holds_what_loads(tiny_reference):
    from quantatlas.eval.bits import artifact_of
    from quantatlas.measure import quantize_arm
    from quantatlas.spec import parse_spec

    spec = parse_spec(_spec())
    assert spec.to_dict()["arms"]["int4_fd"]["freeze_dry"] == {"tol": 0.3}
    assert "freeze_dry" not in spec.to_dict()["arms"]["int4"]
    qm = quantize_arm(tiny_reference, spec, "int4_fd", 0, "cpu")
    params = dict(qm.model.named_parameters())
    assert qm.packed and all(isinstance(p, FrozenPacked) for p in qm.packed.values())
    for name, p in qm.packed.items():
        assert torch.equal(params[name].float(), p.decode().to(params[name].dtype).float()), name
    assert 0 < qm.records["freeze_dry"]["freeze_dropped"] < 0.5
    base = quantize_arm(tiny_reference, spec, "int4", 0, "cpu")
    sizes, base_sizes = (artifact_of(m.model, m.packed).measure(compress=False) for m in (qm, base))
    assert sizes["bits_per_weight"] == pytest.approx(8 * sum(p.nbytes for p in qm.packed.values())
                                                     / sum(p.shape[0] * p.shape[1] for p in qm.packed.values()))
    assert sizes["bytes_packed"] - base_sizes["bytes_packed"] == sum(
        f.nbytes - b.nbytes for f, b in zip(qm.packed.values(), base.packed.values()))
    # the filter left the codes it kept as the weights step made them
    assert all(torch.equal(f.inner.data["codes"], b.data["codes"]) for f, b in zip(qm.packed.values(),
                                                                                   base.packed.values()))


def test_a_norm_an_override_quantizes_is_left_as_packed(tiny_reference):
    """A q_norm gain an override quantizes is one vector (no row neighbours): the step used to fail on it with an
    IndexError; it filters the matrices and leaves the vector's pack as the weights step made it."""
    from quantatlas.measure import quantize_arm
    from quantatlas.spec import parse_spec

    norm = {"match": "q_norm", "codec": {"uniform": {"bits": 4, "group": 32}}}
    spec = parse_spec(_spec(overrides=[norm]))
    qm = quantize_arm(tiny_reference, spec, "int4_fd", 0, "cpu")
    vectors = {n: p for n, p in qm.packed.items() if "q_norm" in n}
    assert vectors and not any(isinstance(p, FrozenPacked) for p in vectors.values())
    assert all(isinstance(p, FrozenPacked) for n, p in qm.packed.items() if n not in vectors)


def test_a_group_wider_than_any_matrix_is_refused_against_the_model_not_allocated(tiny_reference):
    """The spec-time probe of a freeze-dried codec used to encode one group of zeros: group 10^9 asked for 208 GB.
    The group is now left to the weights step, which refuses it against the model's matrices."""
    from quantatlas.errors import UserError
    from quantatlas.quant.pipeline import check_backend
    from quantatlas.spec import parse_spec

    spec = parse_spec(_spec(codec={"uniform": {"bits": 4, "group": 10 ** 9}}))
    with pytest.raises(UserError, match="arms.int4_fd.codec: .*64 columns are not a multiple of group size") as e:
        check_backend(tiny_reference, spec.arms["int4_fd"], "arms.int4_fd")
    assert e.value.field == "arms.int4_fd.codec"
