"""Batched decoding of explanations."""

from recreason.generation.generate import GenerateConfig, generate_texts

__all__ = ["GenerateConfig", "generate_texts"]
