"""The attention regularisers of SVDiff Train as plain functions: the Sec. 3.3 unmix loss on
mixed Cut-Mix samples and appendix D.1's Eq. 10 on single-subject samples, computed from the
cross-attention maps captured during the step."""

from __future__ import annotations

import re
from typing import Optional

import torch

from ...svdiff import attention as attn
from ...svdiff.cutmix import stack_masks
from .data import special_tokens
from .settings import err


def parse_resolutions(text) -> Optional[set]:
    """``attention_resolutions``: "all" (or empty) -> None; "16" / "16, 32" -> {16, 32}."""
    t = str(text or "").strip().lower()
    if t in ("", "all", "*"):
        return None
    out = set()
    for part in re.split(r"[,;\s]+", t):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise err("attention_resolutions", f"{text!r} is not 'all' or a list of map side lengths such as '16' or '8, 16'")
        out.add(int(part))
    return out




def single_subject_words(prompt: str, class_prompt: str) -> tuple:
    """(special words, class word) of a single-subject instance prompt, for Eq. 10.

    The special words are those the class prompt lacks ('sks'); the class word is the word
    right after the last of them when the class prompt has it ('dog'), else the last word of
    the class prompt that the instance prompt also has.
    """
    words = re.findall(r"[\w\[\]<>]+", prompt.lower())
    cls_words = re.findall(r"[\w\[\]<>]+", class_prompt.lower())
    specials = special_tokens(prompt, class_prompt)
    if not specials:
        raise err("prompt", f"attention_reg_weight needs a special token in the prompt that the class prompt lacks "
                            f"(e.g. 'sks' in 'photo of a sks dog'); {prompt!r} has none")
    last = max(i for i, w in enumerate(words) if w in specials)
    if last + 1 < len(words) and words[last + 1] in cls_words:
        return specials, words[last + 1]
    for w in reversed(cls_words):
        if w in words:
            return specials, w
    raise err("class_prompt", f"attention_reg_weight needs the class word (e.g. 'dog') in both the prompt and the class "
                              f"prompt; {class_prompt!r} shares no word with {prompt!r}")


def concat_maps(parts: list) -> dict:
    """Captured maps of several forwards (block -> [b_i, P, T]) joined along the batch."""
    if len(parts) == 1:
        return parts[0]
    keys = set(parts[0])
    return {k: torch.cat([p[k] for p in parts], 0) for k in keys if all(k in p for p in parts)}


def select_maps(maps: dict, idx: list) -> dict:
    ix = torch.tensor(idx, dtype=torch.long)
    return {k: m[ix.to(m.device)] for k, m in maps.items()}




def unmix_term(maps: dict, shapes: dict, samples: list, positions_of, device) -> Optional[torch.Tensor]:
    """Sec. 3.3's unmix loss over the mixed instance samples of the step (None: none is mixed)."""
    mixed = [j for j, s in enumerate(samples) if s.mixed]
    if not mixed:
        return None
    ms = [samples[j] for j in mixed]
    ids = [[positions_of(s.prompt, w, "the token") for w in s.words] for s in ms]
    return attn.unmix_loss(select_maps(maps, mixed), ids, stack_masks(ms).to(device), shapes)


def eq10_term(maps: dict, samples: Optional[list], cond_ids: Optional[list], positions_of, single_pos, threshold: float):
    """Appendix D.1's Eq. 10 over the single-subject instance samples (None: there are none).

    ``samples``: the step's Cut-Mix instance samples, or None for the images route, where
    instance sample j has the prompt (or caption) ``cond_ids[j]`` and ``single_pos[c]`` =
    (special-token positions, class-word positions) of prompt c.
    """
    if samples is not None:
        single = [j for j, s in enumerate(samples) if not s.mixed]
        sp = [positions_of(samples[j].prompt, samples[j].tokens[0], "the token") for j in single]
        cp = [positions_of(samples[j].prompt, samples[j].class_words[0], "the class word") for j in single]
    else:
        single = list(range(len(cond_ids)))
        sp, cp = [single_pos[c][0] for c in cond_ids], [single_pos[c][1] for c in cond_ids]
    if not single:
        return None
    return attn.attention_reg_loss(select_maps(maps, single), sp, cp, threshold)


def attention_loss(maps: dict, shapes: dict, batch, s, ctx) -> torch.Tensor | float:
    """unmix_weight * unmix_term + attention_reg_weight * eq10_term on the step's captured maps;
    each term's value is appended to ``ctx.loss_map`` ("unmix", "attention_reg").

    ``ctx`` gives ``positions_of(prompt, word, what)``, ``single_pos``, ``device``,
    ``resolutions`` (the parsed attention_resolutions), ``seen`` (map sides the capture met)
    and ``loss_map``.
    """
    if not maps:
        raise err("attention_resolutions", f"no cross-attention map of side {sorted(ctx.resolutions or [])} at resolution "
                                           f"{s.resolution}; this model's maps here have sides {sorted(ctx.seen())} (or use 'all')")
    total = 0.0
    if s.unmix_weight > 0:
        lu = unmix_term(maps, shapes, batch.samples, ctx.positions_of, ctx.device)
        if lu is not None:
            total = total + s.unmix_weight * lu
        ctx.loss_map.setdefault("unmix", []).append(float(lu.detach()) if lu is not None else 0.0)
    if s.attention_reg_weight > 0:
        lr = eq10_term(maps, batch.samples, batch.cond_ids, ctx.positions_of, ctx.single_pos, s.attention_threshold)
        if lr is not None:
            total = total + s.attention_reg_weight * lr
        ctx.loss_map.setdefault("attention_reg", []).append(float(lr.detach()) if lr is not None else 0.0)
    return total
