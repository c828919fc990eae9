"""``report/index.html``: the run report (or the filter's) as one self-contained page, and its galleries.

The page opens from disk with no network at all: inline CSS, no script, no web font, every image a relative
``src`` under ``report/`` (``histogram.png``, ``tiles/...``), so the folder can be copied or synced
anywhere. Every text that comes from data (ids, group values, error messages, paths, notes) is HTML-escaped.
Counts carry ``data-count`` attributes holding the numbers of ``report.json`` (for machines and tests).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lpips_pipe.pipeline.report import tiles
from lpips_pipe.pipeline.report.gallery import ERRORS, Gallery, Tile
from lpips_pipe.pipeline.render.html import esc
from lpips_pipe.pipeline.render.text import label, number
from lpips_pipe.pipeline.report.facts import (HISTOGRAM_PNG, NOTHING_MEASURED_RULE, QUANTILE_NAMES, box_flag_rows,
                                              unknown_scope_line)
from lpips_pipe.pipeline.report.histogram import HISTOGRAM_SIZE
from lpips_pipe.transforms.outputs import layout

CSS = """
:root { --ink: #1d2430; --muted: #5d6776; --line: #d9dee6; --card: #f5f7fa; --bad: #b3261e; --note: #fff4d6; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; color: var(--ink); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 6px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 4px 0 10px; } code { font: 12px/1.3 ui-monospace, "DejaVu Sans Mono", monospace; }
.sub { color: var(--muted); max-width: 1100px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 6px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 20px; } .card .what { color: var(--muted); font-size: 12px; }
.card.bad b { color: var(--bad); }
nav { margin: 14px 0; padding: 8px 12px; background: var(--card); border-radius: 8px; border: 1px solid var(--line);
      display: flex; flex-wrap: wrap; gap: 4px 16px; }
nav a { white-space: nowrap; color: #1a56b0; text-decoration: none; }
.cols { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 10px; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: var(--card); font-weight: 600; }
.hist { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
ul.notes-page li { margin: 2px 0; }
section.gallery { margin-top: 34px; border-top: 2px solid var(--line); padding-top: 4px; }
.rule { color: var(--muted); max-width: 1100px; }
.legend { display: flex; align-items: center; gap: 8px; margin: 6px 0 10px; color: var(--muted); font-size: 12px; }
.legend .bar { width: 220px; height: 12px; border-radius: 3px; border: 1px solid var(--line); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
figure.tile { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff; }
figure.tile.flagged { border-color: #e0b64a; }
.pics { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.pics img { width: 100%; height: auto; display: block; border-radius: 3px; background: #eee; }
.pics .missing { display: flex; align-items: center; justify-content: center; min-height: 80px; border-radius: 3px;
                 background: repeating-linear-gradient(45deg, #f0f0f0, #f0f0f0 6px, #e4e4e4 6px, #e4e4e4 12px);
                 color: var(--muted); font-size: 11px; text-align: center; padding: 4px; }
.heads { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; color: var(--muted); font-size: 11px;
         margin-bottom: 2px; }
figcaption { margin-top: 6px; font-size: 12.5px; }
.tid { font-weight: 600; overflow-wrap: anywhere; }
.facts { color: var(--muted); } .facts b { color: var(--ink); font-weight: 600; }
.score { font-size: 14px; }
ul.notes { margin: 5px 0 0; padding: 4px 8px 4px 22px; background: var(--note); border-radius: 4px; }
ul.notes li { overflow-wrap: anywhere; }
.err { color: var(--bad); font-weight: 600; }
.kept { color: #1b7a2f; font-weight: 600; } .removed { color: var(--bad); font-weight: 600; }
.msg { overflow-wrap: anywhere; }
.empty { color: var(--muted); font-style: italic; }
"""

PART_HEADS = ("reference", "edited", "drift map")
HOW_TO_READ = ("Each tile: the reference; the edited image as it was scored, the part the score does not measure "
               "dimmed and hatched, the boxes in cyan; the drift map (where LPIPS sees the edited image differ from "
               "the reference) as heat over the grey reference.")


def _page(title: str, body: Sequence[str]) -> str:
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      # nothing may load from elsewhere, not even by accident
                      "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' "
                      "data: file:; style-src 'unsafe-inline'\">",
                      f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", *body,
                      "</body>", "</html>", ""])


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A table; cells are already HTML. Columns from ``numeric_from`` are right-aligned."""
    cells = "".join(f'<th class="{"n" if i >= numeric_from else ""}">{cell}</th>' for i, cell in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"n" if i >= numeric_from else ""}">{cell}</td>'
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _count(name: str, value: Any) -> str:
    return f'<span data-count="{esc(name)}">{esc(value)}</span>'


def _share(rows: int, total: int) -> str:
    """``33% (24 rows)``: a share of ``total`` rows, rounded to a whole percent, and the count."""
    return f"{100 * rows / total:.0f}% ({rows} rows)" if total else "—"


# --------------------------------------------------------------------------- galleries


def _legend(gallery: Gallery) -> str:
    if gallery.kind == ERRORS:
        return ""
    if gallery.color_scale_max is None:
        return '<div class="legend">drift maps: none could be made</div>'
    return (f'<div class="legend">drift map colour, one scale for this gallery: <span>0</span>'
            f'<span class="bar" style="background: {tiles.css_gradient()}"></span>'
            f'<span data-scale-max="{gallery.color_scale_max!r}">{gallery.color_scale_max:.4g}</span>'
            + ("<span>(every map is 0: nothing changed where it is measured)</span></div>"
               if gallery.color_scale_max <= 0 else
               "<span>(the largest map value among its tiles; per pixel, not area-normalised)</span></div>"))


def _picture(tile: Tile, part: str, what: str) -> str:
    image = tile.images.get(part)
    ident = tiles_label(tile)
    if not image:
        return f'<div class="missing">no {esc(what)}</div>'
    return (f'<img src="{esc(image["src"])}" width="{int(image["width"])}" height="{int(image["height"])}" '
            f'alt="{esc(what)} of {esc(ident)}" loading="eager">')


def tiles_label(tile: Tile) -> str:
    return label(tile.values.get(layout.ID_FIELD))


def _facts(tile: Tile, cut: Optional[float] = None) -> str:
    values = tile.values
    facts = []
    lpips = values.get(layout.LPIPS_FIELD)
    if isinstance(lpips, (int, float)):
        facts.append(f'<span class="score">LPIPS <b>{lpips:.4f}</b></span>')
        if cut is not None:
            facts.append(f'<span class="kept">≤ {cut:g}: kept</span>' if lpips <= cut
                         else f'<span class="removed">&gt; {cut:g}: removed</span>')
    fraction = values.get(layout.MEASURED_FRACTION_FIELD)
    if isinstance(fraction, (int, float)):
        facts.append(f"measured <b>{100 * fraction:.1f}%</b>")
    if values.get(layout.MASK_MODE_FIELD) is not None:
        facts.append(f"mask <b>{esc(values[layout.MASK_MODE_FIELD])}</b>")
    if "group" in values:
        facts.append(f"group <b>{esc(values['group'])}</b>")
    if values.get(layout.TIER_FIELD) is not None:
        facts.append(f"tier <b>{esc(values[layout.TIER_FIELD])}</b>")
    z = values.get(layout.Z_FIELD)
    if isinstance(z, (int, float)):
        facts.append(f"z <b>{z:+.3f}</b>")
    return " · ".join(facts)


def _error_facts(tile: Tile) -> str:
    values = tile.values
    stage, kind = values.get(layout.ERROR_STAGE_FIELD), values.get(layout.ERROR_TYPE_FIELD)
    message = values.get(layout.ERROR_MESSAGE_FIELD)
    return (f'<div class="err">{esc(stage)} / {esc(kind)}</div>'
            f'<div class="msg">{esc(message if message is not None else "(no message)")}</div>')


def _source(tile: Tile) -> str:
    source, row = tile.values.get(layout.SOURCE_FILE_FIELD), tile.values.get(layout.SOURCE_ROW_FIELD)
    if source is None:
        return ""
    return f'<div class="facts">from <code>{esc(source)}</code> row {esc(row)}</div>'


def _tile(gallery: Gallery, tile: Tile, heads: str, columns: str) -> str:
    """One tile: its column heads (``heads``, HTML), pictures, facts, source and notes."""
    ident = tiles_label(tile)
    pictures = [_picture(tile, layout.REPORT_TILE_REF, "reference"),
                _picture(tile, layout.REPORT_TILE_EDITED, "edited image")]
    if gallery.kind != ERRORS:
        pictures.append(_picture(tile, layout.REPORT_TILE_MAP, "drift map"))
    facts = _error_facts(tile) if gallery.kind == ERRORS else f'<div class="facts">{_facts(tile, gallery.cut)}</div>'
    notes = "".join(f"<li>{esc(note)}</li>" for note in tile.notes)
    return (f'<figure class="tile{" flagged" if tile.notes else ""}" data-id="{esc(ident)}" '
            f'data-id-rows="{tile.id_rows}">'
            f'<div class="heads"{columns}>{heads}</div><div class="pics"{columns}>{"".join(pictures)}</div>'
            f'<figcaption><div class="tid">{esc(ident)}</div>{facts}{_source(tile)}'
            f'{f"<ul class={chr(34)}notes{chr(34)}>{notes}</ul>" if notes else ""}</figcaption></figure>')


def gallery_id(index: int) -> str:
    return f"gallery-{index:02d}"


def render_galleries(galleries: Sequence[Gallery]) -> list[str]:
    """The galleries' sections."""
    out = []
    for index, gallery in enumerate(galleries, start=1):
        shown = len(gallery.tiles)
        count = (f"{shown} of {gallery.available} qualifying rows" if gallery.available > shown
                 else f"{shown} row{'s' if shown != 1 else ''} (all that qualify)")
        heads = PART_HEADS if gallery.kind != ERRORS else PART_HEADS[:1] + ("edited",)
        out.append(f'<section class="gallery" id="{gallery_id(index)}" data-gallery="{esc(gallery.name)}" '
                   f'data-k="{gallery.k}" data-tiles="{shown}" data-available="{gallery.available}">')
        out.append(f"<h2>{esc(gallery.title)}</h2>")
        how = "" if gallery.kind == ERRORS else f" {HOW_TO_READ}"
        out.append(f'<p class="rule">{esc(gallery.rule)}. Shown: {esc(count)}.{esc(how)}</p>')
        out.append(_legend(gallery))
        out += [f'<p class="empty">{esc(note)}</p>' for note in gallery.notes]
        if not gallery.tiles:
            out.append('<p class="empty">No row qualifies.</p>')
        else:
            head = "".join(f"<span>{esc(text)}</span>" for text in heads)
            columns = ' style="grid-template-columns: repeat(2, 1fr)"' if gallery.kind == ERRORS else ""
            out.append('<div class="grid">' + "".join(_tile(gallery, tile, head, columns) for tile in gallery.tiles)
                       + "</div>")
        out.append("</section>")
    return out


def _nav(galleries: Sequence[Gallery], extra: Sequence[tuple[str, str]] = ()) -> str:
    links = [f'<a href="#{anchor}">{esc(text)}</a>' for anchor, text in extra]
    links += [f'<a href="#{gallery_id(index)}">{esc(gallery.title)} ({len(gallery.tiles)})</a>'
              for index, gallery in enumerate(galleries, start=1)]
    return f"<nav>{''.join(links)}</nav>" if links else ""


def _notes(notes: Sequence[str]) -> list[str]:
    if not notes:
        return []
    return ['<h2 id="notes">Notes</h2>', '<ul class="notes-page">' + "".join(f"<li>{esc(n)}</li>" for n in notes)
            + "</ul>"]


# --------------------------------------------------------------------------- the run's page


def _quantile_rows(summaries: Sequence[Any]) -> list[list[str]]:
    return [[esc(s.label), esc(s.count), number(s.mean)] + [number(s.quantiles[q]) for q in QUANTILE_NAMES]
            for s in summaries]


def render_run_page(report: Any, galleries: Sequence[Gallery], k: int) -> str:
    """The run's ``index.html``: counts, where-to-cut figures, quantiles, histogram, notes, galleries."""
    counts = report.counts
    overall = report.by_mask_mode[0] if report.by_mask_mode else None
    q = overall.quantiles if overall else {}
    cards = [("input rows", "input_rows", counts.get("input_rows"), False),
             ("scored", "scored", counts.get("scored"), False),
             ("errors", "errors", counts.get("errors"), bool(counts.get("errors")))]
    body = ["<header>", "<h1>lpips-pipe run report</h1>",
            f'<p class="sub">Outputs: <code>{esc(report.output)}</code> (<code>{esc(layout.SCORES)}/</code>, '
            f"<code>{esc(layout.ERRORS)}/</code>). LPIPS is masked and area-normalised: <b>lower is better</b>, 0 = "
            "the measured region is perceptually identical to the reference. Galleries below show real rows, "
            "so you can see what a cut would keep and what it would remove.</p>", '<div class="cards">']
    body += [f'<div class="card{" bad" if bad else ""}"><b>{_count(key, value)}</b><span class="what">{esc(text)}'
             "</span></div>" for text, key, value, bad in cards]
    body += [f'<div class="card"><b>{number(q.get(name))}</b><span class="what">LPIPS {esc(name)}</span></div>'
             for name in ("median", "p95", "max") if q]
    body += ["</div>", "</header>"]
    body.append(_nav(galleries, [("numbers", "Counts"), ("cut", "Where to cut"), ("histogram", "Histogram")]))

    rows = [("input rows", "input_rows"), ("skipped (id already in earlier outputs)", "skipped")]
    if counts.get("kept"):
        rows.append(("kept (finished by an interrupted run)", "kept"))
    rows += [("scored", "scored")]
    if counts.get("non_finite_scores"):
        rows.append(("non-finite scores (not in the quantiles)", "non_finite_scores"))
    rows += [("errors", "errors"), ("ids on more than one row", "duplicate_ids"),
             ("rows carrying those ids", "duplicate_id_rows")]
    rows += [(f"rows with box flag {flag}", key) for flag, key, _ in box_flag_rows(counts)]
    rows += [("model loads", "model_loads"), ("pixels scored", "pixels_scored")]
    count_rows = [[esc(text), _count(key, counts.get(key, 0))] for text, key in rows]
    if report.wall_s is not None:
        count_rows.append(["wall time", f"{report.wall_s:.1f} s"])
    errors = [[esc(stage), esc(kind), esc(n)] for stage, kind, n in report.errors_by_type]
    body += ['<h2 id="numbers">Counts</h2>', '<div class="cols"><div>', _table(["rows", "count"], count_rows),
             "</div><div>", "<h3>Errors by stage and type</h3>",
             _table(["stage", "type", "rows"], errors, 2) if errors else '<p class="empty">No errors.</p>']
    if report.duplicate_examples:
        body += ["<h3>Ids on several rows</h3>",
                 _table(["id", "rows"], [[esc(label(value)), esc(n)] for value, n in report.duplicate_examples])]
    scope = unknown_scope_line(report)
    if scope:
        body.append(f"<p>{esc(scope)}.</p>")
    body.append("</div></div>")

    # where to cut: what a threshold at each quantile keeps
    body.append('<h2 id="cut">Where to cut</h2>')
    if q and q.get("median") is not None:
        cut_rows = [[esc(cut["name"]), number(cut["quantile"]), _share(cut["keeps"], cut["rows"]),
                     _share(cut["rows"] - cut["keeps"], cut["rows"]), f"<code>--threshold {cut['threshold']:.4g}</code>"]
                    for cut in report.cuts]
        body += ['<p class="sub">A cut keeps rows with LPIPS at or below it (<code>lpips-pipe-filter --scores '
                 f"{esc(report.output)} --threshold X</code>). At each quantile of the {esc(overall.count)} scored "
                 "rows, the share the cut keeps and removes, counted from the scores (rows tied at the threshold "
                 "are kept; rows that measured nothing never are):</p>", f'<p class="sub">{esc(NOTHING_MEASURED_RULE)}</p>', '<div class="cols"><div>',
                 _table(["cut at", "LPIPS", "keeps", "removes", "filter option"], cut_rows), "</div><div>"]
    else:
        body += ['<p class="empty">No finite score: nothing to cut.</p>', '<div class="cols"><div>']
    fractions = [[esc(name), esc(n)] for name, n in report.measured_fraction.items()]
    body += [_table(["measured fraction (mask / image pixels)", "rows"], fractions), "</div></div>"]
    body += ["<h3>LPIPS by mask mode</h3>",
             _table(["mask mode", "n", "mean", *QUANTILE_NAMES], _quantile_rows(report.by_mask_mode))]
    if report.by_group:
        body += [f"<h3>LPIPS by {esc(report.group_column)}</h3>",
                 _table([esc(report.group_column), "n", "mean", *QUANTILE_NAMES], _quantile_rows(report.by_group))]
    body += ['<h2 id="histogram">Histogram</h2>',
             f'<img class="hist" src="{esc(HISTOGRAM_PNG)}" width="{HISTOGRAM_SIZE[0]}" height="{HISTOGRAM_SIZE[1]}" '
             'alt="LPIPS per mask mode (or group) and measured fraction histograms">']
    if report.stage_seconds:
        total = sum(seconds for _, seconds in report.stage_seconds) or 1.0
        body += ["<h3>Time per stage (summed over workers)</h3>",
                 _table(["stage", "seconds", "share"], [[esc(name), f"{seconds:.2f}", f"{100 * seconds / total:.0f}%"]
                                                        for name, seconds in report.stage_seconds])]
    body += _notes(report.notes)
    if k == 0:
        body.append('<p class="empty">Galleries are off (<code>--report_k 0</code>).</p>')
    body += render_galleries(galleries)
    return _page("lpips-pipe run report", body)


# --------------------------------------------------------------------------- the filter's page


def render_filter_page(output: str, summary: dict[str, Any], galleries: Sequence[Gallery], k: int,
                       notes: Sequence[str]) -> str:
    """The filter's ``index.html``: the rule, rows per output and tier, group statistics, the galleries of
    rows nearest each cut-off."""
    kept, rejected = summary.get("kept"), summary.get("rejected")
    body = ["<header>", "<h1>lpips-pipe filter report</h1>",
            f'<p class="sub">Filter outputs: <code>{esc(output)}</code>; scores: '
            + ", ".join(f"<code>{esc(path)}</code>" for path in (summary.get("scores") or [])[:4])
            + (" …" if len(summary.get("scores") or []) > 4 else "")
            + ". LPIPS: lower is better.</p>", '<div class="cards">',
            f'<div class="card"><b>{_count("kept", kept)}</b><span class="what">kept</span></div>',
            f'<div class="card"><b>{_count("rejected", rejected)}</b><span class="what">rejected</span></div>', "</div>",
            "</header>"]
    body.append(_nav(galleries, [("rule", "Rule")]))
    if summary.get("threshold") is not None:
        rule = f"keep rows with lpips ≤ {summary['threshold']} (tier pass), reject the rest (tier fail)"
    elif isinstance(summary.get("calibration_thresholds"), dict):
        limits = ", ".join(f"{name}: {limit:.4g}" if isinstance(limit, (int, float)) else f"{name}: {limit}"
                           for name, limit in list(summary["calibration_thresholds"].items())[:50])
        rule = (f"keep rows with lpips ≤ their group's calibrated threshold ({summary.get('calibration')}; "
                f"{limits})")
    else:
        cuts = ", ".join(f"{name}: z ≤ {cut}" if summary.get("direction") != "higher_is_better"
                         else f"{name}: z ≥ {cut}" for name, cut in (summary.get("cut_offs") or {}).items())
        rule = (f"tiers on per-group z-scores ({cuts}); rows past the last cut-off: {summary.get('rest')}; kept tiers: "
                f"{', '.join(map(str, summary.get('keep') or []))}; std: {summary.get('std')}")
    if isinstance(summary.get("ceiling"), (int, float)):
        rule += (f"; ceiling: rows with lpips > {summary['ceiling']:g} rejected whatever their tier (tier "
                 "above_ceiling)")
    group = summary.get("group_column")
    body += ['<h2 id="rule">Rule</h2>', f"<p>{esc(rule)}{esc(f'; grouped by {group}' if group else '')}.</p>",
             "<h3>Rows per tier</h3>",
             _table(["tier", "rows"], [[esc(name), _count(f"tier:{name}", n)]
                                       for name, n in sorted((summary.get("tier_rows") or {}).items())])]
    groups = summary.get("groups") or {}
    if groups:
        body += ["<h3>Groups</h3>", _table([esc(group or "group"), "rows", "mean", "std"], [
            [esc(name), esc(stats.get("rows")), number(stats.get("mean")), number(stats.get("std"))]
            for name, stats in sorted(groups.items())][:200])]
    body += _notes(notes)
    if k == 0:
        body.append('<p class="empty">Galleries are off (<code>--report_k 0</code>).</p>')
    body += render_galleries(galleries)
    return _page("lpips-pipe filter report", body)
