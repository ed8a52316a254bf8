"""recreason: fine-tune a language model to explain recommendations.

Stages live in sub-packages: ``data`` (read, validate, extract, split),
``prompts`` (turn behaviour into model input), ``models`` (resolve and load
causal LMs), ``training`` (fine-tuning engine), ``generation`` (batched
decoding) and ``evaluation`` (PETER-compatible metrics and baselines).
"""

__version__ = "0.1.0"
