"""Top-K recommendation with a reason for each item."""

from recreason.recommendation.recommend import Recommender

__all__ = ["Recommender"]
