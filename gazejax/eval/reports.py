"""Reports of a sweep's ``results.json`` content: ``results.md`` (Markdown tables, scores ±
one standard error) and ``score_vs_kv.png`` (score against visual KV fraction, per method,
with error bars; matplotlib)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gazejax.eval.methods import METHODS
from gazejax.eval.scoring import FAMILIES
from gazejax.paths import as_path

GREY = (127, 127, 127)
"""Plot colour of a method not in the registry."""


def _color(method: str) -> tuple[int, int, int]:
    return METHODS[method].color if method in METHODS else GREY


METRIC_NAMES = {
    "exact_match": "exact match",
    "option_loglik_accuracy": "option log-likelihood accuracy",
}


def markdown_table(results: dict) -> str:
    """One section per benchmark and metric: rows method@budget; columns KV %, the score and
    the families (synthetic: its four task families; others: the visual kinds present), each
    score ± one standard error. Synthetic conversations add a section by turn, and one of the
    later turns (all but the first) by family; the synthetic tables end with the answer prior
    (its benchmark info's ``majority_answer``), where the results have one."""
    lines = []
    for benchmark, info in results["benchmarks"].items():
        records = [r for r in results["records"] if r["benchmark"] == benchmark]
        if benchmark == "synthetic":
            records += [info["majority_answer"]] if "majority_answer" in info else []
            lines += _section(f"{benchmark} (exact match, %)", records, "overall", _families())
            turns = sorted({t for r in records for t in r["by_turn"]}, key=int)
            if len(turns) > 1:
                columns = [(f"turn {t}", _part("by_turn", t)) for t in turns]
                columns.append(("turns ≥ 2", _part("later_turns")))
                lines += _section(f"{benchmark} by turn (exact match, %)", records, "all", columns)
                title = f"{benchmark}, turns ≥ 2 (exact match, %)"
                lines += _section(title, records, "later", _families("later_turns"), "later_turns")
            continue
        for metric in dict.fromkeys(r["metric"] for r in records):
            chosen = [r for r in records if r["metric"] == metric]
            kinds = dict.fromkeys(k for r in chosen for k in r["by_family"])
            title = f"{benchmark} ({METRIC_NAMES.get(metric, metric)}, %)"
            columns = [(k, _part("by_family", k)) for k in kinds]
            lines += _section(title, chosen, "score", columns)
    if results["notes"]:
        lines += [*(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


Column = tuple[str, Callable[[dict], "dict | None"]]
"""A table column: its header, and the stats (``score``, ``stderr``) it shows of a record."""


def _part(*path: str) -> Callable[[dict], dict | None]:
    """The stats at ``path`` in a record (``("by_turn", "2")``), None where absent."""

    def get(stats: dict) -> dict | None:
        for key in path:
            stats = stats.get(key) if stats is not None else None
        return stats

    return get


def _families(*path: str) -> list[Column]:
    """The synthetic families' columns, of the record's part at ``path``."""
    return [(f.replace("_", "-"), _part(*path, "by_family", f)) for f in FAMILIES]


def _score(stats: dict | None) -> str:
    """``"52.4 ± 3.0"`` (percent), or ``"–"`` for no stats."""
    if stats is None:
        return "–"
    stderr = stats.get("stderr")
    return f"{100 * stats['score']:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def _section(
    title: str, records: list[dict], score: str, columns: list[Column], *overall: str
) -> list[str]:
    """A table of ``records``: their score at ``overall`` (a path; the record itself by
    default), headed ``score``, and the ``columns``."""
    lines = [
        f"### {title}",
        "",
        f"| method | visual KV % | KV % (+ctx) | {score} | "
        + "".join(f"{header} | " for header, _ in columns)
        + "answers | s |",
        "|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|---:|",
    ]
    for r in records:
        total = _part(*overall)(r)
        lines.append(
            f"| {r['label']} | {100 * r['visual_kv_fraction']:.1f} | "
            f"{100 * r['kv_fraction']:.1f} | {_score(total)} | "
            + "".join(f"{_score(get(r))} | " for _, get in columns)
            + f"{total['num_examples'] if total else 0} | {r['seconds']:.0f} |"
        )
    lines.append("")
    return lines


def draw_plot(results: dict, path: str | os.PathLike, benchmark: str = "synthetic") -> None:
    """Score (%) against visual KV read (% of dense) per method, error bars ± one standard
    error: overall and one panel per family, and in conversations a second row, one panel per
    turn (a JSONL benchmark: its first metric), and the majority answer's score, where the
    benchmark has one, as a dashed line. Matplotlib, Agg backend."""
    records = [r for r in results["records"] if r["benchmark"] == benchmark]
    prior = results["benchmarks"].get(benchmark, {}).get("majority_answer")
    records = [r for r in records if r["metric"] == records[0]["metric"]] if records else []
    families = [*FAMILIES, *dict.fromkeys(f for r in records for f in r["by_family"])]
    families = [f for f in dict.fromkeys(families) if any(f in r["by_family"] for r in records)]
    rows = [[("overall", None, None)] + [(f.replace("_", "-"), "by_family", f) for f in families]]
    turns = sorted({t for r in records for t in r.get("by_turn", {})}, key=int)
    if len(turns) > 1:
        rows.append([(f"turn {t}", "by_turn", t) for t in turns])
    ncols = max(len(row) for row in rows)
    figure = Figure(figsize=(3.4 * ncols, 3.2 * len(rows) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), ncols, squeeze=False, sharey=True)
    metric = METRIC_NAMES.get(records[0]["metric"], "score") if records else "score"
    methods = list(dict.fromkeys(r["method"] for r in records))
    for row, panels in zip(axes, rows, strict=True):
        for ax in row[len(panels) :]:
            ax.set_visible(False)
        for ax, (title, breakdown, key) in zip(row, panels, strict=False):
            for name in methods:
                stats = [
                    r if breakdown is None else r[breakdown][key]
                    for r in records
                    if r["method"] == name and (breakdown is None or key in r[breakdown])
                ]
                if not stats:
                    continue
                points = sorted(
                    (s["visual_kv_fraction"], s["score"], s.get("stderr", 0.0)) for s in stats
                )
                x, y, err = 100 * np.array(points).T
                color = tuple(c / 255 for c in _color(name))
                ax.errorbar(x, y, yerr=err, color=color, marker="o", capsize=3, label=name)
                if name == "dense":
                    ax.axhline(y[0], color=color, linestyle=":", linewidth=1)
            floor = prior if breakdown is None or prior is None else prior[breakdown].get(key)
            if floor is not None:
                ax.axhline(
                    100 * floor["score"], color="grey", linestyle="--", label="majority answer"
                )
            ax.set_title(title)
            ax.set_xlim(-4, 105)  # blind reads 0 %
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.set_xlabel("visual KV read (% of dense)")
        row[0].set_ylabel(f"{metric} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    figure.suptitle(f"{benchmark}: {metric} vs visual KV (error bars: ± 1 standard error)")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    as_path(path).write_bytes(png.getvalue())


def write_reports(results: dict, out: str | os.PathLike) -> None:
    """Writes ``out/results.json``, ``out/results.md`` and ``out/score_vs_kv.png`` (the
    synthetic benchmark, else the first); ``out`` may be local or cloud (``gs://``)."""
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    benchmarks = list(results["benchmarks"])
    plotted = "synthetic" if "synthetic" in benchmarks else benchmarks[0]
    draw_plot(results, out / "score_vs_kv.png", plotted)
