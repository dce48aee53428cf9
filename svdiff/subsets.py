"""Parameter subsets of Table 1 and the style-mixing layer ranges, as key predicates.

Keys are ComfyUI state-dict keys of the UNet (``diffusion_model.…``).  ComfyUI names the
SD UNet as the original LDM code does; the paper (via diffusers) names it differently:

===================  =================================================================
paper / diffusers    ComfyUI key prefix
===================  =================================================================
down-blocks          ``diffusion_model.input_blocks.{1..}`` (``input_blocks.0`` is conv_in)
mid-block            ``diffusion_model.middle_block.``
up-blocks            ``diffusion_model.output_blocks.``
CrossAttn (CA)       ``….transformer_blocks.N.attn2.`` (to_q, to_k, to_v, to_out.0)
W^K, W^V of CA       ``….attn2.to_k.``, ``….attn2.to_v.``
===================  =================================================================

Dimensionality subsets (UNet-1D/2D/4D) use the base weight's number of dimensions.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

UNET = "diffusion_model."
_DOWN = re.compile(r"^diffusion_model\.input_blocks\.(\d+)\.")


def _is_down(k: str) -> bool:
    m = _DOWN.match(k)
    return bool(m) and int(m.group(1)) > 0


def _is_mid(k: str) -> bool:
    return k.startswith("diffusion_model.middle_block.")


def _is_up(k: str) -> bool:
    return k.startswith("diffusion_model.output_blocks.")


def _is_ca(k: str) -> bool:
    return ".attn2." in k


def _is_ca_kv(k: str) -> bool:
    return ".attn2.to_k." in k or ".attn2.to_v." in k


Predicate = Callable[[str, tuple], bool]

#: Table 1 of the paper: name -> (description, predicate(key, base-weight shape))
SUBSETS: dict[str, tuple[str, Predicate]] = {
    "UNet": ("all UNet layers", lambda k, s: k.startswith(UNET)),
    "UNet-CA": ("all cross-attention layers in the UNet", lambda k, s: k.startswith(UNET) and _is_ca(k)),
    "UNet-CA-KV": ("W^K, W^V of cross-attention in the UNet", lambda k, s: k.startswith(UNET) and _is_ca_kv(k)),
    "UNet-1D": ("all 1-D weights in the UNet", lambda k, s: k.startswith(UNET) and len(s) == 1),
    "UNet-2D": ("all 2-D weights in the UNet", lambda k, s: k.startswith(UNET) and len(s) == 2),
    "UNet-4D": ("all 4-D weights in the UNet", lambda k, s: k.startswith(UNET) and len(s) == 4),
    "Up-Blocks": ("up-blocks in the UNet", lambda k, s: _is_up(k)),
    "Down-Blocks": ("down-blocks in the UNet", lambda k, s: _is_down(k)),
    "Mid-Block": ("mid-block in the UNet", lambda k, s: _is_mid(k)),
    "Up-CA": ("cross-attention in the up-blocks", lambda k, s: _is_up(k) and _is_ca(k)),
    "Down-CA": ("cross-attention in the down-blocks", lambda k, s: _is_down(k) and _is_ca(k)),
    "Mid-CA": ("cross-attention in the mid-block", lambda k, s: _is_mid(k) and _is_ca(k)),
}

SUBSET_NAMES = list(SUBSETS)


def select(shapes: dict, subset: str) -> list:
    """Keys of ``shapes`` (key -> base-weight shape) in the named Table 1 subset, in order."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose from {', '.join(SUBSET_NAMES)}")
    pred = SUBSETS[subset][1]
    return [k for k, s in shapes.items() if pred(k, tuple(s))]


def matching(keys: Iterable[str], pattern: str) -> list:
    """Keys matching a regular expression (``re.search``)."""
    rx = re.compile(pattern)
    return [k for k in keys if rx.search(k)]
