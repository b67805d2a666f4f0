"""llama.cpp's MXFP4 ggml type: bytes equal to the gguf package's quantize (ggml's quantize_row_mxfp4_ref),
values equal to its dequantize, the solver path, and the GGUF export."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from quantatlas.quant.codecs import make_codec


def _rows():
    rng = np.random.default_rng(0)
    near_pow2 = np.float32(2.0) ** rng.integers(-12, 3, (8, 1)).astype(np.float32)
    near = np.tile(near_pow2, (1, 256)) * rng.uniform(-1, 1, (8, 256)).astype(np.float32)
    near[:, ::32] = np.nextafter(near_pow2, np.float32(0))        # block amax a few ulps below a power of two
    near[:, 1::32] = np.nextafter(np.nextafter(near_pow2, np.float32(0)), np.float32(0))
    ties = (rng.integers(-16, 16, (4, 256)) * 0.125).astype(np.float32)   # many exact midpoints
    ties[:, ::32] = 6.0
    return {
        "normal": rng.standard_normal((32, 256)).astype(np.float32) * 0.02,
        "student_t2": rng.standard_t(2, (32, 256)).astype(np.float32),
        "cauchy": (rng.standard_cauchy((16, 256)) * 1e-3).astype(np.float32),
        "near_powers_of_two": near.astype(np.float32),
        "ties": ties,
        "zeros_and_tiny": np.stack([np.zeros(256), np.full(256, 1e-30)]).astype(np.float32),
    }


@pytest.mark.parametrize("kind", list(_rows()))
def test_bytes_equal_gguf_quantize_and_values_its_dequantize(kind):
    x = _rows()[kind]
    codec = make_codec("mxfp4")
    packed = codec.encode(torch.from_numpy(x))
    theirs = gq.quantize(x, T.MXFP4)
    assert np.array_equal(packed.data["blocks"].numpy(), theirs)
    assert np.array_equal(codec.decode(packed).numpy().view(np.uint32),
                          gq.dequantize(theirs, T.MXFP4).astype(np.float32).view(np.uint32))
    assert packed.bits_per_weight == 4.25


def test_ties_go_to_the_code_listed_first_unlike_the_ocp_cast():
    """In units of the E8M0 scale X = 2^(e-127): 0.75 -> 0.5 and 3.5 -> 3 here, 1 and 4 under ties-to-even."""
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [4.0, 0.75, 3.5, -0.25]           # amax 4: X = 2^(2-2) = 1
    ggml = make_codec("mxfp4").fake_quantize(torch.from_numpy(x))[0, :4].tolist()
    ocp = make_codec("mx").fake_quantize(torch.from_numpy(x))[0, :4].tolist()
    assert ggml == [4.0, 0.5, 3.0, 0.0] and ocp == [4.0, 1.0, 4.0, -0.0]


def test_solver_path_codes_pack_to_the_same_bytes():
    codec = make_codec("mxfp4")
    w = torch.from_numpy(_rows()["student_t2"][:8])
    params = [codec.fit(w[:, c:c + 32]) for c in range(0, 256, 32)]
    parts = [codec.quantize(w[:, c + k:c + k + 8], params[c // 32], col=k) for c in range(0, 256, 32)
             for k in range(0, 32, 8)]
    packed = codec.pack(torch.cat([q.codes for q in parts], 1), params)
    assert torch.equal(packed.data["blocks"], codec.encode(w).data["blocks"])
    assert torch.equal(codec.decode(packed), torch.cat([q.values for q in parts], 1))


def test_gguf_export_writes_mxfp4_tensors_and_names_the_file_type(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from quantatlas.export.gguf import write_gguf
    from quantatlas.models.roles import get_weight, quantizable

    cfg = Qwen3Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    codec = make_codec("mxfp4")
    packed = {t.name + ".weight": codec.encode(get_weight(t)) for t in quantizable(model)}
    path = tmp_path / "m.gguf"
    write_gguf(path, model, packed)
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    t = {t.name: t for t in r.tensors}["blk.0.ffn_down.weight"]
    assert t.tensor_type == T.MXFP4
    assert np.array_equal(np.asarray(t.data), packed["model.layers.0.mlp.down_proj.weight"].data["blocks"].numpy())
