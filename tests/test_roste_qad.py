"""QAD (quant/qad.py: kd_ste's loop on the pack's frozen scales) and RoSTE (quant/roste.py: QAT with the
weights, activations and KV cache through STEs, after a per-layer identity/Hadamard choice)."""
from __future__ import annotations

import copy

import pytest
import torch

from quantatlas.quant.codecs.minifloat import E4M3
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.quant.recovery import Recovery
from quantatlas.spec import SpecError, parse_spec

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
SMALL = {"samples": 4, "seq_len": 32, "batch": 2, "steps": 4}
INT4 = {"uniform": {"bits": 4, "group": 32, "scale": "absmax"}}
NVFP4_FUSED = {"nvfp4": {"tensor_scale": "fused"}}
W4A4KV4 = {"codec": {"uniform": {"bits": 4, "group": 32, "scale": "absmax"}}, "act": {"scheme": "W4A4"},
           "kv": {"k": {"uniform": {"bits": 4, "group": 32, "symmetric": False}},
                  "v": {"uniform": {"bits": 4, "group": 32, "symmetric": False}}}}


def _arm(arm: dict):
    return parse_spec({"title": "t", "arms": {"a": arm}}).arms["a"]


def _quantized(tiny_reference, arm):
    fp = tiny_reference.model
    model = copy.deepcopy(fp)
    packed = quantize_model(model, build_recipe(arm), None, 0)
    return fp, model, packed


def _qad(tiny_reference, codec, recovery=None):
    arm = _arm({"codec": codec, "recovery": {"method": "qad", "lr": 1e-2, **SMALL, **(recovery or {})}})
    fp, model, packed = _quantized(tiny_reference, arm)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    rec = Recovery(arm.recovery, 0)
    new, info = rec.run(model, fp, packed, WINDOWS)
    return model, packed, new, rec, norms, arm


# -- QAD ----------------------------------------------------------------------------------------

def test_qad_is_its_own_name_with_train_weights_and_existing_ids_stay():
    bare, explicit = _arm({"codec": INT4, "recovery": {"method": "qad"}}), \
        _arm({"codec": INT4, "recovery": {"method": "qad", "train": "weights"}})
    assert bare.recovery.train == "weights"
    dump = bare.recovery.model_dump(mode="json", exclude_defaults=True)
    assert dump == explicit.recovery.model_dump(mode="json", exclude_defaults=True) == \
        {"method": "qad", "train": "weights"}
    # kd_ste's spellings dump as before (the new `rotation` option stays out at its default)
    kd = _arm({"codec": INT4, "recovery": {"method": "kd_ste", "train": "weights"}})
    assert kd.recovery.model_dump(mode="json", exclude_defaults=True) == {"method": "kd_ste", "train": "weights"}


@pytest.mark.parametrize("codec", [INT4, NVFP4_FUSED])
def test_qad_trains_only_weights_on_bit_identical_scales(tiny_reference, codec):
    model, packed, new, rec, norms, _ = _qad(tiny_reference, codec)
    params = dict(model.named_parameters())
    moved = 0
    for name, pk in packed.items():
        for key, old in pk.data.items():
            if key != "codes":   # every stored scale (fp16 scale / E4M3 scales / fp32 tensor scale) as it was
                assert torch.equal(new[name].data[key], old), (name, key)
        moved += int(not torch.equal(new[name].data["codes"], pk.data["codes"]))
        assert torch.equal(new[name].decode(), params[name].detach()), name   # the model evaluates the pack
    assert moved > 0    # the codes did change
    for n, v in norms.items():
        assert torch.equal(params[n].detach(), v), n   # nothing but the Linear weights trained


def _slow_frozen_uniform(latent, pack, bits=4, group=32):
    """Symmetric int grid on the stored fp16 scales, one element at a time."""
    s = pack.data["scale"].float()[:latent.shape[0]]
    out = torch.empty_like(latent)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for r in range(latent.shape[0]):
        for c in range(latent.shape[1]):
            sc = float(s[r, c // group])
            out[r, c] = min(max(round(float(latent[r, c]) / sc), lo), hi) * sc   # Python round: ties to even
    return out


def _slow_frozen_nvfp4(latent, pack, block=16):
    """E2M1 nearest on the stored E4M3 block scales and fp32 tensor scale."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    t = pack.data["tensor_scale"].float().reshape(-1)[0]
    s = E4M3.decode(pack.data["scales"]).float()[:latent.shape[0]]
    out = torch.empty_like(latent)
    for r in range(latent.shape[0]):
        for c in range(latent.shape[1]):
            sc = s[r, c // block]
            y = latent[r, c].float() * ((1.0 / t) / sc)
            v = grid[(grid - y.abs()).abs().argmin()]
            out[r, c] = torch.copysign(v, y) * (t * sc)
    return out


@pytest.mark.parametrize("codec, slow", [(INT4, _slow_frozen_uniform), (NVFP4_FUSED, _slow_frozen_nvfp4)])
def test_qad_pack_decodes_to_the_trained_latent_on_the_frozen_grid(tiny_reference, codec, slow):
    model, packed, new, rec, _, _ = _qad(tiny_reference, codec)
    name = next(n for n in new if n.endswith("layers.0.self_attn.v_proj.weight"))
    latent = rec.tuned[name].latent.detach()
    rows = 4   # the slow element loop on the first rows (a pack's rows are independent)
    assert torch.equal(new[name].decode()[:rows], slow(latent[:rows], packed[name]))


def test_nvfp4_fused_tensor_scale_survives_recovery(tiny_reference):
    """q/k/v (and gate/up) share one fp32 tensor scale in the weights step; QAD and kd_ste's train: weights
    (which re-fits block scales) both keep it in every re-packed matrix."""
    for recovery in ({"method": "qad"}, {"method": "kd_ste", "train": "weights"}):
        arm = _arm({"codec": NVFP4_FUSED, "recovery": {"lr": 1e-2, **SMALL, **recovery}})
        fp, model, packed = _quantized(tiny_reference, arm)
        new, _ = Recovery(arm.recovery, 0).run(model, fp, packed, WINDOWS)
        for li in range(2):
            group = [f"model.layers.{li}.self_attn.{m}_proj.weight" for m in "qkv"]
            t = {n: new[n].data["tensor_scale"] for n in group}
            assert all(torch.equal(t[n], packed[n].data["tensor_scale"]) for n in group), recovery
            assert len({float(v) for v in t.values()}) == 1, recovery


# -- RoSTE --------------------------------------------------------------------------------------

def _roste(tiny_reference, arm_extra=None, rotation="adaptive"):
    from quantatlas.quant.roste import RoSTE

    arm = _arm({**W4A4KV4, **(arm_extra or {}),
                "recovery": {"method": "roste", "lr": 1e-4, "rotation": rotation, **SMALL}})
    fp, model, packed = _quantized(tiny_reference, arm)
    rec = RoSTE(arm.recovery, 0, arm.act, arm.kv)
    new, info, report = rec.run(model, fp, packed, WINDOWS)
    return arm, fp, model, packed, new, info, report, rec


def _dense_hadamard(seed, slot, layer, size):
    from quantatlas.quant.roste import slot_rotation

    return slot_rotation(seed, slot, layer, size).matrix(torch.float64).float()   # Q: rotate(x) = Q x


def test_roste_choice_is_the_lower_of_two_directly_computed_errors(tiny_reference):
    """E(I) and E(H) of eq. (12) recomputed here with dense Hadamard matrices, hooks of the test's own
    and per-token int4 written out; the recorded choice is the argmin per layer and slot."""
    from quantatlas.quant.config import build

    arm, fp, model, packed, new, info, report, rec = _roste(tiny_reference)
    wq = build("codec", arm.codec.to_spec())
    vq = build("codec", arm.kv.v.to_spec())

    def q_err(w):
        return float(((wq.fake_quantize(w) - w) ** 2).sum())

    def act_err(x):   # W4A4: symmetric int4 per token, absmax / 7, fp16 scale
        s = (x.abs().amax(-1, keepdim=True) / 7).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        return float(((torch.clamp(torch.round(x / s), -8, 7) * s - x) ** 2).sum())

    seen = {}
    hooks = []
    for li, layer in enumerate(fp.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, li=li: seen.setdefault((li, "o"), []).append(a[0].reshape(-1, a[0].shape[-1]).float())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, li=li: seen.setdefault((li, "down"), []).append(a[0].reshape(-1, a[0].shape[-1]).float())))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, out, li=li: seen.setdefault((li, "v"), []).append(out.reshape(-1, out.shape[-1]).float())))
    with torch.no_grad():
        for i in range(WINDOWS.shape[0]):
            fp(WINDOWS[i:i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    cfg = fp.config
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    n = WINDOWS.shape[0]
    for li, layer in enumerate(fp.model.layers):
        wv, wo, wd = (m.weight.detach().float() for m in (layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                          layer.mlp.down_proj))
        H = _dense_hadamard(0, "vo", li, hd)
        Hv, Ho = torch.block_diag(*[H] * nkv), torch.block_diag(*[H] * nh)

        def v_err(vs, R):
            return sum(float(((vq.fake_quantize((v @ R.T).reshape(-1, hd)) - (v @ R.T).reshape(-1, hd)) ** 2).sum())
                       for v in vs) / n

        e_vo = {rot: q_err(Rv @ wv) + q_err(wo @ Ro.T) + sum(act_err(x @ Ro.T) for x in seen[(li, "o")]) / n
                + v_err(seen[(li, "v")], Rv)
                for rot, Rv, Ro in (("identity", torch.eye(nkv * hd), torch.eye(nh * hd)), ("hadamard", Hv, Ho))}
        D = _dense_hadamard(0, "down", li, wd.shape[1])
        e_down = {rot: q_err(wd @ R.T) + sum(act_err(x @ R.T) for x in seen[(li, "down")]) / n
                  for rot, R in (("identity", torch.eye(wd.shape[1])), ("hadamard", D))}
        for slot, e in (("vo", e_vo), ("down", e_down)):
            got = report["layers"][str(li)][slot]
            assert got["identity"] == pytest.approx(e["identity"], rel=1e-4)
            assert got["hadamard"] == pytest.approx(e["hadamard"], rel=1e-4)
            want = "hadamard" if e["hadamard"] < e["identity"] else "identity"
            assert got["rotation"] == want, (li, slot, e)


def test_roste_rotations_are_function_preserving_in_fp(tiny_reference):
    from quantatlas.quant.roste import rotate_model

    fp = tiny_reference.model
    rotated = copy.deepcopy(fp)
    chosen = {0: {"vo": True, "down": False}, 1: {"vo": True, "down": True}}
    rotate_model(rotated, chosen, seed=5)
    assert not torch.equal(rotated.model.layers[1].mlp.down_proj.weight, fp.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():
        a, b = fp(WINDOWS, use_cache=False).logits, rotated(WINDOWS, use_cache=False).logits
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max())


def test_ste_gradient_reaches_earlier_weights_through_act_and_kv_fake_quant(tiny_reference):
    """Layer 0's v_proj reaches the loss only through quantized values: the V cache, then o_proj's
    quantized input. With the plain (detaching) quantizers its gradient is zero; with RoSTE's STE it is not."""
    from quantatlas.quant.act import ActivationQuantizer
    from quantatlas.quant.kv import KVCacheQuantizer
    from quantatlas.quant.roste import QuantizedLoop

    arm = _arm(W4A4KV4)

    def grad_of_v0(attach):
        model = copy.deepcopy(tiny_reference.model)
        for p in model.parameters():
            p.requires_grad_(False)
        w = model.model.layers[0].self_attn.v_proj.weight
        w.requires_grad_(True)
        undo = attach(model)
        loss = model(WINDOWS[:2], use_cache=False).logits.float().pow(2).mean()
        undo(model)
        if not loss.requires_grad:   # nothing differentiable reaches the loss
            return None
        loss.backward()
        return w.grad

    def plain(model):
        kv = KVCacheQuantizer(arm.kv, 0)
        kv.attach(model)
        act = ActivationQuantizer(arm.act, 0)
        act.attach(model)
        return lambda m: act.detach()

    def roste(model):
        loop = QuantizedLoop(arm.act, arm.kv, 0)
        loop.attach(model)
        return loop.detach

    g_plain = grad_of_v0(plain)
    assert g_plain is None or float(g_plain.abs().sum()) == 0.0
    g = grad_of_v0(roste)
    assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0


def test_roste_forward_is_exactly_the_fake_quantized_model(tiny_reference):
    """The STE changes gradients only: with the loop attached the student's logits are the plain
    quantizers' logits bit for bit."""
    from quantatlas.quant.act import ActivationQuantizer
    from quantatlas.quant.kv import KVCacheQuantizer
    from quantatlas.quant.roste import QuantizedLoop

    arm = _arm(W4A4KV4)
    a, b = copy.deepcopy(tiny_reference.model), copy.deepcopy(tiny_reference.model)
    KVCacheQuantizer(arm.kv, 0).attach(a)
    ActivationQuantizer(arm.act, 0).attach(a)
    QuantizedLoop(arm.act, arm.kv, 0).attach(b)
    with torch.no_grad():
        assert torch.equal(a(WINDOWS, use_cache=False).logits, b(WINDOWS, use_cache=False).logits)


def test_roste_trains_packs_and_the_kv_and_act_steps_attach_after(tiny_reference):
    from quantatlas.quant.act import ActivationQuantizer
    from quantatlas.quant.kv import KVCacheQuantizer

    arm, fp, model, packed, new, info, report, rec = _roste(tiny_reference, rotation="hadamard")
    params = dict(model.named_parameters())
    for name, pk in new.items():
        assert (pk.codec, pk.shape, pk.bits_per_weight) == (packed[name].codec, packed[name].shape,
                                                            packed[name].bits_per_weight)
        assert torch.equal(pk.decode(), params[name].detach()), name
    assert info["recovery_rotated_vo"] == info["recovery_rotated_down"] == 1.0
    assert all(s["rotation"] == "hadamard" for layer in report["layers"].values() for s in layer.values())
    assert info["recovery_train_kl_after"] < info["recovery_train_kl_before"]
    KVCacheQuantizer(arm.kv, 0).attach(model)     # the loop's cache is gone: the KV step attaches its own
    ActivationQuantizer(arm.act, 0).attach(model)
    with torch.no_grad():
        assert torch.isfinite(model(WINDOWS, use_cache=False).logits).all()


def test_roste_in_a_run_records_rotations_per_layer(tiny_reference):
    from quantatlas.runner import run_spec

    spec = {"title": "t", "data": {"eval": {"tokens": 512, "ctx": 128}}, "seeds": [0],
            "arms": {"r": {**W4A4KV4, "recovery": {"method": "roste", "lr": 1e-3, **SMALL, "steps": 2}}}}
    doc = run_spec(spec, ledger=False, loaded=tiny_reference, compress=False, log=lambda m: None)
    rot = doc["arms"]["r"]["rotations"]["0"]["layers"]
    assert set(rot) == {"0", "1"} and all(set(v) == {"vo", "down"} for v in rot.values())
    assert doc["arms"]["r"]["seeds"]["0"]["recovery_cpu_s"] > 0


@pytest.mark.parametrize("arm, field, match", [
    ({"codec": INT4, "recovery": {"method": "qad", "train": "scales"}}, "arms.a.recovery", "train must be weights"),
    ({"codec": INT4, "recovery": {"method": "roste", "train": "scales_norms"}}, "arms.a.recovery", "train must"),
    ({"codec": INT4, "recovery": {"method": "kd_ste", "rotation": "none"}}, "arms.a.recovery", "roste's option"),
    ({"codec": INT4, "recovery": {"method": "roste", "rotation": "random"}}, "arms.a.recovery.rotation", ""),
    ({"codec": "q4_0", "recovery": {"method": "qad"}}, "arms.a.recovery", "qad re-rounds"),
    ({**W4A4KV4, "act": {"codec": {"nvfp4": {}}, "static": True}, "recovery": {"method": "roste"}},
     "arms.a.recovery", "must be dynamic"),
    ({**W4A4KV4, "transforms": [{"hadamard": {}}], "recovery": {"method": "roste"}}, "arms.a.recovery",
     "chooses each layer"),
])
def test_bad_options_are_spec_errors_naming_the_field(arm, field, match):
    with pytest.raises(SpecError, match=field.replace(".", "\\.") + ".*" + match):
        parse_spec({"title": "t", "arms": {"a": arm}})
