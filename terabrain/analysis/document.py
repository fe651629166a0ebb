"""A small document model rendered twice: as Markdown (report.md) and as a self-contained
HTML page (report.html) that shows the same pictures and tables."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence, Union


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Picture:
    path: str
    caption: str


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass
class Code:
    text: str


Block = Union[Heading, Paragraph, Picture, Table, Code]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                lines += ["#" * block.level + " " + block.text, ""]
            elif isinstance(block, Paragraph):
                lines += [block.text, ""]
            elif isinstance(block, Picture):
                lines += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
            elif isinstance(block, Code):
                lines += ["```", block.text, "```", ""]
            else:
                lines.append("| " + " | ".join(block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                          for row in block.rows]
                lines.append("")
        return "\n".join(lines)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if isinstance(block, Heading):
                body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
            elif isinstance(block, Paragraph):
                body.append(f"<p>{_inline(block.text)}</p>")
            elif isinstance(block, Picture):
                body.append(f'<figure><img src="{html.escape(block.path)}" '
                            f'alt="{html.escape(block.caption.replace("`", ""))}"><figcaption>'
                            f"{_inline(block.caption)}</figcaption></figure>")
            elif isinstance(block, Code):
                body.append(f"<pre>{html.escape(block.text)}</pre>")
            else:
                header = "".join(f"<th>{html.escape(cell)}</th>" for cell in block.header)
                rows = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row)
                               + "</tr>" for row in block.rows)
                body.append(f"<table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>")
        return _PAGE.format(title=html.escape(self.title), body="\n".join(body))


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in HTML; everything else escaped."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{part}</b>" if i % 2 else part for i, part in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #eee; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
figcaption {{ font-size: 0.9em; color: #444; }}
pre {{ background: #f4f4f4; padding: 0.6em; overflow-x: auto; }}
</style></head>
<body>
{body}
</body></html>
"""
