"""The HTML report ``recreason evaluate`` writes next to ``test.md``: one self-contained file to look at.

Plots are drawn with matplotlib and embedded as PNG data URIs, so the file can be mailed or attached to a
ticket as it is. Sections: metric bars with their 95% intervals per system, the run's training and
validation loss, reason-length and features-per-reason histograms, the most repeated reasons of each
system, and a side-by-side sample of test records (reference, each system's reason, cited features, flags).
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
from pathlib import Path
from typing import Sequence

from recreason.inference.safety import ReasonChecker
from recreason.text import FeatureMatcher, tokenize

BARS = (("BLEU-1", "BLEU-4", "ROUGE-L", "SemSim"), ("USR", "FMR", "FCR", "UserFeat", "Generic", "Ungrounded"))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_bars(results: dict, intervals: dict, systems: Sequence[str]) -> list[str]:
    plt = _plt()
    images = []
    for group in BARS:
        metrics = [m for m in group if any(m in results[s] for s in systems)]
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8))
        for ax, m in zip(axes if len(metrics) > 1 else [axes], metrics):
            names = [s for s in systems if m in results[s]]
            values = [results[s][m] for s in names]
            errors = [[max(0.0, v - intervals.get(s, {}).get(m, [v, v])[0]) for s, v in zip(names, values)],
                      [max(0.0, intervals.get(s, {}).get(m, [v, v])[1] - v) for s, v in zip(names, values)]]
            ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=[f"C{n}" for n in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(m, fontsize=10)
        fig.tight_layout()
        images.append(_png(fig))
    return images


def loss_curves(path: Path) -> str | None:
    """The training and validation loss by step from a run's training log (RUN/train_log.jsonl)."""
    if not path.exists():
        return None
    log = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not log:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    steps = [e["step"] for e in log]
    ax.plot(steps, [e["train_loss"] for e in log], marker="o", label="training (smoothed)")
    ax.plot(steps, [e["validation_loss"] for e in log], marker="o", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    return _png(fig)


def histograms(texts: dict[str, Sequence[str]], matcher: FeatureMatcher) -> str:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3))
    for name, values in texts.items():
        a.hist([len(tokenize(t)) for t in values], bins=range(0, 42, 2), alpha=0.5, label=name)
        b.hist([len(matcher.find(tokenize(t))) for t in values], bins=range(0, 8), alpha=0.5, label=name)
    a.set_title("reason length (words)")
    b.set_title("features named per reason")
    a.legend(fontsize=8)
    return _png(fig)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(path: Path, report: dict, train_log: Path, records, references: Sequence[str],
                 texts: dict[str, Sequence[str]], item_features: dict[str, set[str]], vocabulary,
                 samples: int = 20) -> Path:
    """Write the report for one evaluation (``texts``: each system's reasons for ``records``, in order;
    ``train_log``: the first run's training log, drawn as loss curves)."""
    results, intervals = report["results"], report.get("intervals", {})
    systems = [s for s in results if any(m in results[s] for m in BARS[0])]
    matcher = FeatureMatcher(vocabulary)
    checker = ReasonChecker(vocabulary)
    parts = [f"<h1>recreason evaluation: {html.escape(report['split'])} split, {report['records']} records</h1>",
             f"<p>Runs: {html.escape(', '.join(report['runs']))}. Text metrics on the first {report['max_len']} "
             "tokens, with 95% bootstrap intervals as error bars.</p>", "<h2>Metrics</h2>"]
    parts += [f'<img class="plot" alt="metric bars" src="{src}">' for src in metric_bars(results, intervals, systems)]
    lines = [line.strip().strip("|").split("|") for line in report.get("table", "").splitlines() if line.strip()]
    if len(lines) > 2:
        parts.append(_table([c.strip() for c in lines[0]], [[html.escape(c.strip()) for c in row] for row in lines[2:]],
                            "metrics"))
    curve = loss_curves(train_log)
    if curve:
        parts += ["<h2>Training</h2>", f'<img class="plot" alt="loss curves" src="{curve}">']
    if texts:
        parts += ["<h2>Reasons</h2>", f'<img class="plot" alt="histograms" src="{histograms(texts, matcher)}">',
                  "<h3>Most repeated reasons</h3>"]
        rows = []
        for name, values in texts.items():
            for text, count in collections.Counter(values).most_common(5):
                rows.append([html.escape(name), str(count), html.escape(text)])
        parts.append(_table(["system", "times", "reason"], rows, "repeated"))
        parts.append(f"<h3>{min(samples, len(records))} test records side by side</h3>")
        rows = []
        for n, (record, ref) in enumerate(zip(records[:samples], references[:samples])):
            cells = [html.escape(f"{record.user} / {record.item}"), html.escape(ref)]
            for name in texts:
                text = texts[name][n]
                checked = checker.check(text, sorted(item_features.get(record.item, ())))
                features = ", ".join(sorted(matcher.find(tokenize(text))))
                flags = ", ".join(checked.flags)
                cells.append(f"{html.escape(text)}<div class=meta>features: {html.escape(features or '-')}"
                             f"{'; flags: ' + html.escape(flags) if flags else ''}</div>")
            rows.append(cells)
        parts.append(_table(["user / item", "reference", *texts], rows, "samples"))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}"
             ".meta{color:#666;font-size:11px;margin-top:2px}img.plot{display:block;margin:1em 0;max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>recreason evaluation</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path
