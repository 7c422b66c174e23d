"""Helpers every bench shares: the human table and the hardware record of the final JSON line.

Benches import this module, never bench/cli.py (which imports the benches lazily by name), so no import cycle.
"""

from __future__ import annotations

import os
import platform


def hardware() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
