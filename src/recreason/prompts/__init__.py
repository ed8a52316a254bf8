"""Turn behaviour into model input."""

from recreason.prompts.discrete import DiscretePrompter, PromptConfig

__all__ = ["DiscretePrompter", "PromptConfig"]
