"""Node-local staging: copy the shards a rank needs from the shared file system to fast
local storage (``data.stage_dir``) in a background thread while training starts.

Reads never wait for staging: a shard is read from the shared file system until its local
copy is complete and verified, and from the local copy after that. The bytes are the same
either way, so staging changes speed, never results.

Integrity and interruption: a shard is copied into ``.<name>.partial``; after the last byte
its SHA-256 is compared with the index's, and only then is it renamed to ``<name>`` and a
``<name>.sha256`` marker written (atomically). A later start trusts a copy only if its
marker matches the index and its size is right. An interrupted copy (kill, node reboot)
leaves the ``.partial`` file: the next start hashes what is there and appends the rest.
A copy whose checksum differs is deleted and copied once more from scratch; if it differs
again the shard is read from the shared file system and the failure is reported.

Ranks on one node may share a stage directory: local rank ``k`` copies every
``local_world``-th shard (in the order this epoch needs them) and uses the others' copies
as they appear. Copies live under a subdirectory named after the source location, so two
collections never mix.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from terabrain.data.shards import ShardTable
from terabrain.files import fsync_dir, write_text_atomically

CHUNK = 8 << 20
PLANNED_STEPS = 256  # how far into the epoch the copy order follows the reads


def copy_order(shards_per_step: Iterable[Iterable[int]], candidates: Iterable[int]) -> list[int]:
    """The ``candidates`` in the order the steps first read them (``shards_per_step``: the
    shards each step reads), then those no planned step reads, in number order."""
    candidates = {int(s) for s in candidates}
    need: list[int] = []
    seen: set[int] = set()
    for shards in shards_per_step:
        for shard in map(int, shards):
            if shard in candidates and shard not in seen:
                seen.add(shard)
                need.append(shard)
    return need + sorted(candidates - seen)


class Stager:
    def __init__(
        self,
        tables: Sequence[ShardTable],
        stage_dir: Path,
        need: Sequence[int],
        *,
        source: Path,
        local_rank: int = 0,
        local_world: int = 1,
        chunk_bytes: int = CHUNK,
        bytes_per_s: Optional[float] = None,
    ):
        missing = [str(t.path) for t in tables if t.sha256 is None]
        if missing:
            raise ValueError(
                f"staging needs shard checksums from an index ({missing[0]} has none): "
                "write the shards with `terabrain data pack`"
            )
        self.tables = list(tables)
        key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:12]
        self.directory = Path(stage_dir) / f"{Path(source).name}-{key}"
        self.mine = [s for position, s in enumerate(need) if position % local_world == local_rank]
        self.chunk_bytes = chunk_bytes
        self.bytes_per_s = bytes_per_s
        self.ready: dict[int, Path] = {}
        self.failed: dict[int, str] = {}
        self.copied_bytes = 0
        self.resumed_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def __getstate__(self):  # worker processes get a reader's view: no thread, no control
        state = dict(self.__dict__)
        state["_thread"], state["_stop"] = None, threading.Event()
        return state

    # --- reading side -------------------------------------------------------------------

    def locate(self, shard: int) -> Path:
        """Where to read ``shard`` now: the verified local copy, or the shared original."""
        found = self.ready.get(shard)
        if found is not None:
            return found
        if self._complete(shard):  # copied by another rank of this node
            self.ready[shard] = self._final(shard)
            return self.ready[shard]
        return self.tables[shard].path

    # --- copying side -------------------------------------------------------------------

    def start(self) -> "Stager":
        self._thread = threading.Thread(target=self._run, name="terabrain-staging", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once this rank's shards are all staged (or failed)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def progress(self) -> dict[str, float]:
        """This rank's share: shards with a verified local copy, and shards that failed."""
        mine = set(self.mine)
        return {"data_staged": float(sum(1 for s in list(self.ready) if s in mine)),
                "data_staging_failed": float(len(self.failed))}

    def _final(self, shard: int) -> Path:
        return self.directory / self.tables[shard].path.name

    def _marker(self, shard: int) -> Path:
        return self.directory / f"{self.tables[shard].path.name}.sha256"

    def _complete(self, shard: int) -> bool:
        table = self.tables[shard]
        try:
            return (self._marker(shard).read_text().strip() == table.sha256
                    and self._final(shard).stat().st_size == table.bytes)
        except OSError:
            return False

    def _run(self) -> None:
        for shard in self.mine:
            if self._stop.is_set():
                return
            if self._complete(shard):
                self.ready[shard] = self._final(shard)
                continue
            try:
                for attempt in (1, 2):
                    if self._copy(shard, resume=attempt == 1):
                        self.ready[shard] = self._final(shard)
                        break
                    if self._stop.is_set():
                        return
                else:
                    self.failed[shard] = "checksum differs from the index after two copies"
                    print(f"terabrain: staging {self.tables[shard].path} failed: "
                          f"{self.failed[shard]}; reading it from the shared file system",
                          file=sys.stderr)
            except OSError as error:
                self.failed[shard] = str(error)
                print(f"terabrain: staging {self.tables[shard].path} failed ({error}); "
                      "reading it from the shared file system", file=sys.stderr)

    def _copy(self, shard: int, resume: bool) -> bool:
        """Copy (or finish copying) one shard; True when complete and verified, False when
        the checksum differs or the copy was stopped."""
        table = self.tables[shard]
        partial = self.directory / f".{table.path.name}.partial"
        digest = hashlib.sha256()
        done = 0
        if resume and partial.exists() and partial.stat().st_size <= table.bytes:
            with open(partial, "rb") as existing:
                while block := existing.read(self.chunk_bytes):
                    digest.update(block)
                    done += len(block)
            self.resumed_bytes += done
        else:
            partial.unlink(missing_ok=True)
        began, start = time.monotonic(), done
        with open(table.path, "rb") as source, open(partial, "ab") as target:
            source.seek(done)
            while done < table.bytes:
                if self._stop.is_set():
                    return False
                block = source.read(min(self.chunk_bytes, table.bytes - done))
                if not block:
                    raise OSError(f"{table.path} ended after {done} of {table.bytes} bytes")
                target.write(block)
                digest.update(block)
                done += len(block)
                self.copied_bytes += len(block)
                if self.bytes_per_s:
                    ahead = (done - start) / self.bytes_per_s - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
            target.flush()
            os.fsync(target.fileno())
        if digest.hexdigest() != table.sha256:
            partial.unlink(missing_ok=True)
            return False
        os.replace(partial, self._final(shard))
        fsync_dir(self.directory)
        write_text_atomically(self._marker(shard), table.sha256 + "\n")
        return True
