"""Adapter registry (object storage); no torch import."""
