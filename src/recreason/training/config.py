"""Training settings. Every field has a default; YAML files and CLI flags override them."""

from __future__ import annotations

from dataclasses import dataclass, field

LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"  # alias, Hugging Face id (local cache), directory or .gguf
    method: str = "lora"  # full | lora | adalora | ia3 | prefix | prompt | adapter
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout on the LoRA/adapter input; 0.05 costs ~15% of a CPU step (RNG per module)
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES))
    lora_top_layers: int | None = None  # adapt only the last N decoder layers (backward stops there: faster)
    adapter_size: int = 64  # bottleneck width of the adapter method
    num_virtual_tokens: int = 16  # prefix and prompt tuning
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    scheduler: str = "linear"  # linear | cosine, both after linear warmup
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    fsdp: bool = False  # with several processes: shard the model (FSDP2) instead of replicating it (DDP)
    compile: bool = False  # torch.compile each decoder layer: faster steps after a one-time compile (~1 min)
    attn_implementation: str = "auto"  # auto (eager on CPU, sdpa on GPU) | eager | sdpa | flash_attention_2
    target: str = "sentence"  # explanation target: sentence | summary
    prompt_mode: str = "discrete"  # discrete (text) | continuous (learned user/item vectors) | hybrid (both)
    rating_head: str | None = None  # null | mf | mlp: predict the rating jointly with the text
    interest_head: bool = False  # also classify interest low/medium/high (ratings 1-2 / 3 / 4-5)
    personal_lr: float | None = 1e-2  # learning rate of user/item vectors and heads (null: same as lr)
    rating_weight: float = 0.1  # lambda in loss = NLL + lambda * (rating MSE + interest cross-entropy)
    two_stage: bool = False  # PEPLER: stage 1 trains only user/item vectors and heads, LM frozen
    stage1_steps: int = 100  # optimizer steps of stage 1 (it may stop earlier on validation loss)
    stage1_lr: float = 1e-2  # learning rate of stage 1
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
    precision: str = "bf16"  # bf16 (autocast; frozen base weights stored in bf16) | fp16 (GPU, loss scaling) | fp32
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard and/or wandb
    seed: int = 42
    num_threads: int | None = None  # torch threads; default: all cores

    def validate(self) -> None:
        from recreason.training.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"train.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"train.optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.scheduler not in ("linear", "cosine"):
            raise ValueError(f"train.scheduler must be linear or cosine, got {self.scheduler!r}")
        if self.attn_implementation not in ("auto", "eager", "sdpa", "flash_attention_2"):
            raise ValueError(f"train.attn_implementation must be auto, eager, sdpa or flash_attention_2, "
                             f"got {self.attn_implementation!r}")
        if self.fsdp and (self.two_stage or self.method in ("adalora", "prefix", "prompt") or self.compile
                          or self.precision == "fp16"):
            raise ValueError("train.fsdp works with methods full, lora, ia3 and adapter; it does not support "
                             "adalora, prefix, prompt, two_stage, compile or fp16 yet")
        if self.target not in ("sentence", "summary"):
            raise ValueError(f"train.target must be 'sentence' or 'summary', got {self.target!r}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"train.precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.prompt_mode not in ("discrete", "continuous", "hybrid"):
            raise ValueError(f"train.prompt_mode must be discrete, continuous or hybrid, got {self.prompt_mode!r}")
        if self.rating_head not in (None, "mf", "mlp"):
            raise ValueError(f"train.rating_head must be null, mf or mlp, got {self.rating_head!r}")
        if self.two_stage and self.prompt_mode == "discrete" and not (self.rating_head or self.interest_head):
            raise ValueError("train.two_stage needs learned vectors: a continuous/hybrid prompt or a head")
        for name in ("batch_size", "grad_accum", "eval_every", "max_target_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
