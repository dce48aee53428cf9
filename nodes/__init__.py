"""ComfyUI glue for the SVDiff pack: one module per node family.

Each module lists its node classes in ``NODES``; :func:`all_nodes` collects them.  A
module whose node family has not landed yet is simply absent.
"""

from __future__ import annotations

import importlib

FAMILIES = ["shifts", "train", "cutmix", "guidance", "editing", "arithmetic"]


def all_nodes() -> list:
    out = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f".{fam}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"nodes.{fam}"):
                continue  # that family is not part of this version
            raise
        out.extend(getattr(mod, "NODES", []))
    return out
