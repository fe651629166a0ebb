"""Data sources, transforms and preparation."""
