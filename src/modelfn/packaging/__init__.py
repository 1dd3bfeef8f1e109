"""Packaging: Lambda layers and their limits."""
