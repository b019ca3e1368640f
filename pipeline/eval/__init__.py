"""Retrieval evaluation: metrics, downstream annotation formats, evaluation-time video decoding."""
