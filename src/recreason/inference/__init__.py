"""Inference: one Predictor over a trained run, used by every command and the server."""

from recreason.inference.predictor import Explanation, Predictor, Prompted, Request

__all__ = ["Explanation", "Predictor", "Prompted", "Request"]
