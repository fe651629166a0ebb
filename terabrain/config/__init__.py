"""Experiment configuration: the shared sections (``sections``), the assembled schema
(``schema``), loading with overrides (``loader``) and the generated reference (``reference``).

Nothing is imported here: ``terabrain.config.sections`` is imported by the learners and the
data sources, which the schema in turn assembles, so the package itself must stay empty.
"""
