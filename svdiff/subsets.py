"""Parameter subsets per model family (Table 1 for UNets, their analogues for DiTs) and the
style-mixing layer ranges, as key predicates.

Keys are ComfyUI state-dict keys of the diffusion model (``diffusion_model.…``).  The family
is told from the keys (:func:`family_of`): a UNet (SD1.x, SD2.x, SDXL) has
``input_blocks``/``middle_block``/``output_blocks``; SD3/SD3.5's MMDiT has ``joint_blocks``;
Flux has ``double_blocks`` and ``single_blocks``.  A subset of one family is refused on another
(:class:`SubsetError` names the family and its subsets).

**UNets: Table 1 of the paper.**  ComfyUI names the SD UNet as the original LDM code does; the
paper (via diffusers) names it differently:

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

**DiTs: the equivalents** (the paper has no DiT; these are this pack's).  Text and image
tokens meet in *joint* attention: each stream projects its tokens with its own fused
``qkv`` matrix and one attention runs over the concatenated tokens.  The analogue of
cross-attention's W^K, W^V (the projections applied to the text) is therefore the text
stream's ``qkv``.  It is one fused [3h, h] matrix whose singular values belong to Q, K and V
together, so ``DiT-Text-QKV`` shifts the whole matrix (the text tokens' queries move too;
they reach the image only through later blocks).  Flux's single blocks project text and
image tokens with the *same* fused ``linear1`` ([3h + mlp, h]: Q, K, V and the MLP input) and
``linear2`` (attention output and MLP output): they have no text-only part and belong to both
``DiT-Attn`` and ``DiT-MLP``.  Keys below are relative to ``diffusion_model.``:

=====================  =======================================================  ==========================================================
subset                 MMDiT (SD3 / SD3.5)                                      Flux
=====================  =======================================================  ==========================================================
``DiT``                every weight                                             every weight
``DiT-Attn``           ``joint_blocks.N.{x_block,context_block}.attn.``          ``double_blocks.N.{img_attn,txt_attn}.`` (qkv, proj, QK norms),
                       (qkv, proj, ln_q, ln_k) and ``joint_blocks.N.x_block.``   ``single_blocks.N.{linear1,linear2,norm}.``
                       ``attn2.`` (SD3.5 medium's extra image self-attention)
``DiT-Text-QKV``       ``joint_blocks.N.context_block.attn.qkv.``               ``double_blocks.N.txt_attn.qkv.``
``DiT-MLP``            ``joint_blocks.N.{x_block,context_block}.mlp.``           ``double_blocks.N.{img_mlp,txt_mlp}.``,
                       (fc1, fc2)                                               ``single_blocks.N.{linear1,linear2}.``
``DiT-1D``             1-D weights (the QK RMSNorm scales)                      1-D weights (QK RMSNorm scales; ComfyUI 0.33 names them
                                                                                ``….weight``, 0.3.75 ``….scale``)
``DiT-Early-Blocks``   ``DiT-Blocks[0:a]``                                      same (= every double block for Flux-dev)
``DiT-Middle-Blocks``  ``DiT-Blocks[a:b]``                                      same
``DiT-Late-Blocks``    ``DiT-Blocks[b:n]``                                      same
``Flux-Double-Blocks`` (Flux only)                                              ``double_blocks.``
``Flux-Single-Blocks`` (Flux only)                                              ``single_blocks.``
=====================  =======================================================  ==========================================================

Block ranges: ``DiT-Blocks[i:j]`` is a Python slice over the transformer blocks in the order
the model runs them: ``joint_blocks.0 … joint_blocks.{depth-1}`` for MMDiT; for Flux the double
blocks ``double_blocks.0 … {D-1}`` are blocks 0 … D-1 and ``single_blocks.k`` is block D + k.
Every weight under such a block prefix is in the range; the embedders and the final layer are in
no range.  The number of blocks is read from the keys (n); the thirds are a = round(n/3),
b = round(2n/3).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

UNET = "diffusion_model."
FAMILY_UNET = "UNet"
FAMILY_MMDIT = "MMDiT"
FAMILY_FLUX = "Flux"
#: family -> how messages name it
FAMILY_TITLES = {
    FAMILY_UNET: "a UNet (SD1.x / SD2.x / SDXL)",
    FAMILY_MMDIT: "an MMDiT (SD3 / SD3.5)",
    FAMILY_FLUX: "a Flux DiT",
}


class SubsetError(ValueError):
    """A subset or layer preset that is unknown or does not fit the model's family."""


def family_of(keys: Iterable[str]) -> Optional[str]:
    """The model family of a set of diffusion-model keys, or None when no key tells."""
    for k in keys:
        if k.startswith("diffusion_model.joint_blocks."):
            return FAMILY_MMDIT
        if k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")):
            return FAMILY_FLUX
        if k.startswith(("diffusion_model.input_blocks.", "diffusion_model.middle_block.", "diffusion_model.output_blocks.")):
            return FAMILY_UNET
    return None


# --------------------------------------------------------------------------------------
# UNets: Table 1
# --------------------------------------------------------------------------------------
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

#: Table 1 of the paper: name -> (description, predicate(key, base-weight shape)); UNets only.
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
UNET_SUBSET_NAMES = list(SUBSETS)

# --------------------------------------------------------------------------------------
# DiTs (MMDiT, Flux): the equivalents
# --------------------------------------------------------------------------------------
#: name -> (description, {family: regular expression matched at the key after "diffusion_model."})
DIT_SUBSETS: dict[str, tuple[str, dict]] = {
    "DiT": ("every weight of the diffusion transformer",
            {FAMILY_MMDIT: r"", FAMILY_FLUX: r""}),
    "DiT-Attn": ("attention of every block, both streams (Flux: with the fused single-block linear1/linear2)",
                 {FAMILY_MMDIT: r"joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.",
                  FAMILY_FLUX: r"double_blocks\.\d+\.(img|txt)_attn\.|single_blocks\.\d+\.(linear1|linear2|norm)\."}),
    "DiT-Text-QKV": ("the text stream's fused Q/K/V projection (the analogue of W^K, W^V of cross-attention)",
                     {FAMILY_MMDIT: r"joint_blocks\.\d+\.context_block\.attn\.qkv\.",
                      FAMILY_FLUX: r"double_blocks\.\d+\.txt_attn\.qkv\."}),
    "DiT-MLP": ("feed-forward layers of every block, both streams (Flux: with the fused single-block linear1/linear2)",
                {FAMILY_MMDIT: r"joint_blocks\.\d+\.(x_block|context_block)\.mlp\.",
                 FAMILY_FLUX: r"double_blocks\.\d+\.(img|txt)_mlp\.|single_blocks\.\d+\.linear[12]\."}),
    "DiT-1D": ("all 1-D weights of the diffusion transformer", {FAMILY_MMDIT: None, FAMILY_FLUX: None}),
    "DiT-Early-Blocks": ("the first third of the transformer blocks", {FAMILY_MMDIT: (0, 1), FAMILY_FLUX: (0, 1)}),
    "DiT-Middle-Blocks": ("the middle third of the transformer blocks", {FAMILY_MMDIT: (1, 2), FAMILY_FLUX: (1, 2)}),
    "DiT-Late-Blocks": ("the last third of the transformer blocks", {FAMILY_MMDIT: (2, 3), FAMILY_FLUX: (2, 3)}),
    "Flux-Double-Blocks": ("Flux's double-stream blocks", {FAMILY_FLUX: r"double_blocks\."}),
    "Flux-Single-Blocks": ("Flux's single-stream blocks", {FAMILY_FLUX: r"single_blocks\."}),
}
DIT_SUBSET_NAMES = list(DIT_SUBSETS)

#: Every subset name a node offers (UNet names first; the model's family decides which apply).
SUBSET_NAMES = UNET_SUBSET_NAMES + DIT_SUBSET_NAMES

_BLOCK_RANGE = re.compile(r"^DiT-Blocks\[(-?\d*):(-?\d*)\]$")
_MMDIT_BLOCK = re.compile(r"^diffusion_model\.joint_blocks\.(\d+)\.")
_FLUX_BLOCK = re.compile(r"^diffusion_model\.(double|single)_blocks\.(\d+)\.")


def subsets_for(family: Optional[str]) -> list:
    """The subset names that apply to a family (every name when the family is unknown)."""
    if family is None:
        return list(SUBSET_NAMES)
    if family == FAMILY_UNET:
        return list(UNET_SUBSET_NAMES)
    return [n for n, (_, per) in DIT_SUBSETS.items() if family in per]


def block_sequence(keys: Iterable[str]) -> list:
    """Key prefixes of the transformer blocks in the order a DiT runs them (``DiT-Blocks`` indices)."""
    joint, double, single = set(), set(), set()
    for k in keys:
        m = _MMDIT_BLOCK.match(k)
        if m:
            joint.add(int(m.group(1)))
            continue
        m = _FLUX_BLOCK.match(k)
        if m:
            (double if m.group(1) == "double" else single).add(int(m.group(2)))
    seq = [f"diffusion_model.joint_blocks.{i}." for i in range(max(joint) + 1)] if joint else []
    if double:
        seq += [f"diffusion_model.double_blocks.{i}." for i in range(max(double) + 1)]
    if single:
        seq += [f"diffusion_model.single_blocks.{i}." for i in range(max(single) + 1)]
    return seq


def _range_predicate(prefixes: list) -> Predicate:
    pre = tuple(prefixes)
    return lambda k, s: bool(pre) and k.startswith(pre)


def _third(seq: list, part: tuple) -> list:
    n = len(seq)
    cut = [0, round(n / 3), round(2 * n / 3), n]
    return seq[cut[part[0]]:cut[part[1]]]


def _available(family: Optional[str]) -> str:
    return f"subsets for {FAMILY_TITLES.get(family, 'this model')}: {', '.join(subsets_for(family))}"


def _wrong_family(name: str, made_for: str, family: str) -> SubsetError:
    return SubsetError(f"{name!r} is a subset for {made_for}, but this model is {FAMILY_TITLES[family]}; {_available(family)}")


def _dit_predicate(name: str, family: Optional[str], keys: list) -> Predicate:
    per = DIT_SUBSETS[name][1]
    if family == FAMILY_UNET or (family is not None and family not in per):
        made_for = " or ".join(FAMILY_TITLES[f] for f in per)
        raise _wrong_family(name, made_for, family)
    spec = per.get(family) if family else next(iter(per.values()))
    if spec is None:
        return lambda k, s: k.startswith(UNET) and len(s) == 1
    if isinstance(spec, tuple):
        return _range_predicate(_third(block_sequence(keys), spec))
    rx = re.compile(r"^diffusion_model\." + (f"(?:{spec})" if spec else ""))
    return lambda k, s: bool(rx.match(k))


def subset_predicate(name: str, keys: Iterable[str]) -> Predicate:
    """predicate(key, base-weight shape) of a subset name for the model whose keys are given.

    Raises :class:`SubsetError` for an unknown name or a name of another family, naming the
    family and the subsets it has.
    """
    keys = list(keys)
    family = family_of(keys)
    if name in SUBSETS:
        if family not in (None, FAMILY_UNET):
            raise _wrong_family(name, "a UNet (Table 1 of the paper: SD1.x / SD2.x / SDXL)", family)
        return SUBSETS[name][1]
    if name in DIT_SUBSETS:
        return _dit_predicate(name, family, keys)
    m = _BLOCK_RANGE.match(name)
    if m:
        if family == FAMILY_UNET:
            raise _wrong_family(name, "a DiT (MMDiT or Flux)", family)
        lo, hi = (int(x) if x else None for x in m.groups())
        return _range_predicate(block_sequence(keys)[lo:hi])
    raise SubsetError(f"unknown subset {name!r}; {_available(family)} (and DiT-Blocks[i:j] for a DiT)")


def select(shapes: dict, subset: str) -> list:
    """Keys of ``shapes`` (key -> base-weight shape) in the named subset, in order.

    The subset must fit the model family the keys show (:func:`subset_predicate`).
    """
    pred = subset_predicate(subset, shapes)
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


#: SDXL's UNet hosts cross-attention at two resolutions only (no transformer at the first
#: level; 2 transformer blocks per layer at the second, 10 at the third and in the mid-block).
#: In XTI's notation for SDXL's 128x128 latent (1024 px) they are the 64x64 and 32x32 layers;
#: the geometry end of Fig. 10 is the coarsest down layer through the mid-block, as for SD1.x.
#:
#: =================  ==========================================
#: XTI layer (SDXL)   ComfyUI key prefix (SDXL UNet)
#: =================  ==========================================
#: (64, down, 0..1)   ``diffusion_model.input_blocks.{4,5}.1.``
#: (32, down, 0..1)   ``diffusion_model.input_blocks.{7,8}.1.``
#: (32, mid, 0)       ``diffusion_model.middle_block.1.``
#: (32, up, 0..2)     ``diffusion_model.output_blocks.{0,1,2}.1.``
#: (64, up, 0..2)     ``diffusion_model.output_blocks.{3,4,5}.1.``
#: =================  ==========================================
SDXL_XTI_LAYERS: dict = {
    (64, "down", 0): "diffusion_model.input_blocks.4.1.",
    (64, "down", 1): "diffusion_model.input_blocks.5.1.",
    (32, "down", 0): "diffusion_model.input_blocks.7.1.",
    (32, "down", 1): "diffusion_model.input_blocks.8.1.",
    (32, "mid", 0): "diffusion_model.middle_block.1.",
    (32, "up", 0): "diffusion_model.output_blocks.0.1.",
    (32, "up", 1): "diffusion_model.output_blocks.1.1.",
    (32, "up", 2): "diffusion_model.output_blocks.2.1.",
    (64, "up", 0): "diffusion_model.output_blocks.3.1.",
    (64, "up", 1): "diffusion_model.output_blocks.4.1.",
    (64, "up", 2): "diffusion_model.output_blocks.5.1.",
}

LAYOUT_SD1 = "SD1.x/SD2.x"
LAYOUT_SDXL = "SDXL"
# Keys only one UNet layout has: SD1.x/SD2.x host cross-attention at the first level (input_blocks
# 1, 2; output_blocks 9-11), SDXL at output_blocks 0-2, with deeper transformers and ADM (label_emb).
_SD1_MARK = re.compile(r"^diffusion_model\.(input_blocks\.[12]\.1\.|output_blocks\.(9|10|11)\.1\.)")
_SDXL_MARK = re.compile(r"^diffusion_model\.(label_emb\.|output_blocks\.[012]\.1\.(transformer_blocks|proj_in|norm)\.|.*\.transformer_blocks\.[1-9])")


def unet_layout(keys: Iterable[str]) -> Optional[str]:
    """LAYOUT_SD1 or LAYOUT_SDXL when the keys show one UNet layout only, else None."""
    sd1 = sdxl = False
    for k in keys:
        sd1 = sd1 or bool(_SD1_MARK.match(k))
        sdxl = sdxl or bool(_SDXL_MARK.match(k))
    if sd1 != sdxl:
        return LAYOUT_SD1 if sd1 else LAYOUT_SDXL
    return None


#: Style-mixing presets for Combine/Scale Shifts' "select layers" mode: name ->
#: (description, ComfyUI key prefixes).  Selected layers come from the first shift
#: (geometry), all others from the second (appearance).
#:
#: ==============================================  ==========================================================
#: preset                                          key prefixes
#: ==============================================  ==========================================================
#: ``style: geometry (16,down,1)-(8,mid,0)``       input_blocks.8.1., middle_block.1. (paper Fig. 10 / XTI 8.1)
#: ``style: geometry all 16x16 + 8x8``             input_blocks.7.1., input_blocks.8.1., middle_block.1.,
#:                                                 output_blocks.3.1., output_blocks.4.1., output_blocks.5.1.
#: ``style: appearance 32x32 + 64x64``             input_blocks.{1,2,4,5}.1., output_blocks.{6..11}.1.
#: ``style SDXL: geometry (32,down,1)-(32,mid,0)`` input_blocks.8.1., middle_block.1.
#: ``style SDXL: geometry all 32x32``              input_blocks.{7,8}.1., middle_block.1., output_blocks.{0,1,2}.1.
#: ``style SDXL: appearance 64x64``                input_blocks.{4,5}.1., output_blocks.{3,4,5}.1.
#: ==============================================  ==========================================================
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
    "style SDXL: geometry (32,down,1)-(32,mid,0)": (
        "SDXL: XTI layers (32, down, 1) to (32, mid, 0), the coarsest down layer and the mid-block (Fig. 10's range on SDXL)",
        [SDXL_XTI_LAYERS[(32, "down", 1)], SDXL_XTI_LAYERS[(32, "mid", 0)]],
    ),
    "style SDXL: geometry all 32x32": (
        "SDXL: every cross-attention layer at 32x32 (down, mid and up paths)",
        [p for x, p in SDXL_XTI_LAYERS.items() if x[0] == 32],
    ),
    "style SDXL: appearance 64x64": (
        "SDXL: every cross-attention layer at 64x64 (the fine layers that carry appearance)",
        [p for x, p in SDXL_XTI_LAYERS.items() if x[0] == 64],
    ),
}
#: preset -> the UNet layout its prefixes name
STYLE_LAYOUT: dict = {name: (LAYOUT_SDXL if name.startswith("style SDXL:") else LAYOUT_SD1) for name in STYLE_PRESETS}

#: Everything a user can pick in "select layers": style presets and subsets.
LAYER_PRESET_NAMES = list(STYLE_PRESETS) + SUBSET_NAMES


def style_presets_for(family: Optional[str], layout: Optional[str] = None) -> list:
    """Style presets that apply to a family / UNet layout (none for a DiT)."""
    if family not in (None, FAMILY_UNET):
        return []
    return [n for n, lay in STYLE_LAYOUT.items() if layout is None or lay == layout]


def _style_predicate(name: str, keys: list) -> Predicate:
    family = family_of(keys)
    if family not in (None, FAMILY_UNET):
        raise SubsetError(
            f"{name!r} is a style-mixing preset in XTI's notation, which names the cross-attention layers of a UNet; "
            f"this is {FAMILY_TITLES[family]}, which has no style presets (it has no cross-attention layers: text and "
            f"image meet in joint attention); choose a block range instead: {_available(family)}")
    layout = unet_layout(keys)
    if layout is not None and STYLE_LAYOUT[name] != layout:
        raise SubsetError(f"{name!r} names layers of the {STYLE_LAYOUT[name]} UNet, but these weights are of the "
                          f"{layout} UNet; its style presets: {', '.join(style_presets_for(family, layout))}")
    prefixes = tuple(STYLE_PRESETS[name][1])
    return lambda k, s: k.startswith(prefixes)


def preset_predicate(name: str, keys: Iterable[str]) -> tuple:
    """(predicate(key, shape), description) of a style preset or subset name for these keys.

    Raises :class:`SubsetError` when the name is unknown or does not fit the keys' family/layout.
    """
    keys = list(keys)
    if name in STYLE_PRESETS:
        return _style_predicate(name, keys), f"preset {name}"
    try:
        return subset_predicate(name, keys), f"subset {name}"
    except SubsetError as e:
        if name in SUBSET_NAMES or _BLOCK_RANGE.match(name):
            raise
        family = family_of(keys)
        styles = style_presets_for(family, unet_layout(keys) if family == FAMILY_UNET else None)
        raise SubsetError(f"{e}; style presets: {', '.join(styles) or 'none for this family'}") from None
