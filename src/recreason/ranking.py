"""The ranking stage: which items to recommend, before the language model says why.

Rating regression is the wrong objective for top-K, so ranking comes from a maintained implicit-feedback
library: ``implicit`` (Frederickson's ALS, Hu et al. 2008, and BPR, Rendle et al. 2009; CPU and GPU). One small
interface over it (fit on the training split's interactions, score (user, items), recommend, save, load
next to the run) and popularity for users the model has never seen.

Saved as ``ranker.json`` (settings, ids) and ``ranker.npz`` (factors, popularity), read back without pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from recreason.config import RankConfig
from recreason.errors import CheckpointMismatch, ConfigError, NotARun

MODELS = ("als", "bpr", "popularity")


class Ranker:
    """Scores items for users. ``model: popularity`` (or a user it has not seen) ranks by training counts."""

    def __init__(self, config: RankConfig | None = None):
        self.config = config or RankConfig()
        if self.config.model not in MODELS:
            raise ConfigError(f"rank.model must be one of {', '.join(MODELS)}, got {self.config.model!r}")
        self.users: list[str] = []
        self.items: list[str] = []
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.popularity = np.zeros(0, dtype=np.float32)
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    # ----- fitting -----------------------------------------------------------------------------
    def fit(self, interactions: Iterable[tuple[str, str]]) -> "Ranker":
        """Fit on (user, item) pairs of the training split; repeated pairs count once."""
        from scipy.sparse import csr_matrix

        pairs = sorted(set(interactions))
        if not pairs:
            raise ConfigError("the ranker needs at least one training interaction")
        self.users = sorted({u for u, _ in pairs})
        self.items = sorted({i for _, i in pairs})
        self.user_index = {u: n for n, u in enumerate(self.users)}
        self.item_index = {i: n for n, i in enumerate(self.items)}
        rows = np.array([self.user_index[u] for u, _ in pairs])
        cols = np.array([self.item_index[i] for _, i in pairs])
        matrix = csr_matrix((np.ones(len(pairs), dtype=np.float32), (rows, cols)),
                            shape=(len(self.users), len(self.items)))
        self.popularity = np.asarray(matrix.sum(0), dtype=np.float32).ravel()
        if self.config.model != "popularity":
            from threadpoolctl import threadpool_limits

            model = self._library_model()
            with threadpool_limits(1, "blas"):  # implicit parallelises itself; a BLAS pool inside it only contends
                model.fit(matrix, show_progress=False)
            self.user_factors = np.asarray(_to_numpy(model.user_factors), dtype=np.float32)
            self.item_factors = np.asarray(_to_numpy(model.item_factors), dtype=np.float32)
        return self

    def _library_model(self):
        cfg = self.config
        common = dict(factors=cfg.factors, regularization=cfg.regularization, iterations=cfg.iterations,
                      random_state=cfg.seed)
        if cfg.model == "als":
            from implicit.als import AlternatingLeastSquares

            return AlternatingLeastSquares(alpha=cfg.alpha, use_gpu=cfg.use_gpu, **common)
        from implicit.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking(learning_rate=cfg.learning_rate, use_gpu=cfg.use_gpu, **common)

    # ----- scoring -----------------------------------------------------------------------------
    def knows(self, user: str) -> bool:
        return self.user_factors is not None and user in self.user_index

    def score(self, user: str, items: Sequence[str]) -> list[float]:
        """A score per item (higher ranks first); items the ranker never saw score below every known item."""
        known = [self.item_index.get(i, -1) for i in items]
        idx = np.array([k if k >= 0 else 0 for k in known], dtype=np.int64)
        if self.knows(user):
            scores = self.item_factors[idx] @ self.user_factors[self.user_index[user]]
            scores = scores + self.config.popularity_weight * np.log1p(self.popularity[idx])
        else:
            scores = self.popularity[idx]
        scores = np.where(np.array(known) >= 0, scores, -np.inf)
        return [float(s) for s in scores]

    def scores_all(self, user: str) -> np.ndarray:
        """Scores of every item the ranker knows, in ``self.items`` order (one matrix-vector product)."""
        if self.knows(user):
            scores = self.item_factors @ self.user_factors[self.user_index[user]]
            return scores + self.config.popularity_weight * np.log1p(self.popularity)
        return self.popularity.copy()

    def recommend(self, user: str, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The top ``k`` known items for ``user``, leaving out ``exclude`` (items already seen)."""
        scores = self.scores_all(user)
        for item in exclude:
            n = self.item_index.get(item)
            if n is not None:
                scores[n] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        if k <= 0:
            return []
        top = np.lexsort((np.arange(len(scores)), -scores))[:k]  # by score, ties by item order: deterministic
        return [(self.items[n], float(scores[n])) for n in top]

    # ----- persistence -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"popularity": self.popularity}
        if self.user_factors is not None:
            arrays.update(user_factors=self.user_factors, item_factors=self.item_factors)
        np.savez(folder / "ranker.npz", **arrays)
        meta = {"config": asdict(self.config), "users": self.users, "items": self.items}
        (folder / "ranker.json").write_text(json.dumps(meta) + "\n")
        return folder

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether ``folder`` holds a saved ranker (a run without one ranks by its heads or popularity)."""
        return (Path(folder) / "ranker.json").exists()

    @classmethod
    def load(cls, folder: str | Path) -> "Ranker":
        folder = Path(folder)
        if not (folder / "ranker.json").exists():
            raise NotARun(f"{folder} holds no ranker (ranker.json); fit one with 'recreason rank'")
        try:
            meta = json.loads((folder / "ranker.json").read_text())
            arrays = np.load(folder / "ranker.npz", allow_pickle=False)
            ranker = cls(RankConfig(**meta["config"]))
            ranker.users, ranker.items = meta["users"], meta["items"]
            ranker.popularity = arrays["popularity"]
            if "user_factors" in arrays:
                ranker.user_factors, ranker.item_factors = arrays["user_factors"], arrays["item_factors"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointMismatch(f"{folder}: the ranker files are damaged ({exc}); fit it again with "
                                     "'recreason rank'") from None
        ranker.user_index = {u: n for n, u in enumerate(ranker.users)}
        ranker.item_index = {i: n for n, i in enumerate(ranker.items)}
        return ranker


def _to_numpy(array):
    return array.to_numpy() if hasattr(array, "to_numpy") else array


def fit_ranker(train_records, config: RankConfig | None = None) -> Ranker:
    return Ranker(config).fit((r.user, r.item) for r in train_records)
