"""A causal LM with learned user/item vectors: PEPLER-style soft prompts and rating heads.

``RecReasonModel`` wraps any Hugging Face causal LM (plain, or wrapped by
PEFT) and adds, as configured:

* **soft prompt** (``prompt_mode`` ``continuous`` or ``hybrid``): one user and
  one item vector, sized to the LM's hidden width, placed as two tokens before
  the text prompt through ``inputs_embeds``. Rows are laid out as
  ``[user, item, pad..., prompt, target]``; the attention mask hides the
  padding and position ids count only attended tokens, so left padding and the
  KV cache work as for plain text. An id unseen in training maps to index 0,
  whose soft tokens are masked out: the row falls back to its text prompt
  instead of a random vector.
* **rating head** (``mf``: biased dot product of the user and item vectors;
  ``mlp``: a two-layer perceptron over both), trained jointly with the text
  loss (``loss = NLL + rating_weight * MSE``).
* **interest head**: low / medium / high (ratings 1-2 / 3 / 4-5) as a
  three-class classifier with cross-entropy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

INTEREST_LABELS = ("low", "medium", "high")


def interest_class(rating: float) -> int:
    """0 low (ratings below 2.5), 1 medium (2.5 to 3.5), 2 high (above 3.5)."""
    return 0 if rating < 2.5 else (1 if rating <= 3.5 else 2)


class RecReasonModel(nn.Module):
    def __init__(
        self,
        lm,
        users: Sequence[str] = (),
        items: Sequence[str] = (),
        prompt_mode: str = "discrete",
        rating_head: str | None = None,
        interest_head: bool = False,
        rating_mean: float = 3.0,
    ):
        super().__init__()
        from recreason.models.registry import contiguous_head_input

        contiguous_head_input(lm)  # also for models not loaded through the registry (full fine-tuning runs)
        if prompt_mode not in ("discrete", "continuous", "hybrid"):
            raise ValueError(f"prompt_mode must be discrete, continuous or hybrid, got {prompt_mode!r}")
        if rating_head not in (None, "mf", "mlp"):
            raise ValueError(f"rating_head must be null, mf or mlp, got {rating_head!r}")
        self.lm = lm
        self.prompt_mode = prompt_mode
        self.rating_head_kind = rating_head
        self.users = list(users)
        self.items = list(items)
        self.user_index = {u: n + 1 for n, u in enumerate(self.users)}  # 0 = unknown
        self.item_index = {i: n + 1 for n, i in enumerate(self.items)}
        self.soft = prompt_mode != "discrete"
        self.pass_position_ids = True  # peft prompt-learning methods make their own positions
        self.uses_ids = self.soft or rating_head is not None or interest_head
        hidden = lm.config.hidden_size
        if self.uses_ids:
            std = float(lm.get_input_embeddings().weight.detach().float().std())
            self.user_emb = nn.Embedding(len(self.users) + 1, hidden)
            self.item_emb = nn.Embedding(len(self.items) + 1, hidden)
            nn.init.normal_(self.user_emb.weight, std=std)
            nn.init.normal_(self.item_emb.weight, std=std)
        self.register_buffer("rating_mean", torch.tensor(float(rating_mean)), persistent=True)
        if rating_head == "mf":
            self.user_bias = nn.Embedding(len(self.users) + 1, 1)
            self.item_bias = nn.Embedding(len(self.items) + 1, 1)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.rating_scale = hidden**-0.5
        elif rating_head == "mlp":
            self.rating_mlp = nn.Sequential(nn.Linear(2 * hidden, 256), nn.Tanh(), nn.Linear(256, 1))
        self.interest = nn.Sequential(nn.Linear(2 * hidden, 256), nn.Tanh(), nn.Linear(256, 3)) if interest_head else None

    # ----- ids -----------------------------------------------------------------------------------
    def ids(self, users: Sequence[str], items: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.tensor([self.user_index.get(x, 0) for x in users], dtype=torch.long)
        i = torch.tensor([self.item_index.get(x, 0) for x in items], dtype=torch.long)
        return u, i

    def personal_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def personal_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("lm.")]

    # ----- heads ---------------------------------------------------------------------------------
    def predict_rating(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor | None:
        if self.rating_head_kind is None:
            return None
        u, i = self.user_emb(user_idx).float(), self.item_emb(item_idx).float()
        if self.rating_head_kind == "mf":
            value = (u * i).sum(-1) * self.rating_scale
            value = value + self.user_bias(user_idx).squeeze(-1) + self.item_bias(item_idx).squeeze(-1)
        else:
            value = self.rating_mlp(torch.cat([u, i], -1)).squeeze(-1)
        return value + self.rating_mean

    def predict_interest(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor | None:
        if self.interest is None:
            return None
        u, i = self.user_emb(user_idx).float(), self.item_emb(item_idx).float()
        return self.interest(torch.cat([u, i], -1))

    # ----- language model ------------------------------------------------------------------------
    def _lm_inputs(self, input_ids, attention_mask, user_idx=None, item_idx=None) -> dict:
        if not self.soft or user_idx is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.pass_position_ids:
                inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            return inputs
        embeds = self.lm.get_input_embeddings()(input_ids)
        soft = torch.stack([self.user_emb(user_idx), self.item_emb(item_idx)], 1).to(embeds.dtype)
        known = torch.stack([user_idx > 0, item_idx > 0], 1).to(attention_mask.dtype)
        mask = torch.cat([known, attention_mask], 1)
        inputs = {"inputs_embeds": torch.cat([soft, embeds], 1), "attention_mask": mask}
        if self.pass_position_ids:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs

    def forward(self, input_ids, attention_mask, user_idx=None, item_idx=None, logits_to_keep: int = 0, **kwargs):
        """LM outputs for the (soft +) text prompt; with ids, also ``rating`` and ``interest`` predictions."""
        inputs = self._lm_inputs(input_ids, attention_mask, user_idx, item_idx)
        out = self.lm(**inputs, logits_to_keep=logits_to_keep, use_cache=False)
        if self.uses_ids and user_idx is not None:
            out["rating"] = self.predict_rating(user_idx, item_idx)
            out["interest"] = self.predict_interest(user_idx, item_idx)
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, user_idx=None, item_idx=None, **kwargs):
        """Generate continuations; returns only the new tokens. The KV cache is used as usual."""
        inputs = self._lm_inputs(input_ids, attention_mask, user_idx, item_idx)
        if "inputs_embeds" in inputs:
            inputs.pop("position_ids", None)  # generate derives them from the attention mask
            return self.lm.generate(**inputs, **kwargs)  # with inputs_embeds only new tokens come back
        out = self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("return_dict_in_generate"):  # sequences, plus the scores or logits asked for
            out.sequences = out.sequences[:, input_ids.shape[1]:]
            return out
        return out[:, input_ids.shape[1]:]

    # ----- persistence ---------------------------------------------------------------------------
    def save_personal(self, folder: Path, gathered: dict | None = None) -> None:
        """Write the user/item tables and heads (from ``gathered``, weights gathered from shards, when given)."""
        from safetensors.torch import save_file

        meta = {"users": self.users, "items": self.items, "prompt_mode": self.prompt_mode,
                "rating_head": self.rating_head_kind, "interest_head": self.interest is not None}
        (folder / "personal.json").write_text(json.dumps(meta))
        source = self.personal_state() if gathered is None else {k: v for k, v in gathered.items() if not k.startswith("lm.")}
        state = {k: v.detach().cpu().contiguous() for k, v in source.items()}
        save_file(state, str(folder / "personal.safetensors"))

    @classmethod
    def load_personal(cls, lm, folder: Path) -> "RecReasonModel":
        from safetensors.torch import load_file

        meta = json.loads((folder / "personal.json").read_text())
        model = cls(lm, meta["users"], meta["items"], meta["prompt_mode"], meta["rating_head"], meta["interest_head"])
        model.load_state_dict(load_file(str(folder / "personal.safetensors")), strict=False)
        return model
