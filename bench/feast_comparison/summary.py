"""Markdown table of the JSON results run.sh wrote: p50 / p99 microseconds per measurement and run."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/feast_comparison")
    rows: dict[str, list[str]] = {}
    for run in (1, 2):
        for side in ("feast", "ours"):
            text = (out / f"{side}_{run}.json").read_text()
            for r in json.loads(text[text.index("{"):])["results"]:
                label = f"{side}: {r['what']}"
                rows.setdefault(label, []).append(f"{r['p50_us']:.0f} / {r['p99_us']:.0f}")
    print("| measurement | run 1 p50 / p99 us | run 2 p50 / p99 us |\n|---|---|---|")
    for label, cells in rows.items():
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
