"""SVDiff for ComfyUI: spectral-shift fine-tuning (Han et al., ICCV 2023) as nodes.

ComfyUI loads this file as a custom-node package and calls :func:`comfy_entrypoint`.
Importing the package itself imports nothing from ComfyUI (the method lives in
``svdiff/``, plain PyTorch); the nodes are imported when ComfyUI asks for them.
The pack never adds its own folder to ``sys.path`` (its ``nodes/`` would shadow ComfyUI's
``nodes.py``): everything is imported relatively.
"""

__version__ = "0.1.0"

# ComfyUI serves this folder at /extensions/<pack folder>/ (for a V3 comfy_entrypoint pack
# too); the editor reads a node's help page from docs/<node id>.md there.  No JavaScript.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import all_nodes
    from .nodes.common import register_shift_folder

    register_shift_folder()

    class SVDiffExtension(ComfyExtension):
        async def get_node_list(self):
            return all_nodes()

    return SVDiffExtension()
