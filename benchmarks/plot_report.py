"""Plot R@1 / nDCG@10 of eval JSON files (from ``retrv-r1 eval --output``) side by side.

    python benchmarks/plot_report.py --out docs/benchmarks.png \
        "first stage=results/a.json:first_stage" "Retrv-R1 ICM=results/a.json:reranked" ...

Each argument is ``LABEL=FILE:KEY`` where KEY is ``first_stage`` or ``reranked``; files
whose ``dataset`` differs are grouped per data set.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("series", nargs="+", help="LABEL=FILE:KEY")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    labels: list[str] = []
    for spec in args.series:
        label, _, rest = spec.partition("=")
        path, _, key = rest.rpartition(":")
        data = json.load(open(path))
        table[data.get("dataset", path)][label] = data[key]
        if label not in labels:
            labels.append(label)
    sets = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(labels))
    for ax, metric in zip(axes, ("R@1", "nDCG@10")):
        for j, label in enumerate(labels):
            xs = [i + j * width for i in range(len(sets))]
            ys = [table[s].get(label, {}).get(metric, 0.0) for s in sets]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(sets))])
        ax.set_xticklabels(sets)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
