"""Parallelism-free model code: layers and feature learners."""
