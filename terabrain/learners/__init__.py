"""Feature learners: one module per ``model.kind``, registered by name (terabrain.learners.registry)."""
