"""Batch jobs: reasons for a file of pairs, or every user's top K. ``batch`` runs them on this machine through a
journal; ``cluster`` runs the same rows as shards on Ray."""

from recreason.jobs.batch import (Journal, Pair, explain_pairs, explain_rows, read_pairs, recommend_all,
                                  recommend_rows, write_rows)

__all__ = ["Journal", "Pair", "explain_pairs", "explain_rows", "read_pairs", "recommend_all", "recommend_rows",
           "write_rows"]
