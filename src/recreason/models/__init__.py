"""Resolve model names (aliases, Hugging Face ids, directories, GGUF files) and load them."""

from recreason.models.registry import ALIASES, ModelNotFound, load_model, load_tokenizer, resolve_model

__all__ = ["ALIASES", "ModelNotFound", "load_model", "load_tokenizer", "resolve_model"]
