"""Transitional: the old resumable JSON-lines document writer, kept only while ``tokenize_images``
still imports it (issue 14 removes that route; delete this file with the import).

``DocWriter(out)`` writes ``OUT.partial`` and renames it to ``OUT`` on :meth:`DocWriter.finish`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


class DocWriter:
    """JSON-lines documents written to ``OUT.partial`` and renamed to ``OUT`` by :meth:`finish`.

    Each document is one line, metadata first and ``tokens`` last. :meth:`recover` truncates a
    line cut short by an interruption and returns the complete lines, so a rerun can skip them.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self._f = None
        self.docs = 0
        self.tokens = 0

    @property
    def complete(self) -> bool:
        """True when ``OUT`` exists (it is only ever created by renaming a finished partial file)."""
        return self.out.is_file()

    def recover(self) -> tuple[int, bytes | None]:
        """``(complete lines, last complete line)`` of ``OUT.partial`` (0, None if absent), after
        cutting off an incomplete last line."""
        if not self.partial.is_file():
            return 0, None
        lines, last, end = 0, None, 0
        with open(self.partial, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                lines, last, end = lines + 1, line, end + len(line)
        if end != self.partial.stat().st_size:
            os.truncate(self.partial, end)
        return lines, last

    def lines(self) -> Iterator[dict]:
        """The parsed complete lines of ``OUT.partial`` (call :meth:`recover` first)."""
        if self.partial.is_file():
            with open(self.partial, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def open(self, append: bool) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.partial, "a" if append else "w", encoding="utf-8")

    def write(self, docs: Iterable[dict]) -> None:
        """Append documents (dicts with ``tokens``, ``task``, ``source``, ...); flushed per call."""
        lines = []
        for doc in docs:
            tokens = doc["tokens"]
            meta = {k: v for k, v in doc.items() if k != "tokens"}
            lines.append(json.dumps({**meta, "tokens": tokens}, ensure_ascii=False) + "\n")
            self.docs += 1
            self.tokens += len(tokens)
        self._f.write("".join(lines))
        self._f.flush()

    def finish(self) -> Path:
        """Close and rename ``OUT.partial`` to ``OUT``; returns ``OUT``."""
        self.close()
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

