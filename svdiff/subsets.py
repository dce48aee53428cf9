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


# --------------------------------------------------------------------------------------
# Style mixing (Sec. 4.4, Fig. 10), following Extended Textual Inversion (XTI), Sec. 8.1.
# --------------------------------------------------------------------------------------
#: XTI names the 16 cross-attention layers of the SD1.x UNet by (latent resolution for a
#: 64x64 latent, path, index on that path).  SD1.x has no cross-attention at 8x8 on the down
#: path (input_blocks 10, 11 are plain ResBlocks), so the only 8x8 layer is the mid-block's;
#: the paper's "(8, down', 0)" end of the geometry range is that layer, (8, mid, 0).
#: Each layer is the whole SpatialTransformer hosting that cross-attention (proj_in, self-
#: and cross-attention, feed-forward, proj_out, norms).  SD2.x uses the same block layout.
#:
#: =================  ==========================================
#: XTI layer          ComfyUI key prefix (SD1.x / SD2.x UNet)
#: =================  ==========================================
#: (64, down, 0)      ``diffusion_model.input_blocks.1.1.``
#: (64, down, 1)      ``diffusion_model.input_blocks.2.1.``
#: (32, down, 0)      ``diffusion_model.input_blocks.4.1.``
#: (32, down, 1)      ``diffusion_model.input_blocks.5.1.``
#: (16, down, 0)      ``diffusion_model.input_blocks.7.1.``
#: (16, down, 1)      ``diffusion_model.input_blocks.8.1.``
#: (8, mid, 0)        ``diffusion_model.middle_block.1.``
#: (16, up, 0)        ``diffusion_model.output_blocks.3.1.``
#: (16, up, 1)        ``diffusion_model.output_blocks.4.1.``
#: (16, up, 2)        ``diffusion_model.output_blocks.5.1.``
#: (32, up, 0..2)     ``diffusion_model.output_blocks.{6,7,8}.1.``
#: (64, up, 0..2)     ``diffusion_model.output_blocks.{9,10,11}.1.``
#: =================  ==========================================
XTI_LAYERS: dict = {
    (64, "down", 0): "diffusion_model.input_blocks.1.1.",
    (64, "down", 1): "diffusion_model.input_blocks.2.1.",
    (32, "down", 0): "diffusion_model.input_blocks.4.1.",
    (32, "down", 1): "diffusion_model.input_blocks.5.1.",
    (16, "down", 0): "diffusion_model.input_blocks.7.1.",
    (16, "down", 1): "diffusion_model.input_blocks.8.1.",
    (8, "mid", 0): "diffusion_model.middle_block.1.",
    (16, "up", 0): "diffusion_model.output_blocks.3.1.",
    (16, "up", 1): "diffusion_model.output_blocks.4.1.",
    (16, "up", 2): "diffusion_model.output_blocks.5.1.",
    (32, "up", 0): "diffusion_model.output_blocks.6.1.",
    (32, "up", 1): "diffusion_model.output_blocks.7.1.",
    (32, "up", 2): "diffusion_model.output_blocks.8.1.",
    (64, "up", 0): "diffusion_model.output_blocks.9.1.",
    (64, "up", 1): "diffusion_model.output_blocks.10.1.",
    (64, "up", 2): "diffusion_model.output_blocks.11.1.",
}
XTI_ORDER = list(XTI_LAYERS)  # the order in which the UNet evaluates them


def xti_range(first: tuple, last: tuple) -> list:
    """Key prefixes of the XTI layers from ``first`` to ``last`` inclusive, in UNet order."""
    i, j = XTI_ORDER.index(tuple(first)), XTI_ORDER.index(tuple(last))
    if i > j:
        i, j = j, i
    return [XTI_LAYERS[x] for x in XTI_ORDER[i : j + 1]]


#: Style-mixing presets for Combine/Scale Shifts' "select layers" mode: name ->
#: (description, ComfyUI key prefixes).  Selected layers come from the first shift
#: (geometry), all others from the second (appearance).
#:
#: ==========================================  ==========================================================
#: preset                                      key prefixes
#: ==========================================  ==========================================================
#: ``style: geometry (16,down,1)-(8,mid,0)``   input_blocks.8.1., middle_block.1. (paper Fig. 10 / XTI 8.1)
#: ``style: geometry all 16x16 + 8x8``         input_blocks.7.1., input_blocks.8.1., middle_block.1.,
#:                                             output_blocks.3.1., output_blocks.4.1., output_blocks.5.1.
#: ``style: appearance 32x32 + 64x64``         input_blocks.{1,2,4,5}.1., output_blocks.{6..11}.1.
#: ==========================================  ==========================================================
STYLE_PRESETS: dict = {
    "style: geometry (16,down,1)-(8,mid,0)": (
        "XTI layers (16, down, 1) to (8, mid, 0): the coarse cross-attention layers that carry geometry (Fig. 10)",
        xti_range((16, "down", 1), (8, "mid", 0)),
    ),
    "style: geometry all 16x16 + 8x8": (
        "every cross-attention layer at 16x16 and 8x8 (down, mid and up paths)",
        [XTI_LAYERS[x] for x in XTI_ORDER if x[0] in (16, 8)],
    ),
    "style: appearance 32x32 + 64x64": (
        "every cross-attention layer at 32x32 and 64x64 (the fine layers that carry appearance)",
        [XTI_LAYERS[x] for x in XTI_ORDER if x[0] in (32, 64)],
    ),
}

#: Everything a user can pick in "select layers": Table 1 subsets and style presets.
LAYER_PRESET_NAMES = list(STYLE_PRESETS) + SUBSET_NAMES
