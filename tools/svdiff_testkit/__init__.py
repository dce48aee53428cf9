"""Test/demo harness for the SVDiff pack: boots a real ComfyUI in-process, builds tiny models.

This lives outside the pack on purpose: a user's ComfyUI never imports it.  Scripts add
``tools/`` (never the pack root, whose ``nodes/`` would shadow ComfyUI's ``nodes.py``) to
``sys.path``.
"""
