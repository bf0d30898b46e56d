"""Conditioning: noise-level, class and text embeddings, and the null condition guidance needs."""

from difflab.conditioning.embedding import (
    NULL_CLASS,
    ConditionEmbedding,
    NoiseEmbedding,
    drop_condition,
    null_condition,
)

__all__ = ["NULL_CLASS", "ConditionEmbedding", "NoiseEmbedding", "drop_condition", "null_condition"]
