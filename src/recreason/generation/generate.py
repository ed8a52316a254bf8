"""Batched generation with left padding and the KV cache.

Prompts are sorted by length so each batch pads little, generated in batches,
and returned in the caller's order. Greedy decoding is the default; beam
search and sampling are options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from recreason.config import GenerateConfig


def clean_output(text: str) -> str:
    """First line of the answer, stripped: explanations are one sentence."""
    text = text.strip()
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: Sequence[str], cfg: GenerateConfig | None = None, progress: bool = True,
    desc: str = "generating", users: Sequence[str] | None = None, items: Sequence[str] | None = None,
) -> list[str]:
    """Decode one explanation per prompt. ``model`` is a RecReasonModel (soft prompts use ``users`` and
    ``items``) or a plain Hugging Face causal LM."""
    cfg = cfg or GenerateConfig()
    personal = hasattr(model, "user_index")
    if personal and model.soft and (users is None or items is None):
        raise ValueError("this model has user/item prompt vectors: pass users and items")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    torch.manual_seed(cfg.seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="text", disable=not progress)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        kwargs = dict(
            max_new_tokens=cfg.max_new_tokens,
            num_beams=cfg.num_beams,
            do_sample=cfg.do_sample,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        if personal:
            if model.uses_ids and users is not None:
                u, i = model.ids([users[j] for j in idx], [items[j] for j in idx])
                kwargs.update(user_idx=u.to(device), item_idx=i.to(device))
            new = model.generate(batch["input_ids"], batch["attention_mask"], **kwargs)
        else:
            out = model.generate(**batch, **kwargs)
            new = out[:, batch["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = clean_output(text)
        bar.update(len(idx))
    bar.close()
    return outputs
