"""One closing line for a pytest JUnit XML report, naming the ComfyUI version it ran against.

    python tools/junit_summary.py REPORT.xml LABEL COMFYUI_DIR
    -> "ComfyUI-0.33.0: 251 passed, 0 failed, 5 skipped"   (failed counts failures and errors)

The version is read from the tree's ``comfyui_version.py`` and must match the label, so a
summary can never name a version other than the one that ran.  Exits 1 if the report is
missing or empty.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET


def tree_version(comfy_dir: str) -> str:
    try:
        with open(os.path.join(comfy_dir, "comfyui_version.py"), encoding="utf-8") as f:
            m = re.search(r'__version__\s*=\s*"([^"]+)"', f.read())
    except OSError:
        return "unknown"
    return m.group(1) if m else "unknown"


def counts(report: str) -> dict:
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in total:
            total[k] += int(s.get(k, 0))
    return total


def main(argv: list[str]) -> int:
    report, label, comfy_dir = argv[1], argv[2], argv[3]
    if not os.path.isfile(report):
        return 1
    c = counts(report)
    if c["tests"] == 0:
        return 1
    failed = c["failures"] + c["errors"]
    passed = c["tests"] - failed - c["skipped"]
    ver = tree_version(comfy_dir)
    if not label.endswith(ver):
        label = f"{label}(tree-says-{ver})"
        failed += 1
    print(f"{label}: {passed} passed, {failed} failed, {c['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
