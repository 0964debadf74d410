"""``report.html``: one self-contained page per run folder, written whenever ``summary.md`` is.

``render_html(workdir)`` converts the run's ``summary.md`` to HTML (Python-Markdown with the
``tables`` and ``toc`` extensions; raw HTML in the markdown is escaped, never passed through), then

  figures   every PNG the run wrote (the folder and its subfolders, not ``units/`` or
            ``tensorboard/``) inlined as a base64 ``data:`` URI: where ``summary.md`` references it
            (``![...](x.png)``) in place, the others in a "Figures" section, so the file opens alone
            and can be mailed
  cards     the feature cards (IOI: ``cards/cards.md``) shown as a section of the page
  anchors   an ``id`` and a permalink on every heading, a table of contents at the top
  tables    sortable by clicking a header (a few lines of inline JS: numeric where both cells start
            with a number, text otherwise; a second click reverses)
  files     links (relative, so they open from the run folder) to the feature cards (``cards/``),
            ``manifest.json``, ``profile.json``, ``config.json``, the rows and the run's other
            markdown files, where they exist

No external URL is loaded (no CDN, no remote image: a remote ``![...](http...)`` becomes a link).
``write(workdir)`` writes ``workdir/report.html``; ``experiments.runner`` calls it after every render
(a run's end and ``python -m recovery_jax.report``).
"""

from __future__ import annotations

import base64
import html
import mimetypes
import os
import re

from recovery_jax import errors, outputs

SUMMARY = "summary.md"
REPORT = "report.html"
CARDS = "cards/cards.md"  # IOI's feature cards (sae.cards.write_cards), shown on the page when present
SKIP_DIRS = ("units", "tensorboard")  # per-unit checkpoints and event files: no figures there
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}
# files a reader wants next to the page, in this order, where they exist
LINKED = (("cards/cards.html", "feature cards (HTML)"), ("cards/cards.md", "feature cards (markdown)"),
          ("cards/cards.json", "feature cards (JSON)"), ("manifest.json", "manifest: versions, file hashes, seeds, resolved config"),
          ("profile.json", "profile: where the time went"), ("config.json", "the run's config"),
          ("summary.md", "this summary as markdown"), ("summary.jsonl", "summary rows"),
          ("results.jsonl", "per-example rows"), ("recovery.jsonl", "per-case rows"), ("preflight.jsonl", "preflight rows"),
          ("features.json", "the defended features"))

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1,h2,h3,h4{line-height:1.2}a.headerlink{color:#bbb;text-decoration:none;margin-left:.3em;font-size:.8em}
h1:hover a.headerlink,h2:hover a.headerlink,h3:hover a.headerlink{color:#36c}
table{border-collapse:collapse;margin:.8em 0;font-size:12.5px;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f4f4f4;cursor:pointer;user-select:none}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0}figure img,p img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:12px}
nav.toc{background:#f8f8f8;border:1px solid #e4e4e4;padding:.3em 1em;margin-bottom:1.5em}nav.toc ul{margin:.2em 0}
code{background:#f3f3f3;padding:0 3px}
"""

# Click a header: sort that table's body rows by the column (numbers where both cells parse as one).
_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('thead th').forEach(function(th,i){
    th.title='click to sort';
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending', body=t.tBodies[0];
      t.querySelectorAll('thead th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var key=function(r){var s=r.cells[i]?r.cells[i].textContent.trim():'';var n=parseFloat(s);return [isNaN(n)?null:n,s];};
      Array.from(body.rows).sort(function(a,b){
        var x=key(a),y=key(b),c=(x[0]!==null&&y[0]!==null)?x[0]-y[0]:x[1].localeCompare(y[1],undefined,{numeric:true});
        return asc?c:-c;}).forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def escape_cell_pipes(text: str) -> str:
  """Markdown ``text`` with each ``|`` inside a cell of an aligned table (``outputs.format_table``:
  tabulate's ``github`` format, every row as long as its ``|---|`` rule) escaped as ``\\|``, so a
  header such as ``||delta||`` stays one cell; rows of another length are left as written."""
  lines = text.split("\n")
  i = 0
  while i < len(lines):
    rule = lines[i + 1] if i + 1 < len(lines) else ""
    if not (lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rule.strip())):
      i += 1
      continue
    cuts = {j for j, ch in enumerate(rule) if ch == "|"}
    j = i
    while j < len(lines) and lines[j].startswith("|"):
      if j != i + 1 and len(lines[j]) == len(rule):
        lines[j] = "".join("\\|" if ch == "|" and k not in cuts else ch for k, ch in enumerate(lines[j]))
      j += 1
    i = j
  return "\n".join(lines)


def _markdown(text: str, baselevel: int = 1, id_prefix: str = "") -> tuple[str, list[dict]]:
  """(body HTML, heading tokens: dicts of ``level``, ``id``, ``name``, ``children``) of markdown
  ``text``; ``#`` becomes ``h{baselevel}``, heading ids start with ``id_prefix``."""
  import markdown  # pylint: disable=import-outside-toplevel
  from markdown.extensions import toc  # pylint: disable=import-outside-toplevel
  md = markdown.Markdown(extensions=["tables", "toc", "fenced_code", "sane_lists"],
                         extension_configs={"toc": {"permalink": "\u00b6", "permalink_title": "link to this section",
                                                    "baselevel": baselevel,
                                                    "slugify": lambda v, sep: id_prefix + toc.slugify(v, sep)}})
  md.preprocessors.deregister("html_block")  # raw HTML (prompt text, program names) is shown, not parsed
  md.inlinePatterns.deregister("html")
  body = md.convert(escape_cell_pipes(text))
  return body, list(getattr(md, "toc_tokens", []))


def _toc(tokens: list[dict]) -> str:
  """Nested lists of links to the headings (``name`` is already escaped HTML)."""
  if not tokens:
    return ""
  items = "".join(f'<li><a href="#{t["id"]}">{t["name"]}</a>{_toc(t.get("children", []))}</li>' for t in tokens)
  return f"<ul>{items}</ul>"


def _data_uri(path: str) -> str:
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  mime = IMAGE_TYPES.get(os.path.splitext(path)[1].lower()) or mimetypes.guess_type(path)[0] or "application/octet-stream"
  return f"data:{mime};base64,{data}"


def figures(workdir: str) -> list[str]:
  """Every image the run wrote, relative to ``workdir`` (sorted; ``units/``, ``tensorboard/`` and
  hidden folders skipped)."""
  out = []
  for root, dirs, files in os.walk(workdir):
    rel_root = os.path.relpath(root, workdir)
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (rel_root == "." and d in SKIP_DIRS))
    for name in files:
      if os.path.splitext(name)[1].lower() in IMAGE_TYPES:
        out.append(os.path.normpath(os.path.join(rel_root, name)))
  return sorted(out)


def _local(workdir: str, src: str) -> str | None:
  """``src`` (an image reference) as a path relative to ``workdir`` when it names a file inside it."""
  if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", src) or src.startswith("/"):
    return None
  rel = os.path.normpath(html.unescape(src).split("#")[0].split("?")[0])
  if rel.startswith("..") or not os.path.isfile(os.path.join(workdir, rel)):
    return None
  return rel


def _inline_images(workdir: str, body: str) -> tuple[str, set[str]]:
  """``body`` with every local image reference replaced by a data URI (remote ones by a link);
  returns it and the paths inlined."""
  used: set[str] = set()

  def sub(m: re.Match) -> str:
    tag, src = m.group(0), m.group(2)
    rel = _local(workdir, html.unescape(src))
    if rel is not None:
      used.add(rel)
      return tag.replace(m.group(1), f'src="{_data_uri(os.path.join(workdir, rel))}"', 1)
    if src.startswith("data:"):
      return tag
    alt = re.search(r'alt="([^"]*)"', tag)
    return f'<a href="{src}">{alt.group(1) if alt and alt.group(1) else src}</a> (image not embedded: not a file of this run)'

  body = re.sub(r'<img\b[^>]*?(src="([^"]*)")[^>]*>', sub, body)
  return body, used


def _figure_section(workdir: str, paths: list[str]) -> str:
  items = []
  for rel in paths:
    anchor = "fig-" + re.sub(r"[^a-zA-Z0-9]+", "-", rel).strip("-").lower()
    name = html.escape(rel)
    items.append(f'<figure id="{anchor}"><img src="{_data_uri(os.path.join(workdir, rel))}" alt="{name}">'
                 f'<figcaption><a href="#{anchor}">{name}</a></figcaption></figure>')
  return ('<h2 id="figures">Figures<a class="headerlink" href="#figures" title="link to this section">\u00b6</a></h2>\n'
          + "\n".join(items))


def _files_section(workdir: str) -> str:
  """Links to the run's files a reader opens next (the feature cards, manifest, profile, rows, other
  markdown written at the top of the folder)."""
  entries = [(p, what) for p, what in LINKED if os.path.isfile(os.path.join(workdir, p))]
  known = {p for p, _ in entries}
  entries += [(n, "markdown") for n in sorted(os.listdir(workdir))
              if n.endswith(".md") and n not in known and os.path.isfile(os.path.join(workdir, n))]
  if not entries:
    return ""
  items = "\n".join(f'<li><a href="{html.escape(p)}"><code>{html.escape(p)}</code></a>: {html.escape(what)}</li>'
                    for p, what in entries)
  return ('<h2 id="files">Files of this run<a class="headerlink" href="#files" title="link to this section">\u00b6</a>'
          f"</h2>\n<p>Relative links: they open from the run folder.</p>\n<ul>\n{items}\n</ul>")


def render_html(workdir: str) -> str:
  """The self-contained HTML page of the run in ``workdir`` (see the module docstring)."""
  path = os.path.join(workdir, SUMMARY)
  if not os.path.isfile(path):
    raise errors.UserError(f"{workdir}: no {SUMMARY} to render as HTML (missing {path}); "
                           "expected a finished or re-rendered run folder")
  with open(path, encoding="utf-8") as f:
    body, tokens = _markdown(f.read())
  body, used = _inline_images(workdir, body)
  body = body.replace("<table>", '<table class="sortable">')
  rest = [p for p in figures(workdir) if p not in used]
  sections, extra = [], []
  cards = os.path.join(workdir, CARDS)
  if os.path.isfile(cards):  # the feature cards shown on the page too, headings one level down
    with open(cards, encoding="utf-8") as f:
      cards_body, cards_tokens = _markdown(f.read(), baselevel=2, id_prefix="card-")
    cards_body, cards_used = _inline_images(os.path.dirname(cards), cards_body)
    cards_used = {os.path.normpath(os.path.join(os.path.dirname(CARDS), u)) for u in cards_used}
    rest = [p for p in rest if p not in cards_used]
    sections.append(cards_body.replace("<table>", '<table class="sortable">'))
    extra += cards_tokens
  if rest:
    sections.append(_figure_section(workdir, rest))
    extra.append({"level": 2, "id": "figures", "name": "Figures", "children": []})
  files = _files_section(workdir)
  if files:
    sections.append(files)
    extra.append({"level": 2, "id": "files", "name": "Files of this run", "children": []})
  if len(tokens) == 1 and tokens[0]["level"] == 1:  # one title: the added sections go under it
    tokens = [{**tokens[0], "children": list(tokens[0].get("children", [])) + extra}]
  else:
    tokens = tokens + extra
  title = html.unescape(re.sub(r"<[^>]+>", "", tokens[0]["name"])) if tokens and tokens[0]["level"] == 1 else ""
  title = title or os.path.basename(os.path.abspath(workdir))
  return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
          f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
          f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          f'<nav class="toc"><strong>Contents</strong>\n{_toc(tokens)}</nav>\n{body}\n' + "\n".join(sections)
          + f"\n<script>{_JS}</script>\n</body>\n</html>\n")


def write(workdir: str) -> str:
  """Writes ``workdir/report.html`` (``render_html``); returns its path."""
  out = os.path.join(workdir, REPORT)
  outputs.atomic_write(out, render_html(workdir))
  return out
