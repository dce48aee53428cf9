"""ComfyUI glue for the SVDiff pack: one module per node family.

Each module lists its node classes in ``NODES``; :func:`all_nodes` collects them.
"""

from __future__ import annotations

import importlib

FAMILIES = ["shifts", "train", "cutmix", "guidance", "editing", "arithmetic"]


def all_nodes() -> list:
    out = []
    for fam in FAMILIES:
        out.extend(importlib.import_module(f".{fam}", __name__).NODES)
    return out
