"""Demo-only ComfyUI custom-node package: never part of a plain install of the SVDiff pack.

``make demo``, ``make serve`` and the tests link this folder into their own private ComfyUI's
``custom_nodes``.  When ComfyUI loads it, it registers the demo model type with ComfyUI's
checkpoint detection, puts the demo checkpoint in ``models/checkpoints`` and copies the
pack's sample pictures into ``input/`` (see ``tools/svdiff_testkit/demo_model.py``).
It adds no nodes.  A user's ComfyUI never sees it, so their ComfyUI does not change.
"""

import logging
import os
import sys

_TOOLS = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)  # the harness folder only; never the pack root

from svdiff_testkit import demo_model  # noqa: E402

DEMO = demo_model.install()
logging.info("[svdiff demo] demo model %s: %s", DEMO["kind"], DEMO["checkpoint"])

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
