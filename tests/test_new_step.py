"""A new kind of step is one file: its config and its `Step`. This file is that file for a toy step
(`weight_noise`: seeded Gaussian noise added to every decoder matrix, scaled by each row's RMS), and
runs it through the spec, the runner, the ledger's composition view and the layer-streaming refusal
without touching any other file."""
from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from quantatlas.quant.steps import Step


# ---- the step: one config class, one Step -------------------------------------------------------
class WeightNoiseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    std: float = Field(gt=0, le=1)   # noise RMS relative to each row's RMS


class WeightNoiseStep(Step):
    field = "weight_noise"
    order = 35                 # after the weights, before recovery
    config = WeightNoiseConfig

    def seeded(self) -> bool:
        return True            # the noise is drawn from the run seed

    def needs_whole_model(self) -> str | None:
        return "the toy noise step wants every matrix at once"

    def quantizes(self) -> bool:
        return True

    def apply(self, state, ctx) -> None:
        gen = ctx.torch_generator("weight_noise")
        with torch.no_grad():
            for name, p in state.working_model().named_parameters():
                if p.dim() == 2 and ".layers." in name:
                    rms = p.pow(2).mean(1, keepdim=True).sqrt()
                    p.add_(self.value.std * rms * torch.randn(p.shape, generator=gen).to(p))


# ---- through the project --------------------------------------------------------------------------
def _spec(seeds=(0, 1)):
    return {"title": "toy step", "model": "tiny", "seeds": list(seeds),
            "data": {"eval": {"tokens": 2048, "ctx": 256}, "calib": {"samples": 4, "seq_len": 64}},
            "arms": {"rtn4": {"codec": {"uniform": {"bits": 4, "group": 32}}},
                     "noisy": {"codec": {"uniform": {"bits": 4, "group": 32}}, "weight_noise": {"std": 0.05}}},
            "control": "rtn4"}


def test_spec_accepts_validates_and_keys_the_step():
    from quantatlas.runner import arm_key
    from quantatlas.spec import SpecError, parse_spec

    spec = parse_spec(_spec())
    assert spec.arms["noisy"].weight_noise == WeightNoiseConfig(std=0.05)
    assert spec.arms["noisy"].seeded and not spec.arms["rtn4"].seeded
    assert spec.to_dict()["arms"]["noisy"]["weight_noise"] == {"std": 0.05}
    # an arm without the step keeps its key and the experiment id ignores an unset step
    assert "weight_noise" not in spec.to_dict()["arms"]["rtn4"]
    assert parse_spec(spec.to_dict()).spec_hash() == spec.spec_hash()
    bare = parse_spec({**_spec(), "arms": {"rtn4": _spec()["arms"]["rtn4"]}, "control": None})
    assert arm_key(bare.arms["rtn4"].model_dump(mode="json"), "m", "e") == \
        arm_key(spec.arms["rtn4"].model_dump(mode="json"), "m", "e")
    with pytest.raises(SpecError, match=r"arms\.noisy\.weight_noise\.std: .*less than or equal to 1"):
        parse_spec({**_spec(), "arms": {"noisy": {"weight_noise": {"std": 5}}}, "control": None})
    with pytest.raises(SpecError, match=r"arms\.noisy\.weight_nose: Extra inputs are not permitted"):
        parse_spec({**_spec(), "arms": {"noisy": {"weight_nose": {"std": 0.1}}}, "control": None})


def test_runner_runs_it_and_the_ledger_composes_it(tiny_reference, tmp_path):
    from quantatlas.atlas.ledger import Ledger
    from quantatlas.runner import run_spec
    from quantatlas.web.landscape import composition

    db = f"sqlite:///{tmp_path / 'atlas.db'}"
    doc = run_spec(_spec(), loaded=tiny_reference, db_url=db, compress=False, log=lambda m: None, device="cpu")
    base, noisy = doc["arms"]["rtn4"]["seeds"], doc["arms"]["noisy"]["seeds"]
    assert "reused_from_seed" in base["1"] and "reused_from_seed" not in noisy["1"]   # seeded: run per seed
    assert noisy["0"]["kld_mean"] > base["0"]["kld_mean"]
    assert noisy["0"]["kld_mean"] != noisy["1"]["kld_mean"]                            # another seed, other noise
    assert noisy["0"]["bits_per_weight"] == base["0"]["bits_per_weight"]
    with Ledger(db) as led:
        comp = composition(led)
    assert "weight_noise" in comp["techniques"]


def test_streaming_refuses_it_before_any_work(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantatlas.models.load import load_model
    from quantatlas.models.stream import StreamError
    from quantatlas.runner import run_spec

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "eval.txt").write_text("abc " * 600)
    spec = {**_spec((0,)), "model": str(tmp_path / "m"),
            "data": {"eval": {"tokens": 512, "ctx": 128, "source": str(tmp_path / "eval.txt")}}}
    with pytest.raises(StreamError, match=r"arms\.noisy\.weight_noise: the toy noise step wants every matrix"):
        run_spec(spec, loaded=load_model(str(tmp_path / "m"), stream=True), ledger=False, compress=False,
                 log=lambda m: None, device="cpu")


def test_a_model_the_layout_cannot_read_is_refused_before_the_ledger_holds_anything(tmp_path):
    """A mixture of experts of a family the layout does not read (PhiMoE; Mixtral and Qwen-MoE it reads:
    tests/test_moe.py) is refused in one line, and the ledger keeps no empty experiment behind."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from quantatlas.atlas.ledger import Ledger
    from quantatlas.errors import UserError
    from quantatlas.models.load import LoadedModel
    from quantatlas.runner import run_spec

    cfg = PhimoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                       max_position_embeddings=256)
    lm = LoadedModel(PhimoeForCausalLM(cfg).eval(), "moe", "moe-hash", None)
    db = f"sqlite:///{tmp_path / 'atlas.db'}"
    with pytest.raises(UserError) as e:
        run_spec(_spec((0,)), loaded=lm, db_url=db, compress=False, log=lambda m: None, device="cpu")
    assert e.value.field == "model" and "\n" not in str(e.value)
    with Ledger(db) as led:
        assert led.rows() == []
