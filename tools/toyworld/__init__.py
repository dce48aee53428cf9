"""A procedural toy world and a tiny pretrained text-to-image model in ComfyUI classes."""
