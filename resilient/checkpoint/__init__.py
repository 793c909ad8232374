"""Checkpoint layout, commit protocol, discovery, loading and retention."""
