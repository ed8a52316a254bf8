"""Run directories: what ``recreason train`` writes and what later stages load.

Layout::

    run.json        model, method, dataset, split seed and prompt settings
    config.yaml     the full resolved configuration
    best/           best checkpoint (PEFT adapter or full model, safetensors)
    summary.json    training outcome: steps, best validation loss, wall time
    train_log.jsonl one line per validation pass
    tensorboard/    TensorBoard scalars
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from recreason.data.dataset import Dataset
from recreason.data.records import DataError, Explained
from recreason.prompts.discrete import DiscretePrompter, PromptConfig, render
from recreason.training.config import TrainConfig
from recreason.training.data import Example, encode


def target_text(record: Explained, target: str) -> str:
    return record.summary if target == "summary" else record.sentence


def build_examples(records, prompter: DiscretePrompter, tokenizer, cfg: TrainConfig, with_target: bool = True,
                   model=None):
    """Encode records as training examples; ``model`` (a RecReasonModel) maps user/item ids to its tables."""
    examples: list[Example] = []
    kept: list[Explained] = []
    for record in records:
        target = target_text(record, cfg.target) if with_target else None
        if with_target and not target:
            continue
        prompt = render(tokenizer, prompter.for_record(record)) if cfg.prompt_mode != "continuous" else \
            render(tokenizer, prompter.bare_messages())
        example = encode(tokenizer, prompt, target, cfg.max_prompt_tokens, cfg.max_target_tokens)
        if model is not None and model.uses_ids:
            example.user_idx = model.user_index.get(record.user, 0)
            example.item_idx = model.item_index.get(record.item, 0)
        example.rating = record.rating
        examples.append(example)
        kept.append(record)
    return examples, kept


def write_run_info(run_dir: Path, dataset_dir: str, base_path: str, cfg: TrainConfig, prompt: PromptConfig) -> None:
    info = {
        "model": cfg.model,
        "base_model_path": base_path,
        "method": cfg.method,
        "dataset": str(Path(dataset_dir).resolve()),
        "split_seed": cfg.split_seed,
        "target": cfg.target,
        "train": asdict(cfg),
        "prompt": asdict(prompt),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


class Run:
    """A trained run loaded from disk."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        info_path = self.dir / "run.json"
        if not info_path.exists():
            raise DataError(f"{self.dir} is not a training run (no run.json); run 'recreason train' first")
        self.info = json.loads(info_path.read_text())
        self.train_config = TrainConfig(**self.info["train"])
        self.prompt_config = PromptConfig(**self.info["prompt"])

    def dataset(self) -> Dataset:
        return Dataset(self.info["dataset"])

    def prompter(self, dataset: Dataset) -> DiscretePrompter:
        return DiscretePrompter(dataset.subset(self.info["split_seed"], "train"), self.prompt_config)

    def load_model(self, dtype: str = "float32", device: str = "cpu", merge: bool = True):
        """(RecReasonModel, tokenizer) with the best checkpoint applied; LoRA is merged for fast inference."""
        import torch

        from recreason.models.personalized import RecReasonModel
        from recreason.models.registry import load_model, load_tokenizer

        best = self.dir / "best"
        if not best.exists():
            raise DataError(f"{self.dir} has no best checkpoint; training did not finish a validation pass")
        if self.info["method"] == "full":
            from transformers import AutoModelForCausalLM

            torch_dtype = torch.bfloat16 if dtype in ("bf16", "bfloat16") else torch.float32
            from recreason.models.registry import attention_for

            lm = AutoModelForCausalLM.from_pretrained(best, dtype=torch_dtype,
                                                      attn_implementation=attention_for(device)).to(device)
            tokenizer = load_tokenizer(self.info["base_model_path"])
        elif self.info["method"] == "adapter":
            from recreason.training.methods import load_adapter

            base, tokenizer, _ = load_model(self.info["base_model_path"], dtype=dtype, device=device)
            lm = load_adapter(base, best).to(device)
        else:
            from peft import PeftModel

            from recreason.training.methods import MERGEABLE

            base, tokenizer, _ = load_model(self.info["base_model_path"], dtype=dtype, device=device)
            lm = PeftModel.from_pretrained(base, best)
            if merge and self.info["method"] in MERGEABLE:
                lm = lm.merge_and_unload()
        if (best / "personal.json").exists():
            model = RecReasonModel.load_personal(lm, best).to(device)
        else:
            model = RecReasonModel(lm)
        from recreason.training.methods import uses_position_ids

        model.pass_position_ids = uses_position_ids(self.info["method"])
        return model.eval(), tokenizer

    def export_merged(self, out_dir: str | Path) -> Path:
        """Write the fine-tuned model with its LoRA-family adapter merged into the base weights."""
        from recreason.training.methods import MERGEABLE

        method = self.info["method"]
        if method not in MERGEABLE + ("full",):
            raise DataError(f"a {method!r} run cannot be merged into the base weights; only {', '.join(MERGEABLE)}")
        model, tokenizer = self.load_model(dtype="fp32", merge=True)
        out = Path(out_dir)
        model.lm.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if model.uses_ids:
            model.save_personal(out)
        return out

    def prompt_for(self, prompter: DiscretePrompter, tokenizer, record: Explained) -> str:
        """The prompt text this run was trained with, for one record."""
        if self.train_config.prompt_mode == "continuous":
            return render(tokenizer, prompter.bare_messages())
        return render(tokenizer, prompter.for_record(record))
