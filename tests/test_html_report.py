"""report.html (recovery_jax.html_report): a synthetic run folder rendered to one self-contained page
(parses, every PNG inlined, sortable tables, heading anchors and contents, links, nothing remote),
``report.render`` of a grid run rewriting it (with the recovered-vs-budget plot), and the refusal
drift scatter without its zero line."""

import base64
import html.parser
import json
import os
import struct
import zlib

import numpy as np
import pytest

from recovery_jax import html_report, metrics, outputs
from recovery_jax.experiments import summary as summary_lib


def _png(path, shade: int) -> bytes:
  """A valid 2x2 grey PNG (distinct bytes per ``shade``), written to ``path``."""
  chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  raw = b"".join(b"\x00" + bytes([shade, shade]) for _ in range(2))
  data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return data


class _Page(html.parser.HTMLParser):
  """Collects tags and attributes; fails on unbalanced non-void elements."""

  VOID = {"meta", "img", "br", "hr", "link", "input"}

  def __init__(self):
    super().__init__()
    self.stack, self.tags, self.errors = [], [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    if tag not in self.VOID:
      self.stack.append(tag)

  def handle_startendtag(self, tag, attrs):  # <img ... />
    self.tags.append((tag, dict(attrs)))

  def handle_endtag(self, tag):
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
    else:
      self.stack.pop()

  def all(self, tag):
    return [a for t, a in self.tags if t == tag]


def _parse(text: str) -> _Page:
  p = _Page()
  p.feed(text)
  p.close()
  assert not p.errors and not p.stack, (p.errors, p.stack)
  return p


@pytest.fixture
def run_folder(tmp_path):
  """summary.md (a format_table table with ``||delta||`` in its header, an inline figure, a remote
  image, raw HTML-like text), PNGs at the top, in cards/ and in units/ (skipped), cards, manifest,
  profile."""
  wd = tmp_path / "run"
  table = outputs.format_table(["K", "mode", "||delta||", "rate"], [[8, "none", 1.5, "0.50 [0.2, 0.8]"],
                                                                     [16, "encoder", 12.25, "0.10 [0.0, 0.4]"]])
  summary = ("# Toy run\n\nheader line with jit(<lambda>) and a < b\n\n" + table + "\n\n## Drift\n\n"
             "![drift](recovery_vs_drift.png)\n\n![remote](https://example.org/a.png)\n\n### Sub section\n\ntext\n")
  os.makedirs(wd / "cards")
  (wd / "summary.md").write_text(summary)
  pngs = {"recovery_vs_drift.png": _png(str(wd / "recovery_vs_drift.png"), 10),
          "objective_curves.png": _png(str(wd / "objective_curves.png"), 20),
          "cards/f1.png": _png(str(wd / "cards" / "f1.png"), 30)}
  _png(str(wd / "units" / "stale.png"), 40)  # not a figure of the run: not inlined
  (wd / "cards" / "cards.html").write_text("<!doctype html><p>cards</p>")
  (wd / "cards" / "cards.md").write_text("# Feature cards\n\n## blocks.2.hook_resid_pre feature 90\n\n"
                                        "| activation | context |\n|---|---|\n| 0.5 | a **b** <c> |\n")
  (wd / "manifest.json").write_text("{}")
  (wd / "profile.json").write_text("{}")
  return wd, pngs


def test_page_is_self_contained_sortable_anchored_and_linked(run_folder):
  wd, pngs = run_folder
  text = html_report.render_html(str(wd))
  page = _parse(text)
  # every PNG the run wrote (not units/) inlined once, as its own bytes; the referenced one in place
  srcs = [a["src"] for a in page.all("img")]
  assert all(s.startswith("data:image/png;base64,") for s in srcs)
  assert sorted(base64.b64decode(s.split(",", 1)[1]) for s in srcs) == sorted(pngs.values())
  assert text.index(f'src="data:image/png;base64,{base64.b64encode(pngs["recovery_vs_drift.png"]).decode()}"') < \
      text.index('id="figures"')
  assert 'src="http' not in text and "<link" not in text and "example.org/a.png" in text  # remote image: a link
  assert [a for a in page.all("script") if "src" in a] == [] and text.count("<script") == 1
  # the table: sortable, and ||delta|| stays one header cell
  tables = page.all("table")  # the summary's and the feature card's
  assert len(tables) == 2 and all(a.get("class") == "sortable" for a in tables)
  assert len(page.all("th")) == 4 + 2 and "<th>||delta||</th>" in text and len(page.all("td")) == 8 + 2
  assert "table.sortable" in text and "addEventListener('click'" in text
  # raw HTML in the markdown is text, not markup
  assert "jit(&lt;lambda&gt;)" in text and "lambda" not in {t for t, _ in page.tags}
  # headings anchored, each in the contents with a permalink
  heads = [a for t, a in page.tags if t in ("h1", "h2", "h3")]
  ids = [a.get("id") for a in heads]
  assert all(ids) and len(set(ids)) == len(ids) and {"toy-run", "drift", "sub-section", "figures", "files",
                                                     "card-feature-cards", "card-blocks2hook_resid_pre-feature-90"} <= set(ids)
  assert "a <strong>b</strong> &lt;c&gt;" in text  # the card's context, its peak token in bold
  hrefs = [a.get("href") for a in page.all("a")]
  assert all(hrefs.count(f"#{i}") >= 2 for i in ids)  # the contents and the heading's own link
  # links to the cards, manifest, profile; none to files the run does not have
  assert {"cards/cards.html", "cards/cards.md", "manifest.json", "profile.json", "summary.md"} <= set(hrefs)
  assert "results.jsonl" not in hrefs and "config.json" not in hrefs
  assert "<title>Toy run</title>" in text


def test_write_and_missing_summary(run_folder, tmp_path):
  wd, _ = run_folder
  path = html_report.write(str(wd))
  assert path == str(wd / "report.html") and open(path).read() == html_report.render_html(str(wd))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(Exception, match="summary.md"):
    html_report.render_html(str(empty))


def _grid_rows(budgets=(1.0, 4.0), seeds=(0, 1), n=4):
  """results.jsonl rows of a toy grid run: (budget, seed) x mode none, variant shared; example i of
  budget b recovered when i < b (so the rate rises with the budget), example 0 invalid."""
  rows, pid = [], 0
  for b in budgets:
    for s in seeds:
      for i in range(n):
        rows.append({"point_id": pid, "grid_id": pid, "n_features": 8, "clamp_value": -5.0, "budget": b, "seed": s,
                     "mode": "none", "variant": "shared", "valid": i > 0, "recovered": i > 0 and i < b,
                     "recovered_score": float(b - i), "act_drift_l2": 0.1 * i, "decode_drift_l2": 0.0,
                     "pre_act_drift_l2": 0.2 * i, "act_drift_rel": 0.0, "ref_norm": 1.0,
                     "reactivated_fraction_within_eligible": 0.0, "zero_reactivation": True, "rel_delta_norm": 0.5,
                     "steps_at_budget": 1, "diverged": False})
      pid += 1
  return rows


def test_recovered_vs_budget_pools_seeds_with_wilson():
  summary = summary_lib.summarize(_grid_rows())
  data = summary_lib.recovered_vs_budget(summary)
  assert list(data) == [()] and list(data[()]) == ["none (shared)"]
  x, y, lo, hi = data[()]["none (shared)"]
  # budget 1: 0 of 3 valid per seed; budget 4: 3 of 3; pooled over the two seeds: 0/6 and 6/6
  np.testing.assert_allclose(x, [1.0, 4.0])
  np.testing.assert_allclose(y, [0.0, 1.0])
  np.testing.assert_allclose(np.stack([lo, hi], 1), [metrics.wilson_interval(0, 6), metrics.wilson_interval(6, 6)])
  assert summary_lib.recovered_vs_budget(summary_lib.summarize(_grid_rows(budgets=(4.0,)))) == {}


def test_report_rewrites_html_of_a_grid_run(tmp_path):
  """``report.render`` of a (synthetic) finished IOI run writes summary.md, the plots (recovered vs
  budget among them) and report.html with every one of them inlined; a second render rewrites it."""
  from recovery_jax import report  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "grid"
  wd.mkdir()
  rows = _grid_rows()
  (wd / "config.json").write_text(json.dumps({"experiment": "ioi"}))
  (wd / "run.json").write_text(json.dumps({"title": "IOI toy", "header": "h", "objective_name": "LD",
                                           "attribution_top_k": 0, "links": [], "wall_s": 1.0}))
  outputs.write_jsonl(str(wd / "results.jsonl"), rows)
  (wd / "curves.json").write_text(json.dumps([{"grid_id": 0, "name": "none (shared)", "objective": [0.0, 1.0]}]))
  report.render(str(wd), plots=True)
  for name in ("summary.md", "recovery_vs_drift.png", "objective_curves.png", "recovery_vs_budget.png", "report.html"):
    assert (wd / name).exists(), name
  page = _parse((wd / "report.html").read_text())
  assert len(page.all("img")) == 3 and "IOI toy" in (wd / "report.html").read_text()
  (wd / "report.html").write_text("stale")
  report.render(str(wd), plots=False)
  assert (wd / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_refusal_drift_scatter_has_no_zero_line(monkeypatch, tmp_path):
  """The stage-2 objective has no threshold at zero: the scatter draws no line there (the axis is not
  stretched to 0 from objectives near -50) and marks each case by its detector label instead."""
  from recovery_jax.tasks import refusal_stats  # pylint: disable=import-outside-toplevel
  seen = {}

  def capture(fig, ax, path, xlabel, ylabel, title):
    seen.update(lines=list(ax.lines), ylim=ax.get_ylim(), title=title,
                filled=[len(c.get_offsets()) for c in ax.collections if c.get_facecolors().size],
                hollow=[len(c.get_offsets()) for c in ax.collections if not c.get_facecolors().size])
    outputs.pyplot().close(fig)

  monkeypatch.setattr(outputs, "save_figure", capture)
  rows = [{"run": "main", "mode": m, "diverged": False, "drift_rel": 0.01 * i, "objective2": -50.0 - 0.01 * i,
           "faithful_nonrefusal": i % 2 == 0, "honest_nonrefusal": True} for m in ("none", "encoder") for i in range(4)]
  assert refusal_stats.plot_drift(str(tmp_path / "d.png"), rows, "t")
  assert seen["lines"] == [] and seen["ylim"][1] < -40
  assert sorted(seen["filled"]) == [2, 2] and sorted(seen["hollow"]) == [2, 2] and "faithful" in seen["title"]
