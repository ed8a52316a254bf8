"""Training settings. Every field has a default; YAML files and CLI flags override them."""

from __future__ import annotations

from dataclasses import dataclass, field

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"  # alias, Hugging Face id (local cache), directory or .gguf
    method: str = "lora"  # lora | full
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES))
    lora_top_layers: int | None = None  # adapt only the last N decoder layers (backward stops there: faster)
    target: str = "sentence"  # explanation target: sentence | summary
    split_seed: int = 1
    max_prompt_tokens: int = 160
    max_target_tokens: int = 32
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # caps optimizer steps; wins over epochs
    max_train_records: int | None = None  # train on a random subset (quick runs)
    eval_every: int = 100  # optimizer steps between validation passes
    max_eval_records: int | None = 256  # validation records used for early stopping
    checkpoint_every: int | None = None  # steps between resumable checkpoints in RUN/last (default: eval_every)
    patience: int = 3  # validation passes without improvement before stopping
    precision: str = "bf16"  # bf16 (autocast; frozen base weights stored in bf16) | fp32
    seed: int = 42
    num_threads: int | None = None  # torch threads; default: all cores

    def validate(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"train.method must be 'lora' or 'full', got {self.method!r}")
        if self.target not in ("sentence", "summary"):
            raise ValueError(f"train.target must be 'sentence' or 'summary', got {self.target!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "max_target_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
