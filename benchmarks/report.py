"""Render the benchmark results as the PNG charts README.md shows.

    python benchmarks/report.py                   # benchmarks/out/{verify,e2e}.json -> docs/img/
    python benchmarks/report.py --verify-md benchmarks/RESULTS.md --e2e-json out/e2e.json
    python benchmarks/report.py --out-dir /tmp/img --date 2026-12-01

Inputs (either chart is skipped, with a message, when its input is missing):

* verify: ``--verify-json`` (default ``benchmarks/out/verify.json``): ``{"date": ...,
  "rates": {alg: {case: verifications per CPU-second}}}``, or ``rates`` / the whole document
  being ``{"best": {alg: {case: rate}}, "median": {...}}`` (what ``benchmarks/verify.py``'s
  ``run_speed`` returns; ``--slice`` picks one, default median). Without it, ``--verify-md``
  (default ``benchmarks/RESULTS.md``): the Markdown table ``verify.py`` prints after its
  "Median slice" (or "Best slice") heading, parsed.
* e2e: ``--e2e-json`` (default ``benchmarks/out/e2e.json``): what ``e2e.py --json`` writes
  (``results``: target, workload, rps, p50_ms, p99_ms, ...).

Outputs: ``verify.png`` (verifications per CPU-second per algorithm, log scale, and fastgate's
speed-up over PyJWT) and ``e2e.png`` (requests per second and p99 latency per workload and
target, with the fastgate / HAProxy ratio written on the fastgate bars), each labelled with
the date of the run. Needs matplotlib (the ``bench`` extra); not imported by fastgate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"

VERIFY_CASES = (  # (key in the results, legend label)
    ("floor", "OpenSSL floor (cryptography)"),
    ("miss", "fastgate, cache miss"),
    ("hit", "fastgate, cache hit"),
    ("PyJWT", "PyJWT"),
    ("joserfc", "joserfc"),
    ("jwcrypto", "jwcrypto"),
)
E2E_TARGETS = (  # (target, legend label)
    ("direct", "nginx direct (no auth)"),
    ("fastgate", "fastgate"),
    ("haproxy", "HAProxy 2.6 jwt_verify"),
    ("naive", "naive aiohttp + PyJWT"),
)
COLORS = {
    "floor": "#9e9e9e", "miss": "#1565c0", "hit": "#42a5f5", "PyJWT": "#ef6c00",
    "joserfc": "#8e24aa", "jwcrypto": "#6d4c41",
    "direct": "#9e9e9e", "fastgate": "#1565c0", "haproxy": "#2e7d32", "naive": "#ef6c00",
}
WORKLOAD_LABELS = {
    "W1": "W1: 1,000 valid tokens, reused",
    "W2": "W2: 20,000 distinct valid tokens",
    "W3": "W3: 1,000 bad signatures (401)",
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("x").strip())


def parse_verify_markdown(text: str, which: str = "median") -> dict[str, dict[str, float]]:
    """The table verify.py prints: ``| alg | floor (cryptography) | fastgate miss | ...``.

    verify.py prints a "Best slice" and a "Median slice" table: the one after the heading
    naming ``which`` is read; a file with a single unlabelled table gives that table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if f"{which} slice" in line.lower()), 0)
    columns: list[str] | None = None
    rates: dict[str, dict[str, float]] = {}
    names = {"floor (cryptography)": "floor", "fastgate miss": "miss", "fastgate hit": "hit",
             "pyjwt": "PyJWT", "joserfc": "joserfc", "jwcrypto": "jwcrypto"}
    for line in lines[start:]:
        line = line.strip()
        if not line.startswith("|"):
            if rates:
                break  # the first results table only
            columns = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0].lower() == "alg":
            columns = [names.get(c.lower(), c) for c in cells]
            continue
        if columns is None or set("".join(cells)) <= set("-: "):
            continue
        row: dict[str, float] = {}
        for name, cell in zip(columns[1:], cells[1:], strict=False):
            if name in dict(VERIFY_CASES):
                try:
                    row[name] = _number(cell)
                except ValueError:
                    continue
        if row:
            rates[cells[0]] = row
    if not rates:
        raise ValueError("no verify.py results table found")
    return rates


def load_verify(json_path: Path | None, md_path: Path | None, which: str = "median"
                ) -> tuple[dict[str, dict[str, float]], str | None, Path] | None:
    """(rates by alg and case, date, the file read) or None when no input exists."""
    if json_path is not None and json_path.is_file():
        doc = json.loads(json_path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{json_path}: expected a JSON object")
        date = doc.get("date")
        rates: Any = doc.get("rates", doc.get("results", doc))
        if isinstance(rates, dict) and which in rates and isinstance(rates[which], dict):
            rates = rates[which]  # {"best": {alg: ...}, "median": {alg: ...}}
        if not isinstance(rates, dict) or not all(isinstance(v, dict) for v in rates.values()):
            raise ValueError(f"{json_path}: expected {{alg: {{case: rate}}}} under 'rates'")
        clean = {str(alg): {str(k): float(v) for k, v in row.items()
                            if isinstance(v, int | float)}
                 for alg, row in rates.items() if isinstance(row, dict)
                 and any(isinstance(v, int | float) for v in row.values())}
        return clean, date or _mtime_date(json_path), json_path
    if md_path is not None and md_path.is_file():
        text = md_path.read_text()
        return (parse_verify_markdown(text, which), _date_in(text) or _mtime_date(md_path),
                md_path)
    return None


def load_e2e(path: Path | None) -> tuple[list[dict[str, Any]], str | None, str, Path] | None:
    """(results, date, pinning note, the file read) or None when the file does not exist."""
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected the e2e.py --json document (a 'results' list)")
    usable = [r for r in results if isinstance(r, dict) and not r.get("skipped")
              and isinstance(r.get("rps"), int | float) and r.get("requests", 1)]
    return usable, doc.get("date") or _mtime_date(path), str(doc.get("pinning") or ""), path


def _date_in(text: str) -> str | None:
    match = re.search(r"\b(20\d\d-\d\d-\d\d)\b", text)
    return match.group(1) if match else None


def _mtime_date(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        sys.exit("benchmarks/report.py needs matplotlib: pip install -e '.[bench]'")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def verify_chart(rates: Mapping[str, Mapping[str, float]], date: str | None, out: Path,
                 which: str = "median") -> Path:
    plt = _pyplot()
    algs = list(rates)
    cases = [(k, label) for k, label in VERIFY_CASES if any(k in rates[a] for a in algs)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2),
                                  gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / max(1, len(cases))
    for i, (key, label) in enumerate(cases):
        xs = [j + (i - (len(cases) - 1) / 2) * width for j in range(len(algs))]
        ys = [rates[a].get(key, 0.0) for a in algs]
        bars = ax.bar(xs, ys, width, label=label, color=COLORS.get(key))
        for bar, y in zip(bars, ys, strict=True):
            if y > 0:
                ax.annotate(_fmt(y), (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=6.5, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_yscale("log")
    top = max([v for row in rates.values() for v in row.values()] + [1.0])
    ax.set_ylim(top=top * 60)  # room for the labels and the legend above the bars
    ax.set_xticks(range(len(algs)), algs)
    ax.set_ylabel("verifications per CPU-second (log scale)")
    ax.set_title("Token verification throughput (higher is better)")
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    ax.grid(axis="y", which="major", alpha=0.3)

    # Speed-up over PyJWT: what a Python service gains by verifying with fastgate.
    miss = [rates[a].get("miss", 0.0) / rates[a]["PyJWT"] if rates[a].get("PyJWT") else 0.0
            for a in algs]
    hit = [rates[a].get("hit", 0.0) / rates[a]["PyJWT"] if rates[a].get("PyJWT") else 0.0
           for a in algs]
    for offset, values, key, label in ((-0.2, miss, "miss", "cache miss"),
                                       (0.2, hit, "hit", "cache hit")):
        bars = ax2.bar([j + offset for j in range(len(algs))], values, 0.4, label=label,
                       color=COLORS[key])
        for bar, v in zip(bars, values, strict=True):
            if v > 0:
                ax2.annotate(f"{v:.1f}x", (bar.get_x() + bar.get_width() / 2, v),
                             ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                             textcoords="offset points")
    ax2.set_yscale("log")
    ax2.set_ylim(0.5, max(miss + hit + [1.0]) * 20)
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_xticks(range(len(algs)), algs)
    ax2.set_ylabel("fastgate / PyJWT (log scale)")
    ax2.set_title("Speed-up over PyJWT")
    ax2.legend(fontsize=8, ncol=2, loc="upper center")
    fig.suptitle(f"fastgate verifier micro-benchmark - {date or 'undated'} "
                 f"(benchmarks/verify.py; {which} slice per case)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def e2e_chart(results: Sequence[Mapping[str, Any]], date: str | None, pinning: str,
              out: Path) -> Path:
    plt = _pyplot()
    workloads = [w for w in ("W1", "W2", "W3") if any(r["workload"] == w for r in results)]
    targets = [(t, label) for t, label in E2E_TARGETS if any(r["target"] == t for r in results)]
    by = {(r["target"], r["workload"]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    width = 0.8 / max(1, len(targets))
    for ax, metric, ylabel, title in (
        (axes[0], "rps", "requests per second", "Throughput (higher is better)"),
        (axes[1], "p99_ms", "p99 latency, ms", "p99 latency (lower is better)"),
    ):
        for i, (target, label) in enumerate(targets):
            xs, ys = [], []
            for j, w in enumerate(workloads):
                r = by.get((target, w))
                if r is None:
                    continue
                xs.append(j + (i - (len(targets) - 1) / 2) * width)
                ys.append(float(r[metric]))
            bars = ax.bar(xs, ys, width, label=label, color=COLORS.get(target))
            for bar, y in zip(bars, ys, strict=True):
                ax.annotate(_fmt(y) if metric == "rps" else f"{y:.1f}",
                            (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=6.5, xytext=(0, 2), textcoords="offset points")
        # The ratio that survives a noisy machine: fastgate / HAProxy in the same session.
        ticks = []
        for w in workloads:
            tick = WORKLOAD_LABELS.get(w, w)
            mine, peer = by.get(("fastgate", w)), by.get(("haproxy", w))
            if mine is not None and peer is not None and float(peer[metric]):
                what = "req/s" if metric == "rps" else "p99"
                tick += (f"\nfastgate / HAProxy {what}: "
                         f"{float(mine[metric]) / float(peer[metric]):.2f}x")
            ticks.append(tick)
        ax.set_xticks(range(len(workloads)), ticks, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, max([float(r[metric]) for r in results] + [1.0]) * 1.35)
        ax.legend(fontsize=7.5, ncol=2, loc="upper center")
    note = f"; {pinning}" if pinning else ""
    fig.suptitle(f"End to end through the gateway, loopback, wrk - {date or 'undated'} "
                 f"(benchmarks/e2e.py){note}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=(__doc__ or "").split("\n\n", 1)[1])
    p.add_argument("--verify-json", type=Path, default=OUT / "verify.json")
    p.add_argument("--verify-md", type=Path, default=HERE / "RESULTS.md",
                   help="fallback: a Markdown file holding verify.py's table")
    p.add_argument("--slice", choices=("median", "best"), default="median",
                   help="which verify.py figure to chart (default: median slice)")
    p.add_argument("--e2e-json", type=Path, default=OUT / "e2e.json")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--date", help="label the charts with this date (default: from the input "
                                  "or its modification time)")
    args = p.parse_args(argv)

    written = 0
    verify = load_verify(args.verify_json, args.verify_md, args.slice)
    if verify is None:
        print(f"report: no verify results ({args.verify_json} or {args.verify_md}); "
              "skipping verify.png", file=sys.stderr)
    else:
        rates, date, source = verify
        out = verify_chart(rates, args.date or date, args.out_dir / "verify.png", args.slice)
        print(f"report: {out} (from {source})")
        written += 1
    e2e = load_e2e(args.e2e_json)
    if e2e is None:
        print(f"report: no e2e results ({args.e2e_json}); skipping e2e.png", file=sys.stderr)
    else:
        results, date, pinning, source = e2e
        if not results:
            print(f"report: {source} has no measured runs; skipping e2e.png", file=sys.stderr)
        else:
            out = e2e_chart(results, args.date or date, pinning, args.out_dir / "e2e.png")
            print(f"report: {out} (from {source})")
            written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
