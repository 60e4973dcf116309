"""Reports of a sweep's ``results.json`` content: ``results.md`` (Markdown tables) and
``score_vs_kv.png`` (score against visual KV fraction, per method)."""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw, ImageFont

from gazejax.eval.methods import METHODS
from gazejax.eval.scoring import FAMILIES

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
    the families (synthetic: its four task families; others: the visual kinds present)."""
    lines = []
    for benchmark in results["benchmarks"]:
        records = [r for r in results["records"] if r["benchmark"] == benchmark]
        if benchmark == "synthetic":
            columns = [(f, f.replace("_", "-")) for f in FAMILIES]
            lines += _section(f"{benchmark} (exact match, %)", records, "overall", columns)
            continue
        for metric in dict.fromkeys(r["metric"] for r in records):
            chosen = [r for r in records if r["metric"] == metric]
            kinds = dict.fromkeys(k for r in chosen for k in r["by_family"])
            title = f"{benchmark} ({METRIC_NAMES.get(metric, metric)}, %)"
            lines += _section(title, chosen, "score", [(k, k) for k in kinds])
    if results["notes"]:
        lines += [*(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


def _section(
    title: str, records: list[dict], score: str, columns: list[tuple[str, str]]
) -> list[str]:
    """A table of ``records``: ``columns`` are ``(by_family key, header)`` pairs."""
    lines = [
        f"### {title}",
        "",
        f"| method | visual KV % | KV % (+ctx) | {score} | "
        + "".join(f"{header} | " for _, header in columns)
        + "examples | s |",
        "|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|---:|",
    ]
    for r in records:
        cells = [
            f"{100 * r['by_family'][key]['score']:.1f}" if key in r["by_family"] else "–"
            for key, _ in columns
        ]
        lines.append(
            f"| {r['label']} | {100 * r['visual_kv_fraction']:.1f} | "
            f"{100 * r['kv_fraction']:.1f} | {100 * r['score']:.1f} | "
            + "".join(f"{x} | " for x in cells)
            + f"{r['num_examples']} | {r['seconds']:.0f} |"
        )
    lines.append("")
    return lines


def draw_plot(results: dict, path: str, benchmark: str = "synthetic") -> None:
    """Score against visual KV fraction per method: overall, then one panel per family (a
    JSONL benchmark: its first metric)."""
    records = [r for r in results["records"] if r["benchmark"] == benchmark]
    records = [r for r in records if r["metric"] == records[0]["metric"]] if records else []
    families = [*FAMILIES, *dict.fromkeys(f for r in records for f in r["by_family"])]
    families = [f for f in dict.fromkeys(families) if any(f in r["by_family"] for r in records)]
    panels = ["overall", *families]
    pw, ph, margin = 300, 240, 40
    legend_h = 24
    width = len(panels) * (pw + margin) + margin
    image = Image.new("RGB", (width, ph + 2 * margin + legend_h), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for p, panel in enumerate(panels):
        x0, y0 = margin + p * (pw + margin), margin
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(0, 0, 0))
        draw.text((x0, y0 - 16), panel, fill=(0, 0, 0), font=font)
        for t in (0.0, 0.5, 1.0):
            draw.text((x0 + t * pw - 8, y0 + ph + 4), f"{t:g}", fill=(0, 0, 0), font=font)
            draw.text((x0 - 24, y0 + ph - t * ph - 6), f"{t:g}", fill=(0, 0, 0), font=font)
        by_method: dict[str, list] = {}
        for r in records:
            s = r if panel == "overall" else r["by_family"].get(panel)
            if s is not None:
                by_method.setdefault(r["method"], []).append((s["visual_kv_fraction"], s["score"]))
        # Dense as a dotted reference level; later methods' markers smaller (overlaps show).
        for _, y in by_method.get("dense", [])[:1]:
            level = y0 + ph - min(max(y, 0), 1) * ph
            for x in range(x0, x0 + pw, 6):
                draw.line([(x, level), (x + 2, level)], fill=_color("dense"))
        for order, (name, points) in enumerate(by_method.items()):
            xy = [
                (x0 + min(max(x, 0), 1) * pw, y0 + ph - min(max(y, 0), 1) * ph)
                for x, y in sorted(points)
            ]
            color = _color(name)
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            radius = max(6 - order, 2)
            for x, y in xy:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    metric = METRIC_NAMES.get(records[0]["metric"], "score") if records else "score"
    draw.text((margin, ph + margin + 18), f"x: visual KV fraction   y: {metric}", fill=(0, 0, 0))
    x = width // 3
    for name in dict.fromkeys(r["method"] for r in records):
        color = _color(name)
        draw.rectangle([x, ph + margin + 20, x + 10, ph + margin + 30], fill=color)
        draw.text((x + 14, ph + margin + 18), name, fill=color, font=font)
        x += 14 + 7 * len(name) + 16
    image.save(path)


def write_reports(results: dict, out: str) -> None:
    """Writes ``out/results.json``, ``out/results.md`` and ``out/score_vs_kv.png`` (the
    synthetic benchmark, else the first)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(results))
    benchmarks = list(results["benchmarks"])
    plotted = "synthetic" if "synthetic" in benchmarks else benchmarks[0]
    draw_plot(results, os.path.join(out, "score_vs_kv.png"), plotted)
