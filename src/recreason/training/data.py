"""Encoding (prompt, target) pairs and batching them with left padding.

Left padding puts every target at the end of its row, so the loss needs
logits only for the last ``max target length + 1`` positions: the model's
``logits_to_keep`` skips the vocabulary projection for all prompt positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from recreason.config import TrainConfig
from recreason.errors import ConfigError
from recreason.data.records import Explained, target_text
from recreason.prompts.discrete import DiscretePrompter, render, uses_soft_prompt


@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    user_idx: int = 0  # index in the model's user table (0: unknown)
    item_idx: int = 0
    rating: float = 0.0
    rejected: "Example | None" = None  # preference training: the same prompt with the text not to prefer
    reference_logp: float = 0.0  # log-probability of the target under the reference model (preference training)

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.target_ids), len(self.rejected.target_ids) if self.rejected else 0)


def encode(tokenizer, prompt: str, target: str | None, max_prompt: int, max_target: int) -> Example:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_prompt:
        raise ConfigError(f"prompt has {len(prompt_ids)} tokens, more than max_prompt_tokens={max_prompt}")
    target_ids: list[int] = []
    if target is not None:
        target_ids = tokenizer(target.strip(), add_special_tokens=False)["input_ids"][: max_target - 1]
        target_ids.append(tokenizer.eos_token_id)
    return Example(prompt_ids, target_ids)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch; labels are -100 everywhere but on target tokens. Examples that carry a rejected text
    (preference training) are followed by their rejected rows, with ``reference_logp`` and ``pairs``."""
    if examples and all(e.rejected is not None for e in examples):
        rows = [*examples, *(e.rejected for e in examples)]
        batch = collate(rows, pad_id)
        batch["reference_logp"] = torch.tensor([e.reference_logp for e in rows], dtype=torch.float)
        batch["pairs"] = torch.tensor(len(examples))
        return batch
    length = max(len(e) for e in examples)
    n_target = max(len(e.target_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.target_ids
        ids[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
        if e.target_ids:
            labels[row, length - len(e.target_ids) :] = torch.tensor(e.target_ids)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "n_target": torch.tensor(n_target),
            "user_idx": torch.tensor([e.user_idx for e in examples], dtype=torch.long),
            "item_idx": torch.tensor([e.item_idx for e in examples], dtype=torch.long),
            "rating": torch.tensor([e.rating for e in examples], dtype=torch.float)}


def length_bucketed_batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random, bucket_factor: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar lengths: less padding, still random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * bucket_factor
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: len(examples[i]))
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def _forward(model, batch: dict[str, torch.Tensor]):
    core = getattr(model, "module", model)  # unwrap DistributedDataParallel for attribute access
    extra = {k: batch[k] for k in ("user_idx", "item_idx") if k in batch and getattr(core, "uses_ids", False)}
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=int(batch["n_target"]) + 1,
        use_cache=False,
        **extra,
    )


def _text_loss(out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    n_target = int(batch["n_target"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, -n_target:]
    n_tokens = int((labels != -100).sum())
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / max(n_tokens, 1), n_tokens


def sequence_logps(out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the summed log-probability of its target tokens."""
    n_target = int(batch["n_target"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, -n_target:]
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(-1)


def preference_loss(model, batch: dict[str, torch.Tensor], beta: float, sft_weight: float
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023) on (chosen, rejected) rows against the reference model's log-probabilities,
    plus ``sft_weight`` times the chosen texts' mean token NLL (which keeps the texts fluent)."""
    out = _forward(model, batch)
    logp = sequence_logps(out, batch)
    n = int(batch["pairs"])
    gain = logp - batch["reference_logp"].to(logp.device)
    margin = beta * (gain[:n] - gain[n:])
    dpo = -torch.nn.functional.logsigmoid(margin).mean()
    chosen_tokens = int((batch["labels"][:n] != -100).sum())
    nll = -logp[:n].sum() / max(chosen_tokens, 1)
    loss = dpo + sft_weight * nll
    return loss, {"text": nll.item(), "preference": dpo.item(), "prefers_chosen": float((margin > 0).float().mean()),
                  "tokens": chosen_tokens}


@torch.no_grad()
def reference_logps(model, examples: Sequence[Example], pad_id: int, device: str, batch_size: int = 16) -> None:
    """Set ``reference_logp`` of every example and of its rejected text: the model as it is now is the reference."""
    was_training = model.training
    model.eval()
    rows = [r for e in examples for r in (e, e.rejected) if r is not None]
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([_plain(r) for r in part], pad_id).items()}
        for row, value in zip(part, sequence_logps(_forward(model, batch), batch).tolist()):
            row.reference_logp = value
    model.train(was_training)


def _plain(e: Example) -> Example:
    return Example(e.prompt_ids, e.target_ids, e.user_idx, e.item_idx, e.rating)


def target_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over target tokens, with logits computed only where targets are."""
    return _text_loss(_forward(model, batch), batch)


def joint_loss(model, batch: dict[str, torch.Tensor], rating_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Text NLL plus ``rating_weight`` times the rating MSE and interest cross-entropy, where heads exist.

    One forward pass computes everything (the heads run inside ``RecReasonModel.forward``), so the
    loss is the same under DistributedDataParallel.
    """
    from recreason.models.personalized import interest_class

    out = _forward(model, batch)
    text, n_tokens = _text_loss(out, batch)
    loss = text
    parts = {"text": text.item(), "tokens": n_tokens}
    rating = out.get("rating")
    if rating is not None:
        mse = torch.nn.functional.mse_loss(rating, batch["rating"])
        loss = loss + rating_weight * mse
        parts["rating_mse"] = mse.item()
    interest = out.get("interest")
    if interest is not None:
        target = torch.tensor([interest_class(float(r)) for r in batch["rating"]], device=interest.device)
        ce = torch.nn.functional.cross_entropy(interest, target)
        loss = loss + rating_weight * ce
        parts["interest_ce"] = ce.item()
    return loss, parts


def build_examples(records, prompter: DiscretePrompter, tokenizer, cfg: TrainConfig, with_target: bool = True,
                   model=None, texts: Mapping[int, Sequence[str]] | None = None,
                   rejected: Mapping[int, str] | None = None) -> tuple[list[Example], list[Explained]]:
    """Encode records as training examples; ``model`` (a RecReasonModel) maps user/item ids to its tables.
    ``texts``: the targets of each record by its index instead of its own explanation (one example per text;
    records without an entry are left out), e.g. the reasons a run chose among its candidates (`distill`);
    ``rejected``: a text not to prefer for the same record, carried by its examples (preference training)."""
    examples: list[Example] = []
    kept: list[Explained] = []
    for record in records:
        if texts is not None:
            targets = [t for t in texts.get(record.index, ()) if t.strip()]
        else:
            targets = [target_text(record, cfg.target) if with_target else None]
        if with_target and not all(targets):
            continue
        soft = uses_soft_prompt(cfg.prompt_mode, known_to_model=True)  # every training user has a vector
        prompt = render(tokenizer, prompter.bare_messages() if soft else prompter.for_record(record),
                        prompter.config.answer_cue)
        for target in targets:
            example = encode(tokenizer, prompt, target, cfg.max_prompt_tokens, cfg.max_target_tokens)
            if rejected is not None and rejected.get(record.index, "").strip():
                other = encode(tokenizer, prompt, rejected[record.index], cfg.max_prompt_tokens, cfg.max_target_tokens)
                example.rejected = other
            if model is not None and model.uses_ids:
                example.user_idx = model.user_index.get(record.user, 0)
                example.item_idx = model.item_index.get(record.item, 0)
            example.rating = record.rating
            if example.rejected is not None:
                example.rejected.user_idx, example.rejected.item_idx = example.user_idx, example.item_idx
                example.rejected.rating = record.rating
            examples.append(example)
            kept.append(record)
    return examples, kept
