"""Serving: an HTTP API over a trained run, with a store, micro-batching, safety and grounding checks."""
