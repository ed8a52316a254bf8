"""Fine-tuning methods, one config key (``train.method``) each.

=========  ==================================================================
full       every weight trains (fp32 master weights)
lora       low-rank updates of the linear layers (``peft``)
adalora    LoRA with an adaptive rank budget (``peft``)
ia3        learned rescaling of keys, values and MLP activations (``peft``)
prefix     trained key/value prefixes in every layer (``peft``)
prompt     trained virtual input tokens (``peft``)
adapter    Houlsby bottleneck adapters after attention and MLP (ours, below)
=========  ==================================================================

``peft`` methods save with ``save_pretrained`` and load with plain
``transformers`` + ``peft``. The bottleneck adapter has no maintained
implementation for current ``transformers``, so it is a small module here; it
saves its weights and settings as ``adapter.safetensors`` / ``adapter.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from recreason.errors import ConfigError
from recreason.config import MERGEABLE, METHODS, TrainConfig  # noqa: F401  (the method names live in config)


def top_layers(model, n: int | None) -> list[int] | None:
    if not n:
        return None
    total = model.config.num_hidden_layers
    return list(range(max(0, total - n), total))


class Bottleneck(nn.Module):
    """Wraps a projection: ``y = f(x); y + up(act(down(y)))`` with ``up`` starting at zero (identity)."""

    def __init__(self, inner: nn.Module, hidden: int, size: int, dropout: float):
        super().__init__()
        self.inner = inner
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        y = self.inner(x)
        h = self.up(self.dropout(self.act(self.down(y.to(self.down.weight.dtype)))))
        return y + h.to(y.dtype)


def decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"the bottleneck adapter needs a decoder with .model.layers; {type(model).__name__} has none")
    return layers


def add_bottleneck_adapters(model, cfg: TrainConfig):
    """Insert adapters after each chosen layer's attention output and MLP output; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = model.config.hidden_size
    layers = decoder_layers(model)
    chosen = top_layers(model, cfg.lora_top_layers) or list(range(len(layers)))
    for idx in chosen:
        layer = layers[idx]
        layer.self_attn.o_proj = Bottleneck(layer.self_attn.o_proj, hidden, cfg.adapter_size, cfg.lora_dropout)
        layer.mlp.down_proj = Bottleneck(layer.mlp.down_proj, hidden, cfg.adapter_size, cfg.lora_dropout)
    model.recreason_adapter = {"layers": chosen, "size": cfg.adapter_size, "dropout": cfg.lora_dropout}
    for name, p in model.named_parameters():
        if ".down." in name or ".up." in name:
            p.requires_grad_(True)
            p.data = p.data.float()
    return model


def adapter_state(model, state: dict | None = None) -> dict[str, torch.Tensor]:
    source = state.items() if state is not None else model.named_parameters()
    return {n: p.detach().cpu().contiguous() for n, p in source if ".down." in n or ".up." in n}


def save_adapter(model, folder: Path, state: dict | None = None) -> None:
    """Write the bottleneck adapter's weights (from ``state`` when given: weights gathered from shards)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model, state), str(folder / "adapter.safetensors"))
    (folder / "adapter.json").write_text(json.dumps(model.recreason_adapter))


def load_adapter(model, folder: Path):
    from safetensors.torch import load_file

    meta = json.loads((folder / "adapter.json").read_text())
    cfg = TrainConfig(adapter_size=meta["size"], lora_dropout=meta["dropout"])
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    for idx in meta["layers"]:
        layer = layers[idx]
        layer.self_attn.o_proj = Bottleneck(layer.self_attn.o_proj, hidden, cfg.adapter_size, cfg.lora_dropout)
        layer.mlp.down_proj = Bottleneck(layer.mlp.down_proj, hidden, cfg.adapter_size, cfg.lora_dropout)
    model.recreason_adapter = meta
    model.load_state_dict(load_file(str(folder / "adapter.safetensors")), strict=False)
    return model


def peft_config(model, cfg: TrainConfig, total_steps: int):
    import peft

    layers = top_layers(model, cfg.lora_top_layers)
    if cfg.method == "lora":
        return peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules),
                               layers_to_transform=layers)
    if cfg.method == "adalora":
        return peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=cfg.lora_r * 3 // 2, target_r=cfg.lora_r,
                                  lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=list(cfg.target_modules), layers_to_transform=layers,
                                  total_step=total_steps, tinit=max(1, total_steps // 10),
                                  tfinal=max(1, total_steps // 5))
    if cfg.method == "ia3":
        if layers is None:
            targets, feedforward = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
        else:  # IA3Config has no layers_to_transform: select the layers by regular expression
            which = "|".join(map(str, layers))
            targets = rf".*\.layers\.({which})\.(self_attn\.(k_proj|v_proj)|mlp\.down_proj)"
            feedforward = rf".*\.layers\.({which})\.mlp\.down_proj"
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
    if cfg.method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    raise ConfigError(f"{cfg.method!r} is not a peft method")


def apply_method(model, cfg: TrainConfig, total_steps: int = 1000):
    """Wrap ``model`` for ``cfg.method``; returns the model to train (only its trainable weights need grads)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"train.method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.method == "full":
        model.float()
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "adapter":
        return add_bottleneck_adapters(model, cfg)
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, cfg, total_steps))  # peft keeps adapter weights in fp32


def orthogonality_penalty(lm):
    """AdaLoRA's regulariser, weighted: the mean over its SVD factors of ||P P^T - I||_F (``lora_A``, rows)
    and ||Q^T Q - I||_F (``lora_B``, columns). peft adds it only to a loss the model computes from labels;
    we compute our own target-only loss, so the trainer adds it here. None for other methods."""
    import torch

    config = getattr(lm, "peft_config", {}).get("default")
    if config is None or str(getattr(config, "peft_type", "")) not in ("ADALORA", "PeftType.ADALORA"):
        return None
    terms = []
    for name, p in lm.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name) and p.numel():
            gram = p @ p.T if ".lora_A." in name else p.T @ p
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


def compile_layers(lm) -> int:
    """``torch.compile`` each decoder layer in place (state-dict names unchanged, so checkpoints and peft
    saving are unaffected), with dynamic shapes so new sequence lengths do not recompile. Fuses the
    element-wise work around the matrix products: +22% LoRA training tokens/s on 2 CPU cores after a
    one-time compile of about a minute (measured with benchmarks/train_throughput.py). Returns the
    number of layers compiled."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    layers = decoder_layers(base)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uses_position_ids(cfg_method: str) -> bool:
    """peft's prompt-learning wrappers build their own positions and refuse ``position_ids``."""
    return cfg_method not in ("prefix", "prompt")
