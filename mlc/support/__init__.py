"""Formats and helpers shared by every layer (no TVM compiler imports here)."""
