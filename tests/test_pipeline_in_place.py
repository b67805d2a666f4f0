"""`quantize(..., in_place=True)` (quant/pipeline.py): the steps change the loaded model itself instead of
a copy, and compute exactly what they compute on the copy, including the steps that read fp weights after
the working model exists (recovery's teacher, GPTQ's propagation)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from quantatlas.context import RunContext
from quantatlas.models.load import LoadedModel
from quantatlas.quant.pipeline import Calibration, quantize
from quantatlas.spec import Arm

STREAM = np.random.default_rng(1).integers(0, 256, 20000)
EVAL = np.random.default_rng(2).integers(0, 256, 4000)   # recovery checks its windows keep off the eval tokens

ARMS = {
    "rtn": {"codec": {"uniform": {"bits": 3, "group": 32}}},
    # GPTQ's propagation reads the working model as its layers change; the fp teacher of recovery is
    # copied from the working model before its weights change
    "gptq_recovery": {"solver": "gptq", "codec": {"uniform": {"bits": 3, "group": 32}},
                      "recovery": {"method": "kd_ste", "train": "scales_norms", "steps": 1, "lr": 0.01,
                                   "samples": 2, "seq_len": 16, "batch": 2}},
}


@pytest.mark.parametrize("name", sorted(ARMS))
def test_in_place_equals_the_copy_and_changes_the_loaded_model(tiny_reference, name):
    arm = Arm.model_validate(ARMS[name])
    mine = LoadedModel(copy.deepcopy(tiny_reference.model), "tiny", "tiny-qwen3-seed0", None)
    fp = {k: v.clone() for k, v in mine.model.state_dict().items()}
    cal = lambda: Calibration(load=lambda: STREAM, samples=2, seq_len=16, held_out=lambda: EVAL,
                                  held_out_tokens=1024)  # noqa: E731

    on_copy = quantize(mine, arm, cal(), RunContext(0))
    assert on_copy.model is not mine.model
    assert all(torch.equal(fp[k], v) for k, v in mine.model.state_dict().items())   # the copy left it alone

    in_place = quantize(mine, arm, cal(), RunContext(0), in_place=True)
    assert in_place.model is mine.model                                               # no second model
    got, want = in_place.model.state_dict(), on_copy.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    changed = [k for k in fp if not torch.equal(fp[k], got[k])]
    assert any(k.endswith("down_proj.weight") for k in changed)                      # it was quantized there
    assert set(in_place.packed) == set(on_copy.packed)
    for k, p in on_copy.packed.items():
        q = in_place.packed[k]
        assert set(p.parts()) == set(q.parts()) and all(torch.equal(p.parts()[t], q.parts()[t]) for t in p.parts())
