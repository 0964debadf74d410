"""Stored results are checked: a damaged work unit (flipped byte, truncated or deleted file, no
checksum) is named in one warning line and computed again, to the numbers of a clean run (or stops
the run with ``on_corrupt="stop"``); a full disk is one UserError line naming the path and the size,
with the finished units still readable. Also ``outputs.atomic_write`` / ``write_jsonl`` on a full disk
and the checksum file of an SAE export."""

import errno
import glob
import json
import os
import shutil

import numpy as np
import pytest

from recovery_jax import errors, outputs, sweep

UNITS = sweep.make_units(sweep.expand_grid({"a": [0, 1, 2], "b": [0, 1]}), [], 2)  # 3 units of 2 points


def _compute(u):
  """Deterministic numbers per point; 'x' is large enough that orbax stores it in a data file."""
  ids = np.array([p["point_id"] for p in u.points])
  return {"x": np.sin(ids[:, None] * 1.3 + np.arange(1000)[None] / 7.0).astype(np.float32),
          "ids": ids.astype(np.int32), "nested": {"s": np.float32(ids.sum())}}


def _run(directory, units=UNITS, **kw):
  """run_units on a fresh store -> (results, unit ids computed, log lines)."""
  computed, lines = [], []
  store = sweep.UnitStore(str(directory))
  try:
    res = sweep.run_units(units, lambda u: (computed.append(u.unit_id), _compute(u))[1], store, log=lines.append, **kw)
  finally:
    store.close()
  return res, computed, lines


def _same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert sweep.tree_checksum(a[k]) == sweep.tree_checksum(b[k]), k


def _data_file(unit_dir):
  """The largest file of the unit: the OCDBT data file holding the 'x' array's (zstd) bytes."""
  files = [f for f in glob.glob(os.path.join(unit_dir, "**"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


# damage done to unit 1 of a finished store


def _flip_byte(unit_dir):
  path = _data_file(unit_dir)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10
    f.seek(0)
    f.write(data)


def _truncate(unit_dir):
  path = _data_file(unit_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _drop_checksum(unit_dir):  # as saved by the code before checksums
  path = os.path.join(unit_dir, "_CHECKPOINT_METADATA")
  with open(path) as f:
    meta = json.load(f)
  assert sweep.CHECKSUM_KEY in meta["custom_metadata"]
  meta["custom_metadata"] = {}
  with open(path, "w") as f:
    json.dump(meta, f)


def _delete_step_metadata(unit_dir):  # the file that holds the checksum
  os.remove(os.path.join(unit_dir, "_CHECKPOINT_METADATA"))


def _delete_entry(unit_dir):  # orbax's tree metadata of the unit
  os.remove(os.path.join(unit_dir, "default", "_METADATA"))


def _delete_data_file(unit_dir):
  os.remove(_data_file(unit_dir))


def _delete_unit_dir(unit_dir):  # a lower step than the latest: orbax used to skip saving it again
  shutil.rmtree(unit_dir)


def _full_disk(monkeypatch):
  """Orbax's write of each numpy leaf: writes, then raises ENOSPC for the big array (half-written unit)."""
  from orbax.checkpoint._src.serialization import type_handlers  # pylint: disable=import-outside-toplevel
  real = type_handlers.NumpyHandler._open_and_write  # pylint: disable=protected-access

  async def write(self, value, tspec, ts_context):
    await real(self, value, tspec, ts_context)
    if value.size >= 1000:
      raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", write)


# (case, damage to unit 1 after a finished run | "full_disk" while unit 2 is saved, on_corrupt, expected)
# expected: "recompute" = one warning naming unit 1 and its path, unit 1 computed again, the numbers
# of a clean run; "resume" = no warning, unit 1 computed again; else a regex of the UserError.
CASES = [
    ("flipped_byte", _flip_byte, "recompute", "recompute"),  # before: resumed silently, WRONG numbers
    ("truncated_file", _truncate, "recompute", "recompute"),  # before: ValueError OUT_OF_RANGE traceback
    ("missing_checksum", _drop_checksum, "recompute", "recompute"),  # before: no checksum, nothing checked
    ("step_metadata_deleted", _delete_step_metadata, "recompute", "recompute"),  # before: resumed, unchecked
    ("deleted_entry", _delete_entry, "recompute", "recompute"),  # before: FileNotFoundError traceback
    ("deleted_data_file", _delete_data_file, "recompute", "recompute"),  # before: ValueError traceback
    ("deleted_unit_dir", _delete_unit_dir, "recompute", "resume"),  # before: recomputed, never saved again
    ("flipped_byte_stop", _flip_byte, "stop", r"work unit 1 at \S+/units/1 is corrupt: its arrays do not match "
     r"the checksum.*on_corrupt='stop'"),  # before: no on_corrupt; resumed with wrong numbers
    ("truncated_file_stop", _truncate, "stop", r"work unit 1 at \S+/units/1 is corrupt: unreadable"),
    ("full_disk", "full_disk", "recompute", r"\S+/units/2: no space left on device saving work unit 2 \(it needs "
     r"about 8\.0 KB.*finished work units are kept"),  # before: 5 OSError tracebacks, 2.orbax-checkpoint-tmp left
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  res, computed, _ = _run(tmp_path_factory.mktemp("clean") / "units")
  assert computed == [0, 1, 2]
  return res


@pytest.mark.parametrize("name,damage,on_corrupt,expected", CASES, ids=[c[0] for c in CASES])
def test_damaged_store(tmp_path, monkeypatch, capfd, clean, name, damage, on_corrupt, expected):
  del name
  units = str(tmp_path / "units")
  if damage == "full_disk":
    _run(units, UNITS[:2])
    _full_disk(monkeypatch)
  else:
    _run(units)
    damage(os.path.join(units, "1"))
  capfd.readouterr()

  if expected in ("recompute", "resume"):
    res, computed, lines = _run(units, on_corrupt=on_corrupt)
    _same(res, clean)
    assert computed == [1]
    warnings = [l for l in lines if l.startswith("warning:")]
    if expected == "recompute":
      assert len(warnings) == 1 and "\n" not in warnings[0], lines
      assert f"work unit 1 at {os.path.join(units, '1')} is corrupt" in warnings[0], warnings
    else:
      assert not warnings, lines
    assert "resuming: 2 of 3 work units already finished" in lines
  else:
    with pytest.raises(errors.UserError, match=expected) as e:
      _run(units, on_corrupt=on_corrupt)
    assert "\n" not in str(e.value)
    assert units in str(e.value)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "ERROR" not in err, err[-3000:]

  monkeypatch.undo()
  if damage == "full_disk":  # no half-written unit left; the finished ones load; a rerun completes
    assert sorted(os.listdir(units)) == ["0", "1"], os.listdir(units)
    res, computed, _ = _run(units)
    assert computed == [2]
    _same(res, clean)
  elif on_corrupt == "stop":  # nothing was deleted: the unit is still there and still corrupt
    assert os.path.isdir(os.path.join(units, "1"))
  res, computed, lines = _run(units)  # what was saved again is now clean
  assert computed == ([1] if on_corrupt == "stop" else [])
  _same(res, clean)


def test_checksum_covers_names_dtypes_shapes_and_bytes():
  t = _compute(UNITS[0])
  c = sweep.tree_checksum(t)
  assert c == sweep.tree_checksum({k: t[k] for k in reversed(list(t))})  # key order is irrelevant
  assert c != sweep.tree_checksum({**t, "ids": t["ids"].astype(np.int64)})
  assert c != sweep.tree_checksum({**t, "x": t["x"].reshape(-1)})
  assert c != sweep.tree_checksum({**t, "y": t.pop("x")})
  x = _compute(UNITS[0])["x"].copy()
  x.reshape(-1).view(np.uint8)[5] ^= 1
  assert c != sweep.tree_checksum({**_compute(UNITS[0]), "x": x})


def test_bad_on_corrupt(tmp_path):
  with pytest.raises(errors.UserError, match="on_corrupt='ignore': expected one of"):
    _run(tmp_path / "units", on_corrupt="ignore")


# --- outputs.atomic_write / write_jsonl ------------------------------------------------------------


@pytest.mark.parametrize("where", ["write", "fsync"])
@pytest.mark.parametrize("writer", ["atomic_write", "write_jsonl"])
def test_atomic_write_full_disk(tmp_path, monkeypatch, where, writer):
  path = str(tmp_path / "results.jsonl")
  outputs.atomic_write(path, "old\n")
  rows = [{"a": i, "b": float(i) / 3} for i in range(100)]
  text = "".join(json.dumps(r) + "\n" for r in rows)

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  if where == "fsync":
    monkeypatch.setattr(os, "fsync", full)
  else:  # the file's write: half of it lands, then the disk is full
    class Half:
      def __init__(self, f):
        self.f = f
      def __enter__(self):
        return self
      def __exit__(self, *exc):
        self.f.close()
      def write(self, data):
        self.f.write(data[:len(data) // 2])
        full()
      def __getattr__(self, name):
        return getattr(self.f, name)
    monkeypatch.setattr(outputs, "open", lambda *a, **k: Half(open(*a, **k)), raising=False)
  with pytest.raises(errors.UserError, match=rf"{path}: no space left on device writing it \(it needs about "
                     rf"{len(text) / 1000:.1f} KB.*free some space and rerun") as e:
    if writer == "write_jsonl":
      outputs.write_jsonl(path, rows)
    else:
      outputs.atomic_write(path, text)
  assert "\n" not in str(e.value)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["results.jsonl"]  # no temp file left
  with open(path) as f:
    assert f.read() == "old\n"  # the previous file is untouched
  outputs.write_jsonl(path, rows)
  with open(path) as f:
    assert f.read() == text


def test_atomic_write_other_errors_propagate(tmp_path):
  with pytest.raises(FileNotFoundError):
    outputs.atomic_write(str(tmp_path / "missing_dir" / "x.json"), "{}")


# --- SAE export checksums -------------------------------------------------------------------------


def test_export_checksum(tmp_path):
  from recovery_jax.sae import formats, pipeline  # pylint: disable=import-outside-toplevel
  from recovery_jax.sae.config import SAEConfig  # pylint: disable=import-outside-toplevel
  r = np.random.default_rng(0)
  params = {"W_enc": r.normal(size=(8, 16)), "W_dec": r.normal(size=(16, 8)), "b_enc": r.normal(size=16),
            "b_dec": r.normal(size=8)}
  folder = tmp_path / "export"
  formats.save_saelens({k: v.astype(np.float32) for k, v in params.items()}, SAEConfig("standard", 8, 16), folder)
  assert pipeline.verify_export_checksum(folder) is False  # no checksum file: an export from elsewhere
  pipeline.write_export_checksum(folder)
  assert pipeline.verify_export_checksum(folder) is True
  with open(folder / pipeline.EXPORT_CHECKSUMS) as f:
    assert sorted(l.split("  ")[1].strip() for l in f) == ["cfg.json", "sae_weights.safetensors"]
  weights = folder / "sae_weights.safetensors"
  data = bytearray(weights.read_bytes())
  data[-7] ^= 0x01  # a float's bytes: the file still loads, with a different number
  weights.write_bytes(bytes(data))
  with pytest.raises(errors.UserError, match=r"sae_weights\.safetensors: its sha256 differs from the one in "
                     r"\S+checksums\.sha256"):
    pipeline.verify_export_checksum(folder)
  with pytest.raises(errors.UserError, match=r"sae_weights\.safetensors: its sha256 differs"):
    formats.load_saelens(folder)  # the loader checks an export before it reads the weights
  os.remove(weights)
  with pytest.raises(errors.UserError, match=r"sae_weights\.safetensors: missing \(listed in"):
    pipeline.verify_export_checksum(folder)
  (folder / pipeline.EXPORT_CHECKSUMS).write_text("not a checksum line\n")
  with pytest.raises(errors.UserError, match=r"checksums\.sha256: line 1 is 'not a checksum line': expected"):
    pipeline.verify_export_checksum(folder)
