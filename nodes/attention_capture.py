"""Capture cross-attention probabilities through ComfyUI's attn2 replacement hook.

Glue for the attention regularisers in ``svdiff.attention`` (Sec. 3.3 unmix loss,
appendix D.1 Eq. 10).  :class:`AttentionCapture` registers, with
``ModelPatcher.set_model_attn2_replace``, a replacement for every cross-attention block of
the UNet (found from ``named_modules``).  ComfyUI's ``BasicTransformerBlock`` then projects
q, k, v itself and calls the replacement, which computes softmax(q k^T / sqrt(d)) itself,
stores the head-averaged probabilities (``[B, H*W, T]``) keyed by block, and returns
attention @ v.  Nothing in ComfyUI is edited.

* The stored maps keep their autograd graph (use them in a loss inside training).
* Under ``torch.utils.checkpoint(use_reentrant=False)`` the backward pass re-runs the
  forward; the replacement then overwrites (never appends) each block's map.
* With ``enabled = False``, or for blocks outside ``resolutions``, the replacement calls
  ComfyUI's own optimised attention and stores nothing.
* :func:`token_positions` finds a word's positions in a prompt with the CLIP's own
  tokenizer.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..svdiff.attention import token_positions as _find_positions
from . import comfy_compat as compat

_BLOCK_RE = [
    (re.compile(r"^input_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$"), "input"),
    (re.compile(r"^output_blocks\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$"), "output"),
    (re.compile(r"^middle_block\.\d+\.transformer_blocks\.(\d+)\.attn2$"), "middle"),
]


def cross_attention_blocks(model_patcher) -> list:
    """(block_name, block_id, transformer_index) of every cross-attention layer of the UNet.

    Derived from ``named_modules`` of ``model.diffusion_model`` (SD1: input 1,2,4,5,7,8,
    middle 0, output 3..11, each with transformer index 0).
    """
    unet = model_patcher.model.diffusion_model
    out = []
    for name, _ in unet.named_modules():
        for rx, kind in _BLOCK_RE:
            m = rx.match(name)
            if not m:
                continue
            if kind == "middle":
                out.append(("middle", 0, int(m.group(1))))
            else:
                out.append((kind, int(m.group(1)), int(m.group(2))))
    return out


class AttentionCapture:
    """Stores each cross-attention block's head-averaged probabilities during a forward.

    resolutions: map side lengths to capture (min(H, W) of the block's latent, e.g. {16}
        for the 16x16 maps of SD1.5 at 512 px); None captures every block.
    """

    def __init__(self, resolutions: Optional[set] = None):
        self.resolutions = set(int(r) for r in resolutions) if resolutions else None
        self.enabled = True
        self._maps: dict = {}
        self._shapes: dict = {}
        self.blocks: list = []
        # map side lengths (min(H, W)) of every cross-attention block run so far, captured or not
        self.seen: set = set()

    # ----------------------------------------------------------------------------------
    def install(self, model_patcher) -> list:
        """Register the replacement on ``model_patcher`` (pass a clone) for every block.

        Returns the list of blocks (block_name, id, transformer_index).
        """
        blocks = cross_attention_blocks(model_patcher)
        for block in blocks:
            model_patcher.set_model_attn2_replace(self._patch(block), block[0], block[1], block[2])
        self.blocks = blocks
        return blocks

    def maps(self) -> dict:
        """block -> Tensor[B, H*W, T] of the last forward (with autograd graph)."""
        return dict(self._maps)

    def shapes(self) -> dict:
        """block -> (H, W) of each captured map."""
        return dict(self._shapes)

    def clear(self) -> None:
        self._maps.clear()
        self._shapes.clear()

    # ----------------------------------------------------------------------------------
    def _wanted(self, hw) -> bool:
        if self.resolutions is None:
            return True
        return hw is not None and min(hw) in self.resolutions

    def _patch(self, block):
        def attn2_replace(q, k, v, extra_options):
            heads = compat.attention_heads(extra_options)
            hw = compat.attention_map_size(extra_options)
            if hw is not None:
                self.seen.add(min(hw))
            if not self.enabled or not self._wanted(hw):
                return compat.default_attention(q, k, v, extra_options)
            b, n, inner = q.shape
            d = inner // heads
            qh = q.reshape(b, n, heads, d).transpose(1, 2)
            kh = k.reshape(b, -1, heads, d).transpose(1, 2)
            vh = v.reshape(b, -1, heads, d).transpose(1, 2)
            # probabilities in float32 (as ComfyUI's attention does with attn_precision fp32)
            sim = (qh.float() @ kh.float().transpose(-1, -2)) * (d ** -0.5)
            probs = sim.softmax(dim=-1)  # [b, heads, n, T]
            out = probs.to(vh.dtype) @ vh  # [b, heads, n, d]
            self._maps[block] = probs.mean(dim=1)  # overwrite: recomputation replaces it
            if hw is not None and hw[0] * hw[1] == n:
                self._shapes[block] = hw
            return out.transpose(1, 2).reshape(b, n, heads * d)

        return attn2_replace


# --------------------------------------------------------------------------------------
# Token positions with the CLIP's own tokenizer
# --------------------------------------------------------------------------------------
def token_positions(clip, prompt: str, word: str) -> list:
    """Positions of ``word``'s tokens in the token sequence ``clip`` encodes ``prompt`` into.

    Positions index the conditioning's token axis (77 per chunk for SD1; a long prompt's
    chunks follow each other).  A word may span several tokens; all occurrences are
    returned.  Matches start at a word boundary of the CLIP BPE vocabulary.
    """
    word = (word or "").strip()
    if not word:
        return []
    toks = clip.tokenize(prompt)
    key = "l" if "l" in toks else next(iter(toks))
    ids = [int(t[0]) if not isinstance(t[0], torch.Tensor) else -1 for chunk in toks[key] for t in chunk]
    wtoks = clip.tokenize(word, return_word_ids=True)[key]
    word_ids = [int(t[0]) for chunk in wtoks for t in chunk if len(t) > 2 and t[2] != 0]
    is_end = None
    hf, start = compat.clip_word_tokenizer(clip)
    if hf is not None:

        def is_end(i, _hf=hf, _start=start):
            if i == _start or i < 0:
                return True
            t = _hf.convert_ids_to_tokens(int(i))
            return isinstance(t, str) and t.endswith("</w>")
    return _find_positions(ids, word_ids, is_end)


def sample_token_positions(clip, prompt: str, words) -> list:
    """``[token_positions(clip, prompt, w) for w in words]``: per-region positions for the
    unmix loss (e.g. a ``CutMixSample``'s ``prompt`` and ``words``)."""
    return [token_positions(clip, prompt, w) for w in words]
