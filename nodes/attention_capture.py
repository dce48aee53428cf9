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

DiTs have no cross-attention: image and text tokens attend jointly.  The analogue of a
cross-attention map is the image-query x text-key block of the joint attention.
:class:`AttentionCapture` then registers a ``patches_replace["dit"]`` block replacement
(``ModelPatcher.set_model_patch_replace``) on every joint block -- MMDiT (SD3.x): every
``joint_blocks[i]`` as ("double_block", i); Flux: every ``double_blocks[i]`` ("double_block", i)
AND every ``single_blocks[i]`` ("single_block", i).  A captured block runs ComfyUI's own block
with ``transformer_options["optimized_attention_override"]`` set for that block only: the
override receives the very q and k the block attends with (after the q/k norms and Flux's
RoPE), stores softmax(q_img k_txt^T / sqrt(d)) averaged over heads (``[B, h*w, T]``, in
float32), and returns ComfyUI's own attention output unchanged.  Normalisation: the softmax runs
over the text keys only, which equals the joint attention's probabilities restricted to the text
columns and renormalised to sum to 1 per image token.  So each row is a distribution over the
conditioning's tokens as in a UNet's cross-attention (``attention_threshold`` and the loss
weights keep their meaning), and the losses cannot be lowered by merely moving attention mass
from text to image keys.  MMDiT's registers (``register_length``) are left out of the text keys;
an attention that is not the block's joint one (SD3.5's image-only ``x_block_self_attn``) is
passed through.  The map's h x w is the latent grid over the patch size
(``transformer_options["svdiff_latent_shape"]``, which :func:`with_latent_shape` sets; a square
grid when it is missing); ``resolutions`` selects by min(h, w) as for UNets -- every block of a
DiT has the same grid.  The T axis is the conditioning's token axis: Flux's T5 tokens; SD3's
[CLIP-L/G (77 per chunk), T5] sequence (see :func:`token_positions`).  MMDiT blocks under a
replacement run through ComfyUI's ``block_mixing`` with ``use_checkpoint=True`` (its default
there), so their activations are recomputed in the backward pass (same values).
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
        self._txt_len: Optional[int] = None  # a DiT forward's text length, from its double blocks

    # ----------------------------------------------------------------------------------
    def install(self, model_patcher) -> list:
        """Register the replacement on ``model_patcher`` (pass a clone) for every block.

        Returns the list of blocks (block_name, id, transformer_index).
        """
        blocks = cross_attention_blocks(model_patcher)
        for block in blocks:
            model_patcher.set_model_attn2_replace(self._patch(block), block[0], block[1], block[2])
        if not blocks:
            blocks = self._install_dit(model_patcher)
        self.blocks = blocks
        return blocks

    def _install_dit(self, model_patcher) -> list:
        """DiTs: a ``dit`` block replacement on every joint-attention block (see the module
        docstring); returns the blocks as (block_name, index)."""
        dm = model_patcher.model.diffusion_model
        dit = compat.dit_joint_blocks(dm)
        if not dit:
            return []
        patch = compat.dit_patch_size(dm)
        to = model_patcher.model_options.get("transformer_options", {})
        prev = to.get("patches_replace", {}).get("dit", {})
        for blk in dit:
            key = (blk.name, blk.index)
            model_patcher.set_model_patch_replace(_DitReplace(self, blk, patch, prev.get(key)), "dit", blk.name, blk.index)
        return [(b.name, b.index) for b in dit]

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


class _DitReplace:
    """The ``patches_replace["dit"]`` replacement of one joint block: runs the block (through a
    replacement that was there before, if any) with the capturing attention override when the
    block is captured, else unchanged."""

    def __init__(self, capture: AttentionCapture, blk, patch: tuple, prev):
        self.capture, self.blk, self.patch, self.prev = capture, blk, patch, prev

    def _run(self, args: dict, extra: dict):
        return self.prev(args, extra) if self.prev is not None else extra["original_block"](args)

    def _grid(self, to: dict, n_img: int) -> Optional[tuple]:
        shape = to.get(LATENT_SHAPE)
        if shape is not None and len(shape) >= 4:
            (ph, pw), (h, w) = self.patch, shape[-2:]
            return (int(h) + ph // 2) // ph, (int(w) + pw // 2) // pw
        side = int(round(n_img ** 0.5))
        return (side, side) if side * side == n_img else None

    def __call__(self, args: dict, extra: dict):
        cap, blk = self.capture, self.blk
        img, txt = args["img"], args.get("txt")
        if txt is not None:
            cap._txt_len = int(txt.shape[1])
        n_txt = cap._txt_len
        if n_txt is None:
            return self._run(args, extra)
        n_img = int(img.shape[1]) - (0 if txt is not None else n_txt)
        to = args.get("transformer_options") or {}
        hw = self._grid(to, n_img)
        if hw is not None:
            cap.seen.add(min(hw))
        if not cap.enabled or not cap._wanted(hw) or (hw is not None and hw[0] * hw[1] > n_img):
            return self._run(args, extra)
        key = (blk.name, blk.index)
        override = _JointMap(cap, key, blk, n_txt, n_img, hw)
        return self._run({**args, "transformer_options": compat.with_attention_override(to, override)}, extra)


class _JointMap:
    """The attention override of a captured joint block: stores the image-query x text-key map."""

    def __init__(self, capture: AttentionCapture, key, blk, n_txt: int, n_img: int, hw: Optional[tuple]):
        self.capture, self.key, self.blk = capture, key, blk
        self.n_txt, self.n_img, self.hw = n_txt, n_img, hw

    def __call__(self, run, *args, **kwargs):
        q, k, mask = compat.attention_qk(args, kwargs)
        if k.shape[-2] == self.n_txt + self.n_img and q.shape[-2] == k.shape[-2]:
            self.capture._maps[self.key] = self._map(q, k, mask)
            if self.hw is not None:
                self.capture._shapes[self.key] = self.hw
        return run(*args, **kwargs)

    def _map(self, q, k, mask) -> torch.Tensor:
        blk, n_txt, n_img = self.blk, self.n_txt, self.n_img
        i0, t0, t1 = (n_txt, blk.registers, n_txt) if blk.text_first else (0, n_img + blk.registers, n_img + n_txt)
        n = self.hw[0] * self.hw[1] if self.hw is not None else n_img  # the latent's tokens (reference tokens after them)
        qi, kt = q[:, :, i0:i0 + n], k[:, :, t0:t1]
        sim = (qi.float() @ kt.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [b, heads, n, T]
        if mask is not None:
            m = mask
            while m.ndim < 4:
                m = m.unsqueeze(0) if m.ndim == 2 else m.unsqueeze(1)
            m = m[..., i0:i0 + n, t0:t1]
            sim = sim.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sim + m.float()
        return sim.softmax(dim=-1).mean(dim=1)  # overwrite on recomputation, as for UNets


LATENT_SHAPE = "svdiff_latent_shape"


def with_latent_shape(transformer_options: dict, x: torch.Tensor) -> dict:
    """``transformer_options`` with the latent's shape for the DiT capture's map grid, when a DiT
    capture is installed there (anything else: the dict itself, untouched)."""
    dit = transformer_options.get("patches_replace", {}).get("dit", {})
    if any(isinstance(p, _DitReplace) for p in dit.values()):
        return {**transformer_options, LATENT_SHAPE: tuple(x.shape)}
    return transformer_options


# --------------------------------------------------------------------------------------
# Token positions with the CLIP's own tokenizer
# --------------------------------------------------------------------------------------
def token_positions(clip, prompt: str, word: str, seq_len=None) -> list:
    """Positions of ``word``'s tokens in the token sequence ``clip`` encodes ``prompt`` into.

    Positions index the conditioning's token axis (the T of the attention maps).  A word may
    span several tokens; all occurrences are returned.  Matches start (and, for T5, end) at a
    word boundary of the tokenizer's vocabulary.

    * CLIP-only models (SD1: 77 per chunk, a long prompt's chunks follow each other; SD2's
      CLIP-H; SDXL's CLIP-L and CLIP-G, whose features are concatenated per token, so the
      positions are CLIP-L's).
    * With a T5 encoder in the CLIP (SD3.x, Flux) the conditioning ends with the T5 tokens.
      Flux's sequence is T5's alone (its CLIP-L gives only the pooled vector).  SD3's is
      [CLIP-L/G (77 per chunk), T5]: the word is in both parts and the image tokens attend to
      both, so the positions in both are returned (CLIP part first).  The CLIP part's length is
      ``seq_len`` (the conditioning's length: an int, or a callable giving it; None encodes the
      prompt once) minus the number of T5 tokens.
    """
    word = (word or "").strip()
    if not word:
        return []
    toks = clip.tokenize(prompt)
    if "t5xxl" in toks and compat.text_encoder_present(clip, "t5xxl"):
        return _t5_sequence_positions(clip, toks, prompt, word, seq_len)
    return _clip_positions(clip, toks, word)


def _ids(chunks) -> list:
    return [int(t[0]) if not isinstance(t[0], torch.Tensor) else -1 for chunk in chunks for t in chunk]


def _word_ids(clip, word: str, key: str) -> list:
    wtoks = clip.tokenize(word, return_word_ids=True)[key]
    return [int(t[0]) for chunk in wtoks for t in chunk if len(t) > 2 and t[2] != 0]


def _clip_positions(clip, toks: dict, word: str) -> list:
    key = "l" if "l" in toks else next(iter(toks))
    ids = _ids(toks[key])
    word_ids = _word_ids(clip, word, key)
    is_end = None
    hf, start = compat.clip_word_tokenizer(clip)
    if hf is not None:

        def is_end(i, _hf=hf, _start=start):
            if i == _start or i < 0:
                return True
            t = _hf.convert_ids_to_tokens(int(i))
            return isinstance(t, str) and t.endswith("</w>")
    return _find_positions(ids, word_ids, is_end)


def _t5_positions(clip, ids: list, word: str) -> list:
    """The word's positions among T5 token ids; an occurrence must be followed by a word start
    (a "\u2581" piece), punctuation or a special token, so 'dog' is not found in a word split as
    'dog' 's'.  (The word's first piece starts with "\u2581": ComfyUI tokenizes word by word.)"""
    word_ids = _word_ids(clip, word, "t5xxl")
    found = _find_positions(ids, word_ids)
    hf = compat.t5_piece_tokenizer(clip)
    if hf is None or not word_ids:
        return found
    special = set(int(i) for i in getattr(hf, "all_special_ids", []))
    n, out = len(word_ids), []
    for j in range(0, len(found), n):
        nxt = found[j] + n
        if nxt < len(ids) and ids[nxt] not in special and ids[nxt] >= 0:
            t = hf.convert_ids_to_tokens(int(ids[nxt]))
            if isinstance(t, str) and not t.startswith("\u2581") and any(c.isalnum() for c in t):
                continue  # the word goes on ('dog' 's'); punctuation ('dog' ',') ends it
        out.extend(found[j:j + n])
    return out


def _t5_sequence_positions(clip, toks: dict, prompt: str, word: str, seq_len) -> list:
    ids = _ids(toks["t5xxl"])
    if callable(seq_len):
        seq_len = seq_len()
    if seq_len is None:
        with torch.no_grad():
            seq_len = int(clip.encode_from_tokens(toks).shape[1])
    offset = int(seq_len) - len(ids)
    if offset < 0:
        raise ValueError(f"the conditioning of {prompt!r} has {seq_len} tokens, fewer than its {len(ids)} T5 tokens")
    out = [offset + p for p in _t5_positions(clip, ids, word)]
    if offset > 0:  # SD3: the CLIP-L/G part comes first
        out = [p for p in _clip_positions(clip, toks, word) if p < offset] + out
    return out


def sample_token_positions(clip, prompt: str, words, seq_len=None) -> list:
    """``[token_positions(clip, prompt, w, seq_len) for w in words]``: per-region positions for
    the unmix loss (e.g. a ``CutMixSample``'s ``prompt`` and ``words``)."""
    return [token_positions(clip, prompt, w, seq_len) for w in words]
