"""``report.html``: one self-contained page to read an evaluation, generations side by side.

Markdown is fine for the metric tables but not for reading hundreds of replies. The page holds
the same tables as ``report.md`` (built from the same :func:`rahf.evaluate.report.sections`),
the plots as base64 PNG data URIs, and one card per prompt (and turn) with every evaluated
model's reply, its reward, its length and its behaviour flags, plus a filter box. Everything is
inline (CSS, JS, images): the file opens offline, can be mailed, and loads nothing. All text
from models, prompts and file names goes through ``html.escape``.

Per-reply flags use the definitions of :mod:`rahf.evaluate.behaviour`: ``hit limit`` (cut off
by ``max_new_tokens``), ``repetition`` (share of repeated word 4-grams at or above
``REPETITION_FLAG``), ``empty``, ``refusal`` (on a harmful-request prompt) or ``over-refusal``
(on a benign one), ``offensive``.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rahf.evaluate.behaviour import (
    OFFENSIVE_THRESHOLD,
    is_refusal,
    offensive_probabilities,
    repetition_rate,
)
from rahf.evaluate.report import sections, title
from rahf.evaluate.schema import MODEL_ROLES, EvalReport, as_report

REPORT_HTML = "report.html"
GENERATIONS = "generations.jsonl"
REPETITION_FLAG = 0.1  # a reply whose repeated 4-gram share reaches this is flagged

CSS = """
:root { --fg:#1d2430; --muted:#5b6576; --line:#d9dee7; --bg:#f6f7f9; --card:#fff;
        --model:#1f77b4; --baseline:#ff7f0e; --warn:#b3261e; --ok:#1b7f3b; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
header { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line);
         padding:10px 24px; display:flex; gap:16px; align-items:center; flex-wrap:wrap; }
header h1 { font-size:18px; margin:0; flex:1 1 auto; }
header input { font:inherit; padding:6px 10px; width:min(420px,100%); border:1px solid var(--line);
               border-radius:6px; }
#count { color:var(--muted); white-space:nowrap; }
main { padding:8px 24px 40px; max-width:1500px; margin:0 auto; }
h2 { font-size:16px; margin:26px 0 8px; }
h3 { font-size:15px; margin:18px 0 8px; }
p.note { color:var(--muted); margin:4px 0 8px; max-width:110ch; }
code { background:#eef0f4; padding:0 3px; border-radius:3px; font-size:12.5px; white-space:nowrap; }
nav a { color:var(--model); margin-right:12px; text-decoration:none; }
p.sub { color:var(--muted); margin:10px 0 0; }
.scroll { overflow-x:auto; }
table.metrics { border-collapse:collapse; background:#fff; margin:4px 0 10px; font-size:13px; }
table.metrics th, table.metrics td { border:1px solid var(--line); padding:4px 8px; text-align:left;
                                     white-space:nowrap; }
table.metrics th { background:#eef0f4; font-weight:600; white-space:normal; vertical-align:bottom; }
.plots { display:flex; flex-wrap:wrap; gap:12px; }
figure { margin:0; background:#fff; border:1px solid var(--line); border-radius:6px; padding:8px; }
figure img { display:block; max-width:100%; width:auto; height:auto; max-height:250px; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; margin:10px 0;
        padding:10px 12px; }
.card[hidden] { display:none; }
.prompt { white-space:pre-wrap; margin:2px 0 8px; font-weight:500; }
.meta { color:var(--muted); font-size:12px; }
.replies { display:grid; gap:10px; grid-template-columns:repeat(var(--n,1), minmax(0,1fr)); }
.reply { border-top:3px solid var(--line); background:#fafbfc; border-radius:4px; padding:6px 8px; }
.reply.model { border-top-color:var(--model); }
.reply.baseline { border-top-color:var(--baseline); }
.reply.best { background:#f0f7f1; }
.reply .text { white-space:pre-wrap; overflow-wrap:anywhere; margin-top:4px; }
.reply .role { font-weight:600; }
.badge { display:inline-block; font-size:11px; padding:0 6px; border-radius:9px; margin-left:4px;
         border:1px solid currentColor; }
.badge.warn { color:var(--warn); }
.badge.ok { color:var(--ok); }
.badge.info { color:var(--muted); }
"""

SCRIPT = """
(function () {
  var box = document.getElementById('filter');
  var count = document.getElementById('count');
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  function update() {
    var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var shown = 0;
    cards.forEach(function (card) {
      var text = card.textContent.toLowerCase();
      var hit = words.every(function (w) { return text.indexOf(w) >= 0; });
      card.hidden = !hit;
      if (hit) { shown += 1; }
    });
    count.textContent = shown + ' of ' + cards.length + ' prompts shown';
  }
  box.addEventListener('input', update);
  update();
})();
"""


def _role_rank(role: str) -> int:
    """Display order of a model role (report.json sorts its keys)."""
    return MODEL_ROLES.index(role) if role in MODEL_ROLES else len(MODEL_ROLES)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _inline(text: str) -> str:
    """Escape, then show `backticked` spans as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def read_generations(folder: str | Path) -> list[dict[str, Any]]:
    """The records of ``generations.jsonl`` in ``folder`` (none if there is no such file)."""
    path = Path(folder) / GENERATIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def reply_flags(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, kind) badges for one reply; kind is warn, ok or info (the badge colour).

    ``record``: a generations.jsonl record; ``harmful`` (the prompt is a harmful request) and
    ``offensive`` (the classifier's verdict) are read when present.
    """
    text = record.get("reply") or ""
    flags = []
    if not text.strip():
        flags.append(("empty", "warn"))
    if record.get("hit_limit"):
        flags.append(("hit limit", "warn"))
    repeated = repetition_rate(text)
    if repeated >= REPETITION_FLAG:
        flags.append((f"repetition {repeated:.0%}", "warn"))
    if is_refusal(text):
        harmful = record.get("harmful")
        flags.append(("refusal", "ok") if harmful else ("over-refusal", "warn") if harmful is False
                     else ("refusal", "info"))
    if record.get("offensive"):
        flags.append(("offensive", "warn"))
    return flags


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _metrics(report: EvalReport) -> tuple[list[str], list[str]]:
    """HTML of the metric sections and of the provenance section (shown last)."""
    parts, provenance = [], []
    for section in sections(report):
        target = provenance if section.title == "Provenance" else parts
        target.append(f"<h2>{_e(section.title)}</h2>")
        target += [f'<p class="note">{_inline(n)}</p>' for n in section.notes]
        target += [_table(header, rows) for header, rows in section.tables]
        target += [f'<p class="note">{_inline(line)}</p>' for line in section.after]
    return parts, provenance


def _plots(images: Mapping[str, bytes]) -> list[str]:
    if not images:
        return []
    figures = [
        f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        f"<figcaption>{_e(name)}</figcaption></figure>"
        for name, png in images.items()
    ]
    return ['<h2 id="plots">Plots</h2>', '<div class="plots">', *figures, "</div>"]


def _group(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[tuple[str, int], dict[str, Mapping]]]:
    """source -> (prompt id, turn) -> role -> record, in file order."""
    grouped: dict[str, dict[tuple[str, int], dict[str, Mapping]]] = {}
    for r in records:
        grouped.setdefault(r["source"], {}).setdefault((str(r["id"]), int(r["turn"])), {})[r["model"]] = r
    return grouped


def _card(key: tuple[str, int], replies: dict[str, Mapping], roles: list[str], specs: dict[str, str]) -> str:
    first = next(iter(replies.values()))
    item_id, turn = key
    rewards = {role: r["reward"] for role, r in replies.items() if r.get("reward") is not None}
    best = max(rewards, key=rewards.__getitem__) if len(rewards) > 1 and len(set(rewards.values())) > 1 else None
    harmful = ' <span class="badge warn">harmful request</span>' if first.get("harmful") else ""
    cells = []
    for role in roles:
        r = replies.get(role)
        if r is None:
            cells.append(f'<div class="reply {_e(role)}"><span class="role">{_e(role)}</span>'
                         '<div class="text meta">(no reply)</div></div>')
            continue
        text = r.get("reply") or ""
        stats = [f"{r['tokens']} tokens" if r.get("tokens") is not None else "", f"{len(text)} chars"]
        if r.get("reward") is not None:
            stats.insert(0, f"reward {r['reward']:.3f}")
        badges = "".join(f'<span class="badge {kind}">{_e(label)}</span>'
                         for label, kind in reply_flags(r))
        if role == best:
            badges = '<span class="badge ok">higher reward</span>' + badges
        cells.append(
            f'<div class="reply {_e(role)}{" best" if role == best else ""}" data-model="{_e(role)}">'
            f'<span class="role">{_e(role)}</span> <span class="meta">{_e(specs.get(role, ""))}</span><br>'
            f'<span class="meta">{_e(" · ".join(s for s in stats if s))}</span>{badges}'
            f'<div class="text">{_e(text)}</div></div>'
        )
    label = f"{item_id}" + (f" · turn {turn + 1} (each model sees its own earlier replies)" if turn else "")
    return (
        f'<div class="card" data-id="{_e(item_id)}" data-turn="{turn}">'
        f'<div class="meta">{_e(label)}{harmful}</div>'
        f'<div class="prompt">{_e(first.get("prompt", ""))}</div>'
        f'<div class="replies" style="--n:{len(roles)}">{"".join(cells)}</div></div>'
    )


def _generations(report: EvalReport, records: Sequence[Mapping[str, Any]]) -> list[str]:
    # only replies this report measured: a generations.jsonl left by an older run is ignored
    wanted = {(e.source, e.model) for e in report.generation}
    records = [r for r in records if (r.get("source"), r.get("model")) in wanted]
    if not records:
        return []
    probabilities = offensive_probabilities([r.get("reply") or "" for r in records])
    records = [dict(r, offensive=bool(p >= OFFENSIVE_THRESHOLD)) for r, p in zip(records, probabilities, strict=True)]
    specs = {role: m.spec for role, m in report.models.items()}
    parts = ['<h2 id="generations">Generations</h2>',
             '<p class="note">One card per prompt (and turn); type in the filter box above to keep the'
             " cards containing every word typed (prompt, reply or flag, e.g. <code>hit limit</code>,"
             " <code>refusal</code>).</p>"]
    for source, prompts in _group(records).items():
        roles = sorted((e.model for e in report.generation if e.source == source), key=_role_rank)
        parts.append(f"<h3>{_e(source)} <span class=\"meta\">({len(prompts)} prompts)</span></h3>")
        parts += [_card(key, replies, roles, specs) for key, replies in prompts.items()]
    return parts


def to_html(
    report: EvalReport | dict[str, Any],
    generations: Sequence[Mapping[str, Any]] = (),
    images: Mapping[str, bytes] | None = None,
) -> str:
    """The whole page. ``generations``: records of generations.jsonl; ``images``: name -> PNG."""
    report = as_report(report)
    metrics, provenance = _metrics(report)
    heading = title(report).replace("`", "")
    plots, replies = _plots(images or {}), _generations(report, generations)
    models = sorted(report.models.items(), key=lambda item: _role_rank(item[0]))
    who = " · ".join(f"{role}: <code>{_e(m.spec)}</code>" for role, m in models)
    created = report.environment.get("created")
    links = [("metrics", "Metrics"), *([("plots", "Plots")] if plots else []),
             *([("generations", "Generations")] if replies else []), ("provenance", "Provenance")]
    top = [f'<p class="sub">{who}{f" · created {_e(created)}" if created else ""}</p>',
           "<nav>" + "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in links) + "</nav>",
           '<div id="metrics"></div>']
    provenance[0] = provenance[0].replace("<h2>", '<h2 id="provenance">', 1)
    body = [*top, *metrics, *plots, *replies, *provenance]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(heading)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<header><h1>{_e(heading)}</h1><input id="filter" type="search" '
        'placeholder="filter prompts and replies (all words must match)" aria-label="filter">'
        '<span id="count"></span></header>',
        "<main>", *body, "</main>",
        f"<script>{SCRIPT}</script>",
        "</body></html>",
        "",
    ])
