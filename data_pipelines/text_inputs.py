"""The documents of one text input file, for ``tokenize_text``: JSON lines (plain or gzip), parquet, txt.

Each reader yields :class:`TextItem` s in file order and reports a bad item to a ``work.Skips``
(which counts it, or raises under ``--on-error error``):

- ``*.jsonl``, ``*.jsonl.gz``, ``*.json.gz`` (one JSON object per line, as C4 and Dolma ship them):
  one document per line, its text in field ``field`` (``a.b``: field ``b`` of object ``a``, when
  no top-level key is literally ``a.b``). Blank lines are not documents. Key ``L000000042`` =
  line 42 (counted from 1). Bad lines: ``bad_utf8``, ``bad_json`` (not JSON, or not an object),
  ``missing_field`` (absent, null or not a string). A gzip stream that ends early keeps its
  complete lines and counts ``truncated_input`` once; undecodable gzip data counts
  ``corrupt_input``.
- ``*.parquet``: one document per row of column ``field`` (``a.b``: field ``b`` of struct column
  ``a``), read a batch of rows at a time so memory stays bounded for multi-GB files. Key
  ``R000000041`` = row 41 (counted from 0). A null is ``missing_field``. A file without that
  string column is a ``ValueError`` naming the file and its columns (a wrong ``--field`` should
  stop the job at once); a file that is not parquet, or breaks mid-way, counts ``corrupt_input``.
- anything else (``*.txt``, ``*.txt.gz``, ...): the whole file is one document (paragraphs of one
  file belong together), key ``doc``; invalid UTF-8 is ``bad_utf8``.

    for item in read_texts(Path("c4-00000.json.gz"), "text", Skips()):
        print(item.key, item.where, len(item.text))
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .work import Skips

SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".txt", ".txt.gz")  # a directory's inputs
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time (bounded memory for multi-GB files)


class TextItem(NamedTuple):
    key: str  # sample key: "L000000042" (line 42), "R000000041" (row 41), "doc" (whole file)
    position: str  # "42" / "41" / "": what follows "<input name>:" in the sample's source
    where: str  # for messages: "path:42", "path row 41", "path"
    text: str


def input_format(path: Path) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"txt"`` (whole file), from the file name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "txt"


def read_texts(path: Path, field: str, skips: Skips) -> Iterator[TextItem]:
    """The documents of ``path`` in file order (module docstring); bad items go to ``skips``."""
    fmt = input_format(path)
    if fmt == "jsonl":
        return _read_jsonl(path, field, skips)
    if fmt == "parquet":
        return _read_parquet(path, field, skips)
    return _read_whole(path, skips)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


_MISSING = object()


def _field(obj: dict, field: str):
    """``obj[field]`` (``a.b``: ``obj["a"]["b"]``), or ``_MISSING``."""
    if field in obj or "." not in field:
        return obj.get(field, _MISSING)
    for part in field.split("."):
        obj = obj.get(part, _MISSING) if isinstance(obj, dict) else _MISSING
    return obj


def _not_text(value, field: str) -> str:
    if value is _MISSING:
        return f"no field {field!r}"
    return f"field {field!r} is {'null' if value is None else type(value).__name__}, not a string"


def _read_jsonl(path: Path, field: str, skips: Skips) -> Iterator[TextItem]:
    line_no = 0
    try:
        with _open(path) as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    skips.bad("bad_utf8", where, f"not valid UTF-8 ({e})")
                    continue
                except json.JSONDecodeError as e:
                    skips.bad("bad_json", where, f"not valid JSON ({e})")
                    continue
                if not isinstance(obj, dict):
                    skips.bad("bad_json", where, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                text = _field(obj, field)
                if not isinstance(text, str):
                    skips.bad("missing_field", where, _not_text(text, field))
                    continue
                yield TextItem(f"L{line_no:09d}", str(line_no), where, text)
    except EOFError:
        skips.bad("truncated_input", str(path), f"compressed stream ends early after line {line_no}; "
                  "kept the complete lines before it")
    except (gzip.BadGzipFile, zlib.error) as e:
        skips.bad("corrupt_input", str(path), f"undecodable gzip data after line {line_no} ({e}); "
                  "kept the lines before it")


def _string_column(pf, path: Path, field: str):
    """``(top-level column, nested path)`` of ``field``; ``ValueError`` naming the file's columns."""
    import pyarrow as pa

    schema = pf.schema_arrow
    names = schema.names
    top, *rest = [field] if field in names or "." not in field else field.split(".")
    if top not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)}); "
                         "choose one with --field")
    kind = schema.field(top).type
    for part in rest:
        if not pa.types.is_struct(kind) or kind.get_field_index(part) < 0:
            raise ValueError(f"{path}: column {top!r} ({kind}) has no field {part!r}; choose --field")
        kind = kind.field(part).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise ValueError(f"{path}: column {field!r} holds {kind}, not strings; choose --field")
    return top, rest


def _read_parquet(path: Path, field: str, skips: Skips) -> Iterator[TextItem]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        skips.bad("corrupt_input", str(path), f"not a readable parquet file ({e})")
        return
    with pf:
        top, rest = _string_column(pf, path, field)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[top]):
                column = batch.column(0)
                if rest:
                    column = pc.struct_field(column, rest)
                for text in column.to_pylist():
                    if text is None:
                        skips.bad("missing_field", f"{path} row {row}", f"column {field!r} is null")
                    else:
                        yield TextItem(f"R{row:09d}", str(row), f"{path} row {row}", text)
                    row += 1
        except pa.ArrowException as e:
            skips.bad("corrupt_input", str(path), f"unreadable after row {row} ({e}); "
                      "kept the rows before it")


def _read_whole(path: Path, skips: Skips) -> Iterator[TextItem]:
    try:
        with _open(path) as f:
            data = f.read()
    except EOFError:
        skips.bad("truncated_input", str(path), "compressed stream ends early; the document is dropped")
        return
    except (gzip.BadGzipFile, zlib.error) as e:
        skips.bad("corrupt_input", str(path), f"undecodable gzip data ({e})")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.bad("bad_utf8", str(path), f"not valid UTF-8 ({e})")
        return
    yield TextItem("doc", "", str(path), text)
