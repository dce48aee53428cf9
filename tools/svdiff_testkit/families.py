"""Tiny random-weight instances of every model family ComfyUI users run, in ComfyUI's own classes.

One :class:`Family` per family: SD2.x (768-v, v-prediction, CLIP-H), SDXL (CLIP-L + CLIP-G,
pooled output and ADM conditioning), SD3.5 (MMDiT with RMS q/k norms; CLIP-L, CLIP-G and T5,
flow matching) and Flux (double and single blocks, T5 + CLIP-L, guidance embedding, flow
matching).  Each model type is a subclass of its family's ``comfy.supported_models`` class
with tiny sizes (``unet_extra_config`` overrides what ComfyUI's detection hard-codes for the
full-size models, e.g. Flux's 24 heads) and its own ``matches()``; :func:`register` puts it
first in ComfyUI's detection list, as the SD1 tiny model is.

The files are written in the formats ComfyUI's stock loaders read: SD2 and SDXL as
checkpoints (``CheckpointLoaderSimple``), SD3.5 and Flux as a diffusion model
(``UNETLoader``), text encoder files (``DualCLIPLoader`` / ``TripleCLIPLoader``) and a VAE
(``VAELoader``, a 16-channel TAESD).  ComfyUI sizes text encoders from JSON configurations
(and detects CLIP-G by its 32 layers, T5 by its 4096 width); the tiny sizes reach them through
the ``<name>_model_config`` model options every ComfyUI text encoder reads: the checkpoint
types pass them from ``clip_target``, and :func:`register` wraps ComfyUI's per-file sizing
hook of the separate-file loaders (``model_options_long_clip``, where it sizes long CLIPs) to
add them for text encoder files of the tiny widths.

Sizes that ComfyUI itself fixes are kept: SD3's text encoder pads the CLIP-L/G sequence to
4096 features and concatenates T5's tokens to it, so the tiny SD3 T5 is 4096 wide (one layer,
two heads of 8; its 32,128-token embedding makes it the largest tiny file, ~260 MB in fp16).
The tiny CLIP-G has 32 layers (of width 48), so the stock routing by layer count works.

Harness only: the pack never imports this.  Importing this module needs no ComfyUI.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

from svdiff_testkit import model_factory

CLIP_L = dict(model_factory.small_clip_config(32), num_hidden_layers=3)  # penultimate layer: 3 layers
CLIP_H = dict(model_factory.small_clip_config(40), num_hidden_layers=3)
CLIP_G = dict(model_factory.small_clip_config(48), num_hidden_layers=32)
T5_FLUX = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}
T5_SD3 = {"d_model": 4096, "d_ff": 16, "d_kv": 8, "num_heads": 2, "num_layers": 1}

ADM_TIME = 6 * 256  # SDXL's ADM: six size/crop values, 256 Fourier features each


def _unet(context_dim: int, **over) -> dict:
    cfg = model_factory.small_unet_config(context_dim=context_dim, image_size=32)
    cfg.update(use_linear_in_transformer=True, **over)
    return cfg


SD2_UNET = _unet(CLIP_H["hidden_size"])
SDXL_UNET = _unet(CLIP_L["hidden_size"] + CLIP_G["hidden_size"], num_classes="sequential",
                  adm_in_channels=CLIP_G["hidden_size"] + ADM_TIME, transformer_depth=[0, 1],
                  transformer_depth_output=[0, 0, 1, 1])
SD3_DIT = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
    "adm_in_channels": CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 256, "pos_embed_max_size": 16, "qk_norm": "rms", "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
    "theta": 10000, "qkv_bias": True, "guidance_embed": True, "context_in_dim": T5_FLUX["d_model"],
    "vec_in_dim": CLIP_L["hidden_size"],
}


@dataclass
class Family:
    """A tiny family: how it is built, written and loaded."""

    name: str                 # SD2, SDXL, SD3, Flux
    base: str                 # its comfy.supported_models class
    unet: dict                # the full diffusion-model configuration
    match: dict               # what its matches() compares with the detected configuration
    extra: dict               # unet_extra_config on top of the detected configuration
    te: dict                  # <name>_model_config options of its text encoders
    loader: str               # "checkpoint" or "dit"
    clip_type: str = ""       # DualCLIPLoader's type (dit families)
    te_files: tuple = ()      # text encoder names, in the order the CLIP loader takes them
    latent_channels: int = 4
    model_type: str | None = None   # forced model type (SD2: V_PREDICTION)
    text_encoders: tuple = field(default_factory=tuple)  # the CLIP's trainable encoders

    @property
    def prefix(self) -> str:
        return f"tiny_{self.name.lower()}"


FAMILIES = {
    "SD2": Family("SD2", "SD20", SD2_UNET, {"context_dim": 40, "model_channels": 32}, model_factory.TWO_HEADS,
                  {"clip_h_model_config": CLIP_H}, "checkpoint", model_type="V_PREDICTION", text_encoders=("clip_h",)),
    "SDXL": Family("SDXL", "SDXL", SDXL_UNET, {"context_dim": 80, "model_channels": 32, "adm_in_channels": 1584},
                   {"num_heads": -1, "num_head_channels": 16},
                   {"clip_l_model_config": CLIP_L, "clip_g_model_config": CLIP_G}, "checkpoint",
                   text_encoders=("clip_l", "clip_g")),
    "SD3": Family("SD3", "SD3", SD3_DIT, {"in_channels": 16, "depth": 2, "adm_in_channels": 80}, {},
                  {"clip_l_model_config": CLIP_L, "clip_g_model_config": CLIP_G, "t5xxl_model_config": T5_SD3}, "dit",
                  clip_type="sd3", te_files=("clip_l", "clip_g", "t5xxl_sd3"), latent_channels=16,
                  text_encoders=("clip_l", "clip_g", "t5xxl")),
    "Flux": Family("Flux", "Flux", FLUX_DIT, {"image_model": "flux", "hidden_size": 64, "depth": 1},
                   {"num_heads": 2, "axes_dim": [8, 12, 12]},
                   {"clip_l_model_config": CLIP_L, "t5xxl_model_config": T5_FLUX}, "dit",
                   clip_type="flux", te_files=("clip_l", "t5xxl_flux"), latent_channels=16,
                   text_encoders=("clip_l", "t5xxl")),
}

# text encoder files: their widths identify them to the loader hook
TE_FILES = {
    "clip_l": ("clip_l_model_config", CLIP_L),
    "clip_g": ("clip_g_model_config", CLIP_G),
    "t5xxl_sd3": ("t5xxl_model_config", T5_SD3),
    "t5xxl_flux": ("t5xxl_model_config", T5_FLUX),
}


def _merge_options(model_options: dict, te: dict) -> dict:
    """``model_options`` with the tiny text-encoder sizes (kept over what the loader set, e.g.
    the long-CLIP position count, which is merged in)."""
    out = dict(model_options)
    for k, v in te.items():
        out[k] = {**out.get(k, {}), **v}
    return out


def _clip_with_options(clip_cls, te: dict):
    class TinyTE(clip_cls):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, model_options=_merge_options(model_options, te), **kw)

    TinyTE.__name__ = TinyTE.__qualname__ = "Tiny" + clip_cls.__name__
    return TinyTE


def _matches(cls, unet_config, state_dict=None, **kwargs):
    for k, v in cls.unet_config.items():
        if unet_config.get(k, "missing") != v:
            return False
    return True


@functools.cache
def model_class(name: str):
    """The tiny family's ``supported_models`` subclass (named ``Tiny<base>``)."""
    import comfy.model_base
    import comfy.supported_models as SM
    import comfy.supported_models_base

    fam = FAMILIES[name]
    base = getattr(SM, fam.base)
    te = fam.te

    def clip_target(self, state_dict={}):
        t = base.clip_target(self, state_dict)
        return comfy.supported_models_base.ClipTarget(t.tokenizer, _clip_with_options(t.clip, te))

    body = {
        "unet_config": dict(fam.match),
        "unet_extra_config": {**base.unet_extra_config, **fam.extra},
        "matches": classmethod(_matches),
        "clip_target": clip_target,
        "__doc__": f"A tiny {fam.name} for tests (harness only).",
    }
    if fam.model_type is not None:
        mt = getattr(comfy.model_base.ModelType, fam.model_type)
        body["model_type"] = lambda self, state_dict, prefix="": mt
    return type("Tiny" + fam.base, (base,), body)


def init_weights(module: torch.nn.Module, seed: int) -> None:
    model_factory.init_weights(module, seed, std=0.02, emb_std=0.3)
    # buffers a checkpoint fills (SD3's MMDiT registers pos_embed with torch.empty): left alone
    # they hold whatever the memory held (1e24 or NaN), so fill them too, from their own generator
    g = torch.Generator().manual_seed(seed + 7919)
    for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
        if name.split(".")[-1] == "pos_embed" and b.is_floating_point():
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def _dit_clip_target(name: str):
    """The text encoders the separate-file loaders build for a DiT family (all of them)."""
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip as sd3

    if name == "SD3":
        tok, clip = sd3.SD3Tokenizer, sd3.sd3_clip(clip_l=True, clip_g=True, t5=True)
    else:
        tok, clip = comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip()
    return comfy.supported_models_base.ClipTarget(tok, _clip_with_options(clip, FAMILIES[name].te))


def _detected_config(name: str) -> dict:
    """The configuration ComfyUI's detection gives the tiny DiT's weights in this version (0.33's
    Flux adds ``txt_ids_dims``, empty for Flux.1)."""
    cfg = dict(FAMILIES[name].unet)
    if name == "Flux":
        import comfy.ldm.flux.model as flux_model

        if "txt_ids_dims" in getattr(flux_model.FluxParams, "__dataclass_fields__", {}):
            cfg["txt_ids_dims"] = []
    return cfg


def build(name: str, seed: int = 0, dtype=torch.float32):
    """(model_base model, comfy.sd.CLIP) of a tiny family with deterministic random weights."""
    import comfy.sd

    fam = FAMILIES[name]
    cls = model_class(name)
    if fam.loader == "checkpoint":
        return model_factory.build_model(cls, dict(fam.unet), seed, init_weights, dtype)
    cfg = cls(_detected_config(name))
    cfg.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        model = cfg.get_model({})
        init_weights(model.diffusion_model, seed)
    clip = comfy.sd.CLIP(_dit_clip_target(name))
    with torch.inference_mode(False):
        init_weights(clip.cond_stage_model, seed + 1)
    return model, clip


def _clip_files(clip) -> dict:
    """{file name: state dict} of a tiny CLIP's encoders in the stand-alone file layout."""
    sd = clip.cond_stage_model.state_dict()
    out = {}
    for enc in ("clip_l", "clip_g", "t5xxl"):
        p = enc + ".transformer."
        part = {k[len(p):]: v.detach().clone() for k, v in sd.items() if k.startswith(p)}
        if part:
            out[enc] = part
    return out


def tiny_vae_state_dict(latent_channels: int, seed: int) -> dict:
    """A TAESD of ``latent_channels`` (ComfyUI's VAE class detects it by its decoder)."""
    import comfy.taesd.taesd

    with torch.inference_mode(False):
        vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
        model_factory.init_weights(vae, seed, std=0.05)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()
            if k.startswith("taesd_encoder.") or k.startswith("taesd_decoder.")}


def checkpoint_state_dict(name: str, seed: int = 0) -> dict:
    """A single-file checkpoint (UNet + text encoders + VAE) of SD2 or SDXL, in the layout the
    family's own ``process_*_state_dict_for_saving`` writes."""
    model, clip = build(name, seed)
    sd = {"model.diffusion_model." + k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}
    clip_sd = {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    sd.update(model.model_config.process_clip_state_dict_for_saving(clip_sd))
    vae = tiny_vae_state_dict(4, seed + 2)
    sd.update(model.model_config.process_vae_state_dict_for_saving(vae))
    return sd


def _save(sd: dict, path: str) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)


def _folder(kind: str) -> str:
    import folder_paths

    d = folder_paths.get_folder_paths(kind)[0]
    os.makedirs(d, exist_ok=True)
    return d


def _install(kind: str, fname: str, make) -> str:
    path = os.path.join(_folder(kind), fname)
    if not os.path.exists(path):
        _save(make(), path)
    return fname


def install(name: str, seed: int = 0) -> dict:
    """Register the tiny family and write its files into ComfyUI's model folders (once).

    Returns the loader inputs: ``{"ckpt_name"}`` for checkpoint families, else
    ``{"unet_name", "clip_names", "clip_type", "vae_name"}``.
    """
    register(name)
    fam = FAMILIES[name]
    if fam.loader == "checkpoint":
        return {"ckpt_name": _install("checkpoints", f"{fam.prefix}_{seed}.safetensors",
                                      lambda: checkpoint_state_dict(name, seed))}
    files = _dit_files(name, seed)
    return {
        "unet_name": _install("diffusion_models", f"{fam.prefix}_{seed}.safetensors", lambda: files()["unet"]),
        "clip_names": [_install("text_encoders", f"tiny_{te}_{seed}.safetensors", lambda te=te: files()[te])
                       for te in fam.te_files],
        "clip_type": fam.clip_type,
        "vae_name": _install("vae", f"tiny_taesd16_{seed}.safetensors", lambda: tiny_vae_state_dict(16, seed + 2)),
    }


def all_weights_subset(name: str) -> str:
    """SVDiff Train's subset that shifts every weight of the family's diffusion model."""
    return "UNet" if FAMILIES[name].loader == "checkpoint" else "DiT"


def loader_graph(name: str, seed: int = 0) -> tuple:
    """(API-prompt nodes, MODEL, CLIP, VAE links) of the stock loaders a user connects for the
    tiny family (installed first): Load Checkpoint for SD2/SDXL; Load Diffusion Model +
    TripleCLIPLoader/DualCLIPLoader + Load VAE for the DiTs.  Node ids: "ld", "te", "vae"."""
    f = install(name, seed)
    if "ckpt_name" in f:
        return {"ld": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f["ckpt_name"]}}}, ["ld", 0], ["ld", 1], ["ld", 2]
    g = {"ld": {"class_type": "UNETLoader", "inputs": {"unet_name": f["unet_name"], "weight_dtype": "default"}},
         "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f["vae_name"]}}}
    cn = f["clip_names"]
    if len(cn) == 3:
        g["te"] = {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": cn[0], "clip_name2": cn[1], "clip_name3": cn[2]}}
    else:
        g["te"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": cn[0], "clip_name2": cn[1], "type": f["clip_type"]}}
    return g, ["ld", 0], ["te", 0], ["vae", 0]


def _dit_files(name: str, seed: int):
    @functools.cache
    def files():
        model, clip = build(name, seed)
        out = {"unet": {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}}
        encs = _clip_files(clip)
        for te in FAMILIES[name].te_files:
            out[te] = encs[te if te.startswith("clip") else "t5xxl"]
        return out

    return files


def _tiny_te_options(state_dicts) -> dict:
    """The tiny sizes of the text encoder files among ``state_dicts`` (by width and depth)."""
    opts = {}
    for sd in state_dicts:
        emb = sd.get("text_model.embeddings.token_embedding.weight")
        if emb is not None:
            n_layers = sum(1 for k in sd if k.endswith(".mlp.fc1.weight"))
            for key, cfg in (TE_FILES["clip_l"], TE_FILES["clip_g"]):
                if emb.shape[1] == cfg["hidden_size"] and n_layers == cfg["num_hidden_layers"]:
                    opts[key] = cfg
        t5 = sd.get("encoder.block.0.layer.0.SelfAttention.k.weight")
        if t5 is not None:
            for key, cfg in (TE_FILES["t5xxl_sd3"], TE_FILES["t5xxl_flux"]):
                n_blocks = sum(1 for k in sd if k.endswith(".layer.0.SelfAttention.k.weight"))
                if t5.shape[1] == cfg["d_model"] and t5.shape[0] == cfg["d_kv"] * cfg["num_heads"] and n_blocks == cfg["num_layers"]:
                    opts[key] = cfg
    return opts


_HOOKED = {}


def _hook_text_encoder_loader() -> None:
    """Wrap ``comfy.text_encoders.long_clipl.model_options_long_clip``, the per-file sizing hook
    ``comfy.sd.load_text_encoder_state_dicts`` calls for every text encoder file of
    DualCLIPLoader/TripleCLIPLoader/CLIPLoader (ComfyUI sizes long CLIPs there), so that tiny
    text encoder files get their sizes too."""
    import comfy.text_encoders.long_clipl as long_clipl

    if _HOOKED.get("te"):
        return
    original = long_clipl.model_options_long_clip

    def model_options_long_clip(sd, tokenizer_data, model_options, *args, **kw):
        tokenizer_data, model_options = original(sd, tokenizer_data, model_options, *args, **kw)
        opts = _tiny_te_options([sd])
        if opts:
            model_options = _merge_options(model_options, opts)
        return tokenizer_data, model_options

    long_clipl.model_options_long_clip = model_options_long_clip
    _HOOKED["te"] = original


def register(name: str) -> None:
    """Let ComfyUI's loaders detect the tiny family first (harness only)."""
    model_factory.register(model_class(name))
    _hook_text_encoder_loader()
