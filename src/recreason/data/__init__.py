"""Data stage: read behaviour logs, validate them, extract explanation targets, split."""

from recreason.data.records import DataError, Explained, Review

__all__ = ["DataError", "Explained", "Review"]
