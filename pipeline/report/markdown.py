"""report.md and the summary table the commands print."""

from __future__ import annotations

from lpips_pipe.pipeline.render.text import cell, label, number
from lpips_pipe.transforms.outputs import layout
from lpips_pipe.pipeline.report.facts import (HISTOGRAM_PNG, NOTHING_MEASURED_RULE, QUANTILE_NAMES, Report,
                                              ScoreSummary, box_flag_rows, unknown_scope_line)

def _quantile_table(summaries: list[ScoreSummary], heading: str) -> list[str]:
    lines = [f"| {cell(heading)} | n | mean | " + " | ".join(QUANTILE_NAMES) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in QUANTILE_NAMES) + " |"]
    for summary in summaries:
        lines.append(f"| {cell(summary.label)} | {summary.count} | {number(summary.mean)} | "
                     + " | ".join(number(summary.quantiles[name]) for name in QUANTILE_NAMES) + " |")
    return lines


def render_markdown(report: Report) -> str:
    """report.md: counts, errors, score quantiles, measured fraction, stage times, the histogram."""
    counts = report.counts
    lines = ["# lpips-pipe run report", "",
             f"Outputs: `{report.output}` (`{layout.SCORES}/`, `{layout.ERRORS}/`). LPIPS: lower is better; "
             "0 = the measured region is perceptually identical to the reference.", "",
             "## Counts", "", "| rows | count |", "| --- | ---: |",
             f"| input rows | {counts['input_rows']} |",
             f"| skipped (id already in earlier outputs, `--skip_existing`) | {counts['skipped']} |",
             *([f"| kept (finished by an interrupted run, not scored again) | {counts['kept']} |"]
               if counts.get("kept") else []),
             f"| scored | {counts['scored']} |"]
    if counts.get("non_finite_scores"):
        lines.append(f"| non-finite scores (NaN/inf/null lpips; not in the quantiles) | "
                     f"{counts['non_finite_scores']} |")
    lines.append(f"| errors | {counts['errors']} |")
    lines.append(f"| ids on more than one row (each row kept) | {counts['duplicate_ids']} id(s), "
                 f"{counts['duplicate_id_rows']} rows |")
    lines += [f"| rows with box flag `{flag}` | {n} |" for flag, _, n in box_flag_rows(counts)]
    lines += [f"| model loads | {counts['model_loads']} |", f"| pixels scored | {counts['pixels_scored']:,} |"]
    if report.wall_s is not None:
        rate = counts["scored"] / report.wall_s if report.wall_s > 0 else 0.0
        lines.append(f"| wall time | {report.wall_s:.1f} s ({rate:.2f} pairs/s) |")
    if counts.get("non_finite_scores"):
        lines += ["", f"non-finite scores: {counts['non_finite_scores']} (rows of the scores files whose lpips is "
                      "NaN, infinite or null, written by older releases; the job now sends them to the errors as "
                      "`model` / `NonFiniteScore`). They are not counted as scored."]
    scope = unknown_scope_line(report)
    if scope:
        lines += ["", cell(scope) + "."]
    if report.duplicate_examples:
        examples = ", ".join(f"`{cell(label(value))}` ×{n}" for value, n in report.duplicate_examples)
        lines += ["", f"Duplicated ids (first {len(report.duplicate_examples)}): {examples}."]
    lines += ["", "## Errors by stage and type", ""]
    if report.errors_by_type:
        lines += ["| stage | type | rows |", "| --- | --- | ---: |"]
        lines += [f"| {cell(stage)} | {cell(kind)} | {n} |" for stage, kind, n in report.errors_by_type]
    else:
        lines.append("No errors.")
    lines += ["", "## LPIPS by mask mode", ""] + _quantile_table(report.by_mask_mode, "mask mode")
    if report.by_group:
        lines += ["", f"## LPIPS by {cell(report.group_column or '')}", ""] + _quantile_table(
            report.by_group, report.group_column or "")
    lines += ["", "## Measured fraction (mask pixels / image pixels)", "", "| measured fraction | rows |",
              "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in report.measured_fraction.items()]
    quantiles = report.measured_fraction_quantiles
    lines += ["", "Quantiles: " + ", ".join(f"{name} {number(quantiles[name])}" for name in QUANTILE_NAMES) + "."]
    lines += ["", NOTHING_MEASURED_RULE]
    lines += ["", "## Time per stage", "",
              "Processing time Beam measured inside each step, summed over workers (worker start-up and model "
              "loading are not in it).", ""]
    if report.stage_seconds:
        total = sum(seconds for _, seconds in report.stage_seconds) or 1.0
        lines += ["| stage | seconds | share |", "| --- | ---: | ---: |"]
        lines += [f"| {cell(name)} | {seconds:.2f} | {100 * seconds / total:.0f}% |"
                  for name, seconds in report.stage_seconds]
        name, seconds = report.stage_seconds[0]
        lines += ["", f"Slowest stage: **{name}** ({seconds:.2f} s)."]
    else:
        lines.append("Not reported by this runner (the in-process runner reports it; see the runner's UI elsewhere).")
    lines += [f"- {cell(note)}" for note in report.notes]
    lines += ["", "## Histogram", "", f"![LPIPS and measured fraction histograms]({HISTOGRAM_PNG})", ""]
    if report.galleries:
        listed = ", ".join(f"{cell(item['title'])} ({len(item['tiles'])})" for item in report.galleries)
        lines += ["## Galleries", "", f"[{layout.REPORT_HTML}]({layout.REPORT_HTML}) shows the rows: {listed}.", ""]
    return "\n".join(lines)


def format_table(report: Report) -> str:
    """The short table printed after a run: LPIPS quantiles per mask mode, and the slowest stage."""
    header = f"  {'mask mode':<10} {'n':>7} {'mean':>8} {'p5':>8} {'median':>8} {'p95':>8} {'max':>8}"
    lines = [header]
    for summary in report.by_mask_mode:
        q = summary.quantiles
        lines.append(f"  {cell(summary.label):<10} {summary.count:>7} {number(summary.mean):>8} "
                     f"{number(q['p5']):>8} {number(q['median']):>8} {number(q['p95']):>8} {number(q['max']):>8}")
    if report.counts.get("non_finite_scores"):
        lines.append(f"  non-finite scores: {report.counts['non_finite_scores']} (not in the quantiles)")
    scope = unknown_scope_line(report)
    if scope:
        lines.append(f"  {cell(scope)}")
    if report.slowest_stage:
        name, seconds = report.slowest_stage
        lines.append(f"  slowest stage: {name} ({seconds:.1f} s)")
    return "\n".join(lines)
