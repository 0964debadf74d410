"""Streaming readers of user row files (.jsonl, .csv): errors name the file and the 1-based line.

Lines are decoded one at a time, so a file that is not UTF-8 names its first bad line; a file longer
than ``max_rows`` rows stops there with an error saying how to go on (0: no cap, with a progress
record every ``PROGRESS_EVERY`` rows), so a huge file never hangs a run silently.
"""

from __future__ import annotations

import csv
import json
from typing import Any, Iterator

from absl import logging

from recovery_jax import errors

MAX_ROWS = 50_000
PROGRESS_EVERY = 50_000


def lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, text) of each line of ``path`` (line endings kept; a UTF-8 BOM dropped)."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise errors.UserError(f"{path}, line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                               f"{e.start + 1}); expected a UTF-8 file (re-save it as UTF-8)") from e
      yield n, text.lstrip("\ufeff") if n == 1 else text


def _counted(path: str, rows: Iterator[tuple[int, Any]], max_rows: int, cap_hint: str):
  count = 0
  for n, row in rows:
    count += 1
    if max_rows and count > max_rows:
      raise errors.UserError(f"{path}, line {n}: more than {max_rows} rows, the cap of this reader; {cap_hint}")
    if not max_rows and count % PROGRESS_EVERY == 0:
      logging.info("%s: %d rows read (line %d)", path, count, n)
    yield n, row


def jsonl_rows(path: str, *, expected: str, max_rows: int = MAX_ROWS, cap_hint: str = "use a smaller file",
               unit: str = "line") -> Iterator[tuple[int, Any]]:
  """(line number, parsed JSON value) of each non-blank line; a bad line is a UserError naming it (as
  ``unit`` n) and ``expected`` (what a row should be)."""
  def parsed():
    for n, text in lines(path):
      if not text.strip():
        continue
      try:
        yield n, json.loads(text)
      except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}, {unit} {n}: not valid JSON ({e.msg} at column {e.colno}); expected {expected}"
                               ) from e
  return _counted(path, parsed(), max_rows, cap_hint)


def csv_rows(path: str, *, max_rows: int = MAX_ROWS, cap_hint: str = "use a smaller file"
             ) -> tuple[list[str], Iterator[tuple[int, dict]]]:
  """(header fields, iterator of (line number, row dict)) of a CSV file with a header row; a row with
  more cells than the header is a UserError naming its line."""
  src = lines(path)
  last = [0]

  def text():
    for n, t in src:
      last[0] = n
      yield t
  reader = csv.DictReader(text())
  header = list(reader.fieldnames or [])

  def rows():
    for row in reader:
      if None in row:
        raise errors.UserError(f"{path}, line {last[0]}: more cells than the header's {len(header)} columns "
                               f"({', '.join(header)})")
      yield last[0], {k: v for k, v in row.items() if v is not None}
  return header, _counted(path, rows(), max_rows, cap_hint)
