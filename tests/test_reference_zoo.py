"""The zoo of embedded reference models: `reference-llama` (Llama, no q/k norms) and `reference-moe`
(Qwen3-MoE, 8 experts, top-2) beside `reference` (Qwen3): each loads offline by its `model:` name, its
card's figures come back from its committed checkpoint, and `quantatlas reference train --arch` builds
each architecture."""
import json
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import quantatlas.reference.model as zoo
from quantatlas.cli import app
from quantatlas.reference import data, splits
from quantatlas.reference.model import (ARCHES, ZOO_ARCH, ZOO_NAME, active_parameters, checkpoint_dir, load_reference,
                                        reference_weights)
from quantatlas.reference.train import CHECK_TOKENS, TrainConfig, bits_per_byte, expert_token_share, train

MEMBERS = ["reference-llama", "reference-moe"]


def trained(name: str):
    return pytest.mark.skipif(not reference_weights(name).exists(), reason=f"{name} not trained")


def safetensors_dtypes(path) -> set[str]:
    """The dtypes a safetensors file stores, read from its JSON header (8-byte little-endian length first)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_names_archs_and_folders_are_one_table():
    assert ZOO_ARCH == {"reference": "qwen3", "reference-llama": "llama", "reference-moe": "qwen3_moe"}
    assert {ZOO_NAME[a] for a in ARCHES} == set(ZOO_ARCH)
    assert checkpoint_dir("qwen3") == zoo.CHECKPOINT_DIR     # reference's folder is where it always was
    assert len({checkpoint_dir(a) for a in ARCHES}) == 3
    with pytest.raises(ValueError, match="unknown reference architecture 'mixtral'"):
        checkpoint_dir("mixtral")


@pytest.mark.parametrize("name", [pytest.param(n, marks=trained(n)) for n in MEMBERS])
def test_zoo_member_loads_offline_and_its_card_reproduces(name, monkeypatch):
    from quantatlas.models.load import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = reference_weights(name)
    assert weights.stat().st_size <= 25 * 2 ** 20 and safetensors_dtypes(weights) == {"F16"}
    card = json.loads((weights.parent / "card.json").read_text())
    assert card["model"] == name and card["arch"] == ZOO_ARCH[name] and card["stored_dtype"] == "float16"
    assert f"--arch {ZOO_ARCH[name]} --steps 1000 --seed 0" in card["command"]
    assert card["train"] == json.loads((zoo.CHECKPOINT_DIR / "card.json").read_text())["train"]  # reference's budget
    assert card["validation_split_sha256"] == data.manifest()["files"]["validation"]["sha256"]

    lm = load_model(name)
    model = lm.model
    assert lm.source == name and lm.tokenizer is None and not model.training
    assert card["parameters"] == sum(p.numel() for p in model.parameters()) == lm.n_params
    assert card["active_parameters"] == active_parameters(model)
    names = [n for n, _ in model.named_parameters()]
    if name == "reference-llama":
        assert model.config.model_type == "llama" and not any("q_norm" in n or "k_norm" in n for n in names)
        assert card["parameters"] == card["active_parameters"]
    else:
        cfg = model.config
        assert cfg.model_type == "qwen3_moe" and (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
        assert any("k_norm" in n for n in names)
        layer = model.model.layers[0].mlp
        assert tuple(layer.experts.gate_up_proj.shape) == (8, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        assert tuple(layer.gate.weight.shape) == (8, cfg.hidden_size)
        # each token uses the attention, norms, embeddings, routers and 2 of 8 experts
        expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        assert card["active_parameters"] == card["parameters"] - expert + expert // 4

    # the card's quick check (the first 8 validation windows) is what the stored weights give here
    check = card["validation_check"]
    val = splits.fixed_tokens("validation", check["tokens"] + 1)
    assert bits_per_byte(model, val, check["seq_len"], "cpu") == pytest.approx(check["bits_per_byte"], abs=2e-4)
    assert card["validation_bits_per_byte"] < 4.0 and check["bits_per_byte"] < 4.0  # far from uniform bytes (8)
    if name == "reference-moe":
        share = expert_token_share(model, val, check["seq_len"], "cpu")
        assert torch.allclose(share.sum(dim=1), torch.ones(share.shape[0], dtype=share.dtype))
        # a near-tie of two router logits may pick the other expert under another thread count: allow two of
        # a layer's 8192 (token, slot) pairs
        slots = 2 / (check["tokens"] * 2)
        assert float(share.min()) == pytest.approx(check["expert_token_share"]["min"], abs=slots + 1e-4)
        assert float(share.max()) == pytest.approx(check["expert_token_share"]["max"], abs=slots + 1e-4)
        assert float(share.min()) > 0   # no expert is dead on the validation text


@pytest.mark.parametrize("name", [pytest.param(n, marks=trained(n)) for n in MEMBERS])
def test_each_member_has_its_own_hash_and_reference_logits(name):
    """Same eval tokens (one fingerprint), different weights: the model hash and so the reference-logit
    cache key differ, and each model's cached log-probs are its own."""
    from quantatlas.eval.windows import make_eval_set, reference_logprobs
    from quantatlas.models.load import load_model

    ref, member = load_model("reference"), load_model(name)
    assert ref.model_hash != member.model_hash
    es = make_eval_set(ref.text_tokens("stdlib", "eval"), 128, 64)
    assert es.fingerprint == make_eval_set(member.text_tokens("stdlib", "eval"), 128, 64).fingerprint
    a = np.array(reference_logprobs(ref.model, ref.model_hash, es, "cpu"))
    b = np.array(reference_logprobs(member.model, member.model_hash, es, "cpu"))
    with torch.no_grad():
        direct = torch.log_softmax(member.model(es.windows).logits[:, es.first:-1].float(), -1).reshape(b.shape)
    assert np.allclose(b, direct.numpy(), atol=1e-5) and not np.allclose(a, b, atol=1e-2)
    again = reference_logprobs(member.model, member.model_hash, es, "cpu")   # read back from the cache
    assert np.array_equal(np.asarray(again), b)


@pytest.mark.parametrize("arch", ARCHES)
def test_train_arch_builds_that_architecture(arch, tmp_path, monkeypatch):
    import quantatlas.reference.train as train_module

    # the architecture is the point here, not the corpus: a shipped stream instead of reading the standard library
    monkeypatch.setattr(train_module, "stdlib_tokens", lambda split: splits.fixed_tokens("calib", 20_000))
    monkeypatch.setattr(train_module, "corpus_files", lambda split: ())    # (the card's file counts)
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=16, val_tokens=32)
    card = train(cfg, tmp_path, arch=arch)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == arch
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.float16}
    keys = list(state)
    assert any("k_norm" in k for k in keys) == (arch != "llama")
    assert any(".mlp.experts." in k for k in keys) == (arch == "qwen3_moe")
    assert card["parameters"] == sum(v.numel() for v in state.values())
    if arch == "qwen3":   # reference's card keeps exactly the fields it was committed with
        assert list(card) == list(json.loads((zoo.CHECKPOINT_DIR / "card.json").read_text()))[:len(card)]
        assert "--arch" not in (tmp_path / "CARD.md").read_text()
    else:
        assert card["model"] == ZOO_NAME[arch]
        assert card["command"].startswith(f"quantatlas reference train --arch {arch}")
        assert card["validation_check"]["tokens"] == CHECK_TOKENS
        assert f"`python -m quantatlas.reference.train validate {ZOO_NAME[arch]}`" in (tmp_path / "CARD.md").read_text()
    if arch == "qwen3_moe":
        assert card["active_parameters"] < card["parameters"]
        assert {"num_experts": 8, "num_experts_per_tok": 2}.items() <= card["config"].items()
        # the load-balancing loss reached the routers: one step moved every layer's router weights
        gate = state["model.layers.0.mlp.gate.weight"].float()
        torch.manual_seed(cfg.seed)
        init = zoo.causal_lm_class(arch)(zoo.reference_config(arch)).model.layers[0].mlp.gate.weight
        assert not torch.allclose(gate, init.detach().half().float())


def test_cli_arch_option(tmp_path, monkeypatch):
    import quantatlas.reference.train as train_module

    seen = {}

    def fake_train(cfg, out_dir=None, progress=None, arch="qwen3"):
        seen.update(arch=arch, out=out_dir, steps=cfg.steps)
        return {"validation_bits_per_byte": 2.0, "train_seconds": 0.0}

    monkeypatch.setattr(train_module, "train", fake_train)
    r = CliRunner().invoke(app, ["reference", "train", "--arch", "llama", "--steps", "3", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert seen == {"arch": "llama", "out": tmp_path, "steps": 3}
    r = CliRunner().invoke(app, ["reference", "train", "--steps", "3"])
    assert r.exit_code == 0 and seen["arch"] == "qwen3" and seen["out"] is None
    r = CliRunner().invoke(app, ["reference", "train", "--arch", "mixtral"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip() == "error: field arch: 'mixtral' is not one of qwen3, llama, qwen3_moe"


@pytest.mark.parametrize("name,arch", [("reference-llama", "llama"), ("reference-moe", "qwen3_moe")])
def test_a_missing_member_is_a_one_line_error_naming_its_arch(name, arch, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "HERE", tmp_path / "nothing")
    with pytest.raises(zoo.MissingCheckpointError) as e:
        load_reference(name=name)
    assert e.value.field == "model"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"title: t\nmodel: {name}\narms:\n  fp16: {{codec: null}}\n")
    out = CliRunner().invoke(app, ["run", str(spec), "--quiet", "--json", str(tmp_path / "r.json"),
                                   "--db", f"sqlite:///{tmp_path / 'a.db'}"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    folder = {"llama": "checkpoint-llama", "qwen3_moe": "checkpoint-moe"}[arch]
    assert out.stderr.strip() == (f"error: {spec}:2: field model: model '{name}': {tmp_path / 'nothing' / folder}/"
                                  "model.safetensors is missing; train it with "
                                  f"`quantatlas reference train --arch {arch}`")


@pytest.mark.parametrize("name", sorted(ZOO_ARCH))
def test_eval_beyond_the_shipped_stream_is_refused_for_every_member(name, tmp_path):
    from quantatlas.spec import SpecError, load_spec

    have = data.token_count("eval")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"title: t\nmodel: {name}\ndata: {{eval: {{tokens: {have + 1}, ctx: 512}}}}\narms:\n"
                    "  fp16: {codec: null}\n")
    with pytest.raises(SpecError, match=f"{have + 1} tokens asked, but the reference eval stream has {have}"):
        load_spec(spec)
    spec.write_text(spec.read_text().replace(f"tokens: {have + 1}", f"tokens: {have}"))
    assert load_spec(spec).model == name


def test_each_member_is_its_own_experiment_of_one_family():
    from quantatlas.atlas.ids import family_hash, normalise_spec, spec_hash

    idents = [normalise_spec({"title": "t", "model": n, "arms": {"fp16": {"codec": None}}})[1] for n in ZOO_ARCH]
    assert len({spec_hash(i) for i in idents}) == 3 and len({family_hash(i) for i in idents}) == 1


def test_load_balancing_loss_is_switch_transformers_in_each_layer():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from quantatlas.reference.train import load_balancing_loss

    torch.manual_seed(0)
    one = torch.randn(64, 8) * 2
    # one layer: transformers' loss counts top-k slots per token (its balanced value is k); ours is per slot
    assert float(load_balancing_loss((one,), 2)) == pytest.approx(float(load_balancing_loss_func((one,), 8, 2)) / 2,
                                                                  rel=1e-5)
    # by hand: E * sum_i (share of slots to i) * (mean probability of i)
    probs = torch.softmax(one, -1)
    counts = torch.zeros(8)
    for row in probs.topk(2, dim=-1).indices.tolist():
        for e in row:
            counts[e] += 1
    assert float(load_balancing_loss((one,), 2)) == pytest.approx(float(8 * (counts / 128 * probs.mean(0)).sum()),
                                                                  rel=1e-5)
    # two layers that each use half the experts: pooled over layers (transformers) the experts look balanced;
    # per layer, each layer's collapse is charged
    low, high = torch.full((64, 8), -9.0), torch.full((64, 8), -9.0)
    low[:, :4] = torch.randn(64, 4)
    high[:, 4:] = torch.randn(64, 4)
    per_layer = float(load_balancing_loss((low, high), 2))
    pooled = float(load_balancing_loss_func((low, high), 8, 2)) / 2
    assert per_layer == pytest.approx(2 * pooled, rel=1e-2) and per_layer > 1.9
