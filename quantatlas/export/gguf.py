"""Write a quantized model as a .gguf file that llama.cpp loads.

What convert_hf_to_gguf.py + llama-quantize would produce for the same weights:
- tensor names from the model layout (quantatlas.models.layout: each module's role or norm
  position), spelled as the `gguf` package's TENSOR_NAMES (token_embd, blk.N.attn_q, ..., output);
  head counts, tying and RoPE parameters come from the layout too;
- quantized tensors as the ggml bytes our codecs stored (Packed.data["blocks"], [rows, row bytes]
  in ggml's block layout), unquantized matrices as F16, norms and other 1-D tensors as F32;
- shapes: we hand the writer [out, in]; GGUF stores ggml's ne = [in, out] (reversed), which the
  writer does and GGUFReader undoes;
- Llama's q/k rows are permuted the way convert_hf_to_gguf.py does (HF's rotate-half layout ->
  ggml's interleaved rope). ggml quantizes every row on its own, so permuting the rows of the
  quantized bytes is byte for byte the same as quantizing the permuted matrix: we quantize in
  HF's layout and permute the stored rows. Qwen2/Qwen3 need no permutation;
- metadata as convert_hf_to_gguf.py's TextModel/LlamaModel write it: block_count,
  context_length, embedding_length, feed_forward_length, attention.head_count(_kv),
  rope.freq_base, attention.layer_norm_rms_epsilon, attention.key/value_length (configs with
  head_dim), and for llama vocab_size and rope.dimension_count;
- a tokenizer: a byte-level "gpt2" vocabulary without merges for models that have no tokenizer
  (the reference model: token i < 256 is byte i), or the model's own byte-level BPE.

A tied head is written once, as token_embd (llama.cpp uses it as the output when output.weight
is absent). Codecs that are not ggml block formats cannot be stored and raise ValueError.

Mixture-of-experts models (Qwen3-MoE as `qwen3moe`, Mixtral as `llama`, as convert_hf_to_gguf.py
writes them): each layer's experts of one role are one 3-D tensor, blk.N.ffn_gate_exps / ffn_up_exps /
ffn_down_exps (numpy [n_expert, out, in], ggml ne = [in, out, n_expert]), stacked from the experts'
matrices in expert order, whether the model keeps them in fused 3-D tensors or a ModuleList; quantized,
every expert of a tensor must share one ggml type (their rows' blocks are stacked as they are). The
router is blk.N.ffn_gate_inp, written F32 as the converter does. Metadata adds expert_count,
expert_used_count and (qwen3moe) expert_feed_forward_length. llama.cpp's qwen3moe renormalises the
top-k weights and has no dense layers, so a Qwen3-MoE config that says otherwise is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from quantatlas.errors import UserError
from quantatlas.export.schemes import arm_online_rotation, online_rotated_model
from quantatlas.quant.codecs.base import Packed
from quantatlas.quant.codecs.ggml.block_codec import formats
from quantatlas.quant.config import arm_codecs
from quantatlas.quant.incoherence import IncoherentPacked

#: model_type of a HF config -> llama.cpp architecture, for the architectures we write
ARCHES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                          "qwen3_moe": "qwen3moe", "mixtral": "llama"}

#: ggml block types a Packed can carry into GGUF: the ggml formats' table (codec name == lower-case type)
GGML_TYPES: tuple[str, ...] = tuple(formats())

#: llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, by architecture
_BPE_PRE: dict[str, str] = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}


def gguf_arch(model, arch_hint: str | None = None) -> str:
    """llama.cpp's architecture name for a HF model (or its ModelLayout, or the hint), e.g. "qwen3"."""
    model_type = arch_hint or _layout(model).arch
    if model_type not in ARCHES:
        raise ValueError(f"gguf export: architecture {model_type!r} is not supported "
                         f"(supported model_type: {', '.join(sorted(ARCHES))}); pass arch_hint to override")
    return ARCHES[model_type]


def check_arm(arm, where: str = "arm") -> None:
    """Refuse, before any compute, an arm a GGUF file cannot carry: a UserError in one line naming the field.
    GGUF stores ggml blocks (a llama.cpp mixture, `codec: gguf`, is some of them) and fp16 matrices, no
    rotation of codes or inputs, no weights rebuilt on load."""
    for codec, field in arm_codecs(arm, where):
        if codec.name not in GGML_TYPES + ("gguf", "f16"):
            raise UserError(f"gguf export: {field} {codec.name}: not a ggml block type; GGUF stores "
                            f"{', '.join(GGML_TYPES)}, a llama.cpp mixture (codec: gguf) or f16", field)
    if getattr(arm.solver_options, "incoherence", False):
        raise UserError(f"gguf export: {where}.solver_options.incoherence: GPTQ's incoherence processing stores "
                        "codes of a rotated matrix, and GGUF stores no rotation", f"{where}.solver_options.incoherence")
    if getattr(arm, "freeze_dry", None) is not None:
        raise UserError(f"gguf export: {where}.freeze_dry: a freeze-dried matrix rebuilds its dropped weights on "
                        "load, which llama.cpp cannot do", f"{where}.freeze_dry")
    if (found := arm_online_rotation(arm, where)) is not None:
        raise UserError(f"gguf export: {found[1]}; llama.cpp would read the rotated weights with unrotated inputs",
                        found[0])


def _arch_enum(arch: str):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _layout(model):
    """The model's layout (quantatlas.models.layout): what each module is, heads, tying, RoPE."""
    from quantatlas.models.layout import ModelLayout, layout

    return model if isinstance(model, ModelLayout) else layout(model)


def _parameters(model) -> dict[str, torch.Tensor]:
    """Named parameters, each storage once (a tied head shares the embedding's), with fused 3-D expert
    tensors split into their experts' matrices (models/roles.py `matrix_weights`)."""
    from quantatlas.models.roles import matrix_weights

    return matrix_weights(model)


#: layout role or norm position -> llama.cpp tensor (gguf.MODEL_TENSOR member name)
_LAYER_TENSORS: dict[str, str] = {
    "q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT", "qkv": "ATTN_QKV",
    "gate": "FFN_GATE", "up": "FFN_UP", "down": "FFN_DOWN", "gate_up": "FFN_UP",
    "router": "FFN_GATE_INP", "expert_gate": "FFN_GATE_EXP", "expert_up": "FFN_UP_EXP", "expert_down": "FFN_DOWN_EXP",
    "attn_norm": "ATTN_NORM", "ffn_norm": "FFN_NORM", "post_attn_norm": "ATTN_POST_NORM",
    "post_ffn_norm": "FFN_POST_NORM", "q_norm": "ATTN_Q_NORM", "k_norm": "ATTN_K_NORM",
}
_MODEL_TENSORS: dict[str, str] = {"embed": "TOKEN_EMBD", "pos_embed": "POS_EMBD", "head": "OUTPUT",
                                  "final_norm": "OUTPUT_NORM"}


def _module_names(m, arch: str) -> dict[str, str]:
    """Module path -> llama.cpp tensor base name (blk.0.attn_q), for the tensors `arch` has."""
    import gguf

    known = set(gguf.MODEL_TENSORS[_arch_enum(arch)])

    def base(kind: str, layer: int | None = None) -> str | None:
        tensor = getattr(gguf.MODEL_TENSOR, kind)
        if tensor not in known:
            return None
        name = gguf.TENSOR_NAMES[tensor]
        return name.format(bid=layer) if layer is not None else name

    out: dict[str, str] = {}
    for key, kind in _MODEL_TENSORS.items():
        t = getattr(m, key)
        if t is not None and (g := base(kind)) is not None:
            out[t.name] = g
    for layer in m.layers:
        experts = [(t.role, t) for t in layer.moe.tensors()] if layer.moe is not None else []
        for key, t in (*layer.matrices.items(), *layer.norms.items(), *experts):
            if key in _LAYER_TENSORS and (g := base(_LAYER_TENSORS[key], layer.index)) is not None:
                out[t.name] = g
    return out


def gguf_tensor_names(model, arch_hint: str | None = None) -> dict[str, str]:
    """Parameter name (model.layers.0.mlp.down_proj.weight) -> GGUF name (blk.0.ffn_down.weight),
    from the layout's roles and norm positions. An MoE expert's matrix (model.layers.0.mlp.experts.3.down_proj.weight,
    fused or not) -> its layer's 3-D tensor (blk.0.ffn_down_exps.weight), shared by every expert."""
    return _tensor_names(model, _layout(model), arch_hint)


def _tensor_names(model, m, arch_hint: str | None) -> dict[str, str]:
    arch = gguf_arch(m, arch_hint)
    modules = _module_names(m, arch)
    out = {}
    for name in _parameters(model):
        module, _, suffix = name.rpartition(".")
        g = modules.get(module) if suffix in ("weight", "bias") else None
        if g is None:
            raise ValueError(f"gguf export: no llama.cpp tensor name for {name!r} in architecture {arch}")
        out[name] = f"{g}.{suffix}"
    return out


def llama_permute(rows: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute on the leading (output-row) axis of any [out, ...] array."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    out = rows.shape[0]
    return (rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape))


def _qtype(name: str, p: Packed):
    import gguf

    if p.codec not in GGML_TYPES:
        raise ValueError(f"gguf export: tensor {name!r} uses codec {p.codec!r}, which has no GGUF type; "
                         f"only ggml block codecs ({', '.join(GGML_TYPES)}) can be exported")
    return gguf.GGMLQuantizationType[formats()[p.codec].ggml_type]


def _packed_rows(name: str, p: Packed, shape: tuple[int, int]) -> np.ndarray:
    """The stored blocks as uint8 [rows, row bytes], checked against ggml's sizes."""
    import gguf

    qtype = _qtype(name, p)
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"gguf export: packed {name!r} has shape {tuple(p.shape)}, the model's is {tuple(shape)}")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"gguf export: {name!r} has rows of {cols}, not a multiple of {p.codec}'s block {block}")
    if isinstance(p, IncoherentPacked):  # codes of U W Vᵀ, which GGUF cannot undo
        raise ValueError(f"gguf export: packed {name!r} holds incoherence-rotated codes; GGUF stores no rotation")
    blocks = p.data.get("blocks")
    if blocks is None:
        raise ValueError(f"gguf export: packed {name!r} ({p.codec}) has no 'blocks' data")
    arr = blocks.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(rows, -1)
    if arr.shape[1] != cols // block * type_size:
        raise ValueError(f"gguf export: packed {name!r} has {arr.shape[1]} bytes per row, "
                         f"ggml's {p.codec} needs {cols // block * type_size}")
    return arr


def _write_experts(w, gname: str, members: list[str], experts: dict, params: dict, packed: dict) -> str:
    """One MoE 3-D tensor [n_expert, out, in] from its experts' matrices, in expert order: their packed
    rows stacked (one ggml type for all), or their weights as F16. Returns the type written."""
    members = sorted(members, key=lambda n: experts[n].expert)
    if [experts[n].expert for n in members] != list(range(len(members))):
        raise ValueError(f"gguf export: {gname} needs experts 0..n-1, got {[experts[n].expert for n in members]}")
    if any(experts[n].transposed for n in members):
        raise ValueError(f"gguf export: {gname}: experts stored transposed ([E, in, out]) are not written")
    codecs = {packed[n].codec if n in packed else "f16" for n in members}
    if len(codecs) > 1:
        raise ValueError(f"gguf export: {gname} stores all its experts in one ggml type, but they were quantized "
                         f"as {', '.join(sorted(codecs))} (an override by expert index cannot travel into GGUF)")
    codec = codecs.pop()
    if codec == "f16":
        w.add_tensor(gname, np.stack([params[n].detach().float().cpu().numpy() for n in members]).astype(np.float16))
        return "f16"
    rows = np.stack([_packed_rows(n, packed[n], tuple(experts[n].shape)) for n in members])
    w.add_tensor(gname, np.ascontiguousarray(rows), raw_dtype=_qtype(members[0], packed[members[0]]))
    return codec


def _rope(m) -> tuple[float, dict]:
    if m.rope_theta is None:
        raise ValueError("gguf export: the config has no rope_theta")
    return m.rope_theta, dict(m.rope_parameters)


def _write_hparams(w, model, arch: str, m) -> dict[str, np.ndarray]:
    """Model hyper-parameters (head counts, layers and RoPE from the layout `m`); returns extra
    tensors the metadata needs (llama3 rope_freqs)."""
    import gguf

    c = model.config
    w.add_block_count(m.n_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    theta, rope = _rope(m)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if getattr(c, "head_dim", None) is not None:  # the converter writes key/value_length only for configs with head_dim
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(m.head_dim)
    if m.moe_blocks:
        _write_moe_hparams(w, c, arch, m)
    extra = {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "llama3" and arch == "llama":
        extra["rope_freqs.weight"] = _llama3_rope_factors(m.head_dim, theta, rope)
    elif rope_type != "default":
        raise ValueError(f"gguf export: rope scaling {rope_type!r} is not supported for {arch}")
    return extra


def _write_moe_hparams(w, c, arch: str, m) -> None:
    """expert_count, expert_used_count (and qwen3moe's expert_feed_forward_length), refusing what llama.cpp's
    graph for the architecture would compute differently."""
    blocks = m.moe_blocks
    if len(blocks) != m.n_layers:
        dense = [layer.index for layer in m.layers if layer.moe is None]
        raise ValueError(f"gguf export: llama.cpp's {arch} has an MoE block in every layer; layers {dense} are dense")
    if not all(b.normalise for b in blocks):
        raise ValueError(f"gguf export: llama.cpp's {arch} renormalises the top-k routing weights; this model does not "
                         "(norm_topk_prob: false)")
    if any(b.shared for b in blocks):
        raise ValueError(f"gguf export: shared experts are not written for {arch}")
    w.add_expert_count(m.n_experts)
    w.add_expert_used_count(m.experts_used)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)


def _llama3_rope_factors(dim: int, theta: float, rope: dict) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf.py generates for Llama-3.1-style rope scaling (head_dim `dim`)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# -- tokenizers -----------------------------------------------------------------------------------

def _byte_vocab(w, config) -> None:
    """Token i < 256 is byte i (GPT-2's byte-to-unicode spelling), the rest control tokens.

    llama.cpp's BPE needs a merges array and the gguf writer cannot store an empty one, so we store a
    single merge of the two control-token spellings: BPE merges only neighbouring symbols, which start
    as single characters, so a rule between two multi-character strings never fires and every byte
    stays its own token.
    """
    import gguf
    from gguf.vocab import bytes_to_unicode

    n_vocab = config.vocab_size
    if n_vocab < 256:
        raise ValueError(f"gguf export: a byte-level vocabulary needs vocab_size >= 256, got {n_vocab}")
    spell = bytes_to_unicode()
    special = {getattr(config, "bos_token_id", None): "<|bos|>", getattr(config, "eos_token_id", None): "<|eos|>"}
    tokens = [spell[i] for i in range(256)] + [special.get(i, f"<|control_{i}|>") for i in range(256, n_vocab)]
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * (n_vocab - 256)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{tokens[-2]} {tokens[-1]}"] if n_vocab >= 258 else ["<|bos|> <|eos|>"])
    _special_ids(w, config.bos_token_id, config.eos_token_id, getattr(config, "pad_token_id", None), add_bos=False)


def _special_ids(w, bos, eos, pad, add_bos: bool) -> None:
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if pad is not None:
        w.add_pad_token_id(int(pad))
    w.add_add_bos_token(add_bos)


def _hf_bpe_vocab(w, tokenizer, config, arch: str) -> None:
    """A Hugging Face byte-level BPE tokenizer as convert_hf_to_gguf.py's gpt2 vocabulary."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE" or arch not in _BPE_PRE:
        raise ValueError(f"gguf export: can write byte-level BPE tokenizers for {', '.join(sorted(_BPE_PRE))}; "
                         f"this is a {model_spec.get('type') or type(tokenizer).__name__} tokenizer on {arch}")
    n_vocab = config.vocab_size
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    if reverse and max(reverse) >= n_vocab:
        raise ValueError(f"gguf export: the tokenizer has ids up to {max(reverse)}, beyond vocab_size {n_vocab}")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_BPE_PRE[arch])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    probe = tokenizer("a")["input_ids"]  # does encoding put BOS in front? (what add_bos_token means)
    _special_ids(w, bos, eos, tokenizer.pad_token_id, add_bos=bool(probe) and bos is not None and probe[0] == bos)


# -- the writer -----------------------------------------------------------------------------------

def _file_type(ftype: str | None, packed: dict[str, Packed]):
    import gguf

    if ftype is not None:
        key = "ALL_F32" if ftype.upper() == "F32" else f"MOSTLY_{ftype.upper()}"
        if key not in gguf.LlamaFileType.__members__:
            raise ValueError(f"gguf export: unknown file type {ftype!r}")
        return gguf.LlamaFileType[key]
    kinds = {p.codec for p in packed.values()}
    if not kinds:
        return gguf.LlamaFileType.MOSTLY_F16
    if kinds == {"mxfp4"}:   # llama.cpp names an all-MXFP4 file so (llama_model_loader's guess, llama-quantize)
        return gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    if len(kinds) == 1 and f"MOSTLY_{next(iter(kinds)).upper()}" in gguf.LlamaFileType.__members__:
        return gguf.LlamaFileType[f"MOSTLY_{next(iter(kinds)).upper()}"]
    return None  # a mixture we cannot name: llama.cpp guesses it from the tensor types


def write_gguf(path: str | Path, model, packed: dict[str, Packed], arch_hint: str | None = None, *,
               tokenizer=None, ftype: str | None = None, name: str | None = None) -> dict[str, str]:
    """Write `model` with the quantized tensors in `packed` (keyed by parameter name, e.g.
    "model.layers.0.self_attn.q_proj.weight", as quantize_model returns them) to a .gguf file.

    Tensors not in `packed` are written from the model: matrices as F16, 1-D tensors as F32.
    `tokenizer` is the model's HF tokenizer (None: a byte-level vocabulary); `ftype` names the
    llama.cpp file type for general.file_type (e.g. "Q4_K_M"). Returns GGUF name -> ggml type.
    """
    import gguf

    rotated = online_rotated_model(model, "GGUF")
    if rotated:   # llama.cpp would read the rotated weights with unrotated inputs: a wrong file
        raise ValueError(f"gguf export: {rotated} (fold every rotation into the weights: a transform's "
                         "online: [], RoSTE's rotation: none)")
    m = _layout(model)
    arch = gguf_arch(m, arch_hint)
    c = model.config
    names = _tensor_names(model, m, arch_hint)
    params = _parameters(model)
    tied = m.config_tied
    embed = m.embed.name + ".weight"
    head = None if m.head is None else m.head.name + ".weight"

    # an f16 "pack" is the model's weight rounded to fp16, which is what an unpacked matrix is written as
    packed = {n: p for n, p in packed.items() if p.codec != "f16"}
    if tied and head is not None and head in packed:
        # the head and the embeddings are one tensor: stored once, as token_embd
        hp = packed.pop(head)
        if embed in packed and not torch.equal(packed[embed].data["blocks"].cpu(), hp.data["blocks"].cpu()):
            raise ValueError(f"gguf export: {head!r} is tied to {embed!r} but they were quantized differently")
        packed.setdefault(embed, hp)
    unknown = sorted(set(packed) - set(params))
    if unknown:
        raise ValueError(f"gguf export: packed tensors that are not parameters of the model: {', '.join(unknown[:5])}")

    # llama's q/k rows go from HF's rotate-half RoPE layout to ggml's interleaved one
    heads_of_rows = {}
    for layer in m.layers:
        for role, heads in (("q", layer.n_heads), ("k", layer.n_kv_heads)):
            if role in layer.matrices:
                heads_of_rows.update({f"{layer.matrices[role].name}.{s}": heads for s in ("weight", "bias")})

    def permute(pname: str, rows: np.ndarray) -> np.ndarray:
        if arch != "llama" or pname not in heads_of_rows:
            return rows
        return llama_permute(rows, heads_of_rows[pname])

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or getattr(c, "_name_or_path", "") or arch)
    extra = _write_hparams(w, model, arch, m)
    file_type = _file_type(ftype, packed)
    if file_type is not None:
        w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is None:
        _byte_vocab(w, c)
    else:
        _hf_bpe_vocab(w, tokenizer, c, arch)

    written: dict[str, str] = {}
    for gname, arr in extra.items():
        w.add_tensor(gname, arr)
        written[gname] = "f32"
    experts = {t.name + ".weight": t for t in m.roles if t.expert is not None}
    stacks: dict[str, list[str]] = {}     # an MoE 3-D tensor's GGUF name -> its experts' parameter names
    for pname in params:
        if pname in experts:
            stacks.setdefault(names[pname], []).append(pname)
    for pname, p in params.items():
        gname = names[pname]
        if pname in experts:
            if gname not in written:
                written[gname] = _write_experts(w, gname, stacks[gname], experts, params, packed)
        elif pname in packed:
            rows = permute(pname, _packed_rows(pname, packed[pname], tuple(p.shape)))
            w.add_tensor(gname, np.ascontiguousarray(rows), raw_dtype=_qtype(pname, packed[pname]))
            written[gname] = packed[pname].codec
        else:
            t = p.detach().float().cpu().numpy()
            keep_f32 = t.ndim <= 1 or gname.endswith(("_norm.weight", "ffn_gate_inp.weight"))
            arr = t.astype(np.float32 if keep_f32 else np.float16)
            w.add_tensor(gname, np.ascontiguousarray(permute(pname, arr)))
            written[gname] = "f32" if keep_f32 else "f16"

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
