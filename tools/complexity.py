"""Print the most complex and the longest functions of the repository and fail above the
limits: ``make lint`` runs it after ruff.  Complexity is McCabe's as ruff's C901 counts it
(ruff is asked for every function's number), lengths come from the syntax tree.

    python tools/complexity.py [--max 25] [--max-lines 120] [--top 5]

Limits: complexity at most 25 everywhere; at most 120 lines for a function in ``nodes/``
and ``svdiff/`` (the pack itself; the harness and the benchmarks may hold longer scripts).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_DIRS = ("nodes", "svdiff")


def ruff_complexities() -> list:
    """(relative path, line, function name, complexity) of every function, from ruff's C901."""
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    out = subprocess.run([ruff, "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=0",
                          "--output-format", "json", "--exit-zero", "."], cwd=REPO, capture_output=True, text=True, check=True)
    rows = []
    for d in json.loads(out.stdout):
        m = re.match(r"`(.+)` is too complex \((\d+) > 0\)", d["message"])
        if m:
            rows.append((os.path.relpath(d["filename"], REPO), d["location"]["row"], m.group(1), int(m.group(2))))
    return rows


def function_lengths(path: str) -> dict:
    """line of the ``def`` -> number of lines of the function."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    return {n.lineno: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=int, default=25)
    ap.add_argument("--max-lines", type=int, default=120)
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args(argv)
    rows, lengths = [], {}
    for rel, line, name, cx in ruff_complexities():
        if rel not in lengths:
            lengths[rel] = function_lengths(rel)
        length = lengths[rel].get(line, 0)
        rows.append((cx, length, f"{rel}:{line} {name}", rel.split(os.sep)[0] in PACK_DIRS))
    rows.sort(key=lambda r: (-r[0], r[2]))
    print(f"complexity: {len(rows)} functions; the most complex:")
    for cx, length, where, _ in rows[: a.top]:
        print(f"  {cx:3d}  {where} ({length} lines)")
    longest = sorted((r for r in rows if r[3]), key=lambda r: -r[1])[: a.top]
    print("the longest in nodes/ and svdiff/:")
    for cx, length, where, _ in longest:
        print(f"  {length:3d} lines  {where} (complexity {cx})")
    worst = rows[0][0] if rows else 0
    print(f"largest complexity: {worst} (limit {a.max})")
    bad = [r for r in rows if r[0] > a.max] + [r for r in rows if r[3] and r[1] > a.max_lines]
    for cx, length, where, _ in bad:
        print(f"TOO LARGE: {where}: complexity {cx}, {length} lines", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
