"""A read-only list of strings held as one UTF-8 blob and an array of offsets.

A catalog of N images used to keep N ``str`` objects and a list of pointers to them: about
49 bytes of object header plus 8 of pointer per string, on top of the text. Here the cost per
string is its text plus one offset (4 bytes while the blob is under 4 GiB, 8 beyond), and the
whole list is two numpy arrays, which also pickle quickly for worker processes. A string is
decoded when it is asked for.

Strings are encoded with ``surrogatepass``, so the names ``os.walk`` gives for file names
that are not valid UTF-8 (lone surrogates, PEP 383) come back exactly, and the blob's byte
order is the strings' code-point order (UTF-8 preserves it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

_ENCODING, _ERRORS = "utf-8", "surrogatepass"


class PackedStrings(Sequence):
    """``strings[i]`` decodes the i-th string; ``len``, iteration, ``in``, ``index`` as for a
    list (``Sequence``)."""

    __slots__ = ("blob", "offsets")

    def __init__(self, strings: Iterable[str] = ()):
        encoded = [s.encode(_ENCODING, _ERRORS) for s in strings]
        ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0
        dtype = np.uint32 if total < 2**32 else np.int64
        self.offsets = np.zeros(len(encoded) + 1, dtype=dtype)
        self.offsets[1:] = ends
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"string {index} of {len(self)}")
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.blob[start:end].tobytes().decode(_ENCODING, _ERRORS)

    @property
    def nbytes(self) -> int:
        """The bytes the list holds: text plus offsets."""
        return self.blob.nbytes + self.offsets.nbytes

    def __eq__(self, other) -> bool:
        return isinstance(other, (PackedStrings, list, tuple)) and len(self) == len(other) \
            and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings, {self.nbytes} bytes)"

    def __getstate__(self):
        return {"blob": self.blob, "offsets": self.offsets}

    def __setstate__(self, state):
        self.blob, self.offsets = state["blob"], state["offsets"]
