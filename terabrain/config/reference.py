"""The configuration reference, generated from the schema so it cannot drift from the code.

``python -m terabrain.config.reference > docs/config.md`` rewrites it; a test checks that
the committed file is current.
"""

from __future__ import annotations

import typing
from typing import Iterator

from pydantic import BaseModel

from terabrain.config.schema import ExperimentConfig


def _variants(annotation) -> list[type[BaseModel]]:
    """The section classes an annotation admits (several for a discriminated union)."""
    found = []
    stack = [annotation]
    while stack:
        candidate = stack.pop(0)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            found.append(candidate)
        else:
            stack.extend(typing.get_args(candidate))
    return found


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("<class '", "").replace("'>", "")


def fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(path, type, default, description) for every field, sections expanded; a section
    with variants (model, data, objective) is expanded once per variant, each row of a
    variant prefixed with its tag (``model[kind=deep].layers``)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        variants = _variants(info.annotation)
        if len(variants) == 1:
            section = variants[0]
            yield path, "section", "", (info.description or section.__doc__ or "").strip()
            yield from fields(section, f"{path}.")
            continue
        if variants:
            yield path, "section", "", (info.description or "").strip()
            for variant in variants:
                tag = next(k for k in ("kind", "source") if k in variant.model_fields)
                value = variant.model_fields[tag].default
                where = f"{path}[{tag}={value}]"
                yield where, "section", "", (variant.__doc__ or "").strip().replace("\n", " ")
                yield from fields(variant, f"{where}.")
            continue
        default = info.get_default(call_default_factory=True)
        required = info.is_required()
        yield path, _type_name(info.annotation), "required" if required else repr(default), info.description or ""


def markdown() -> str:
    lines = [
        "# Experiment configuration reference",
        "",
        "Generated from the schema (`terabrain/config/`, the learners in `terabrain/learners/`,",
        "the data sources in `terabrain/data/sources.py`) by `python -m terabrain.config.reference`.",
        "Every key can be set in an experiment's YAML or on the command line with",
        "`--set path=value` (the value is read as YAML: `--set data.photos=[camera,coffee]`).",
        "Unknown keys and values outside what is allowed stop the run with exit code 2.",
        "`model`, `data` and `objective` have variants: `model[kind=deep].layers` is written",
        "`model.layers` in a file whose `model.kind` is `deep`, and is refused for other kinds.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, kind, default, description in fields():
        cell = " ".join(description.replace("|", "\\|").split())
        default_cell = default if default == "required" else f"`{default}`"
        lines.append(f"| `{path}` | {kind.replace('|', ' or ')} | {default_cell} | {cell} |".replace("``", ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
