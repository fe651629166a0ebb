"""The configuration reference, generated from the schema so it cannot drift from the code.

``python -m terabrain.config.reference > docs/config.md`` rewrites it; a test checks that
the committed file is current.
"""

from __future__ import annotations

import typing
from typing import Iterator

from pydantic import BaseModel

from terabrain.config.schema import ExperimentConfig


def _section_type(annotation) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("<class '", "").replace("'>", "")


def fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(path, type, default, description) for every field, sections expanded."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_type(info.annotation)
        if section is not None:
            yield path, "section", "", (info.description or section.__doc__ or "").strip()
            yield from fields(section, f"{path}.")
            continue
        default = info.get_default(call_default_factory=True)
        yield path, _type_name(info.annotation), repr(default), info.description or ""


def markdown() -> str:
    lines = [
        "# Experiment configuration reference",
        "",
        "Generated from `terabrain/config/schema.py` by `python -m terabrain.config.reference`.",
        "Every key can be set in an experiment's YAML or on the command line with",
        "`--set path=value` (the value is read as YAML: `--set data.photos=[camera,coffee]`).",
        "Unknown keys and values outside what is allowed stop the run with exit code 2.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, kind, default, description in fields():
        cell = description.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{path}` | {kind.replace('|', ' or ')} | `{default}` | {cell} |".replace("``", ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
