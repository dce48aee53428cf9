"""UI-workflow (the editor's ``.json``) to API-prompt converter, and a workflow validator.

ComfyUI turns an editor graph into an API prompt only in JavaScript (the frontend's
``graphToPrompt``).  This module does the same in Python for the harness, from node
definitions in the ``/object_info`` format (built in-process from ComfyUI's
``NODE_CLASS_MAPPINGS`` by :func:`object_info`, or fetched from a running server):

* virtual nodes are skipped: Note, MarkdownNote, Reroute, PrimitiveNode (and any node whose
  type is not a real node but is listed in :data:`VIRTUAL_NODES`); muted nodes (mode 2)
  are skipped too, and links to them are dropped, as the editor does;
* ``widgets_values`` map, in input order (required, then optional), onto the inputs that
  the editor shows as widgets (INT, FLOAT, STRING, BOOLEAN, COMBO without ``forceInput``);
  an INT with ``control_after_generate`` (default: inputs named ``seed``/``noise_seed``)
  or a COMBO with it carries one extra value ("fixed", "randomize", ...), and a combo with
  an upload button (``image_upload``...) may carry one for the button (older files);
* a linked input becomes ``[origin_id, origin_slot]``, following links through Reroute
  nodes; a link from a PrimitiveNode gives the primitive's value instead.

:func:`validate_workflow` checks every node type exists, every link joins matching types,
and every widget value is allowed (combo options, numeric range, value type).
This module imports no ComfyUI at import time.
"""

from __future__ import annotations

import copy
import json
import os

from . import comfy_env

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted or does not validate."""


# --------------------------------------------------------------------------- node defs


def object_info(node_class_mappings=None) -> dict:
    """Node definitions in the ``/object_info`` format for every registered node.

    Mirrors ``server.py``'s ``node_info`` for what the converter needs: V3 nodes through
    ``GET_NODE_INFO_V1()``, V1 nodes through ``INPUT_TYPES()``/``RETURN_TYPES``.
    """
    if node_class_mappings is None:
        import nodes

        node_class_mappings = nodes.NODE_CLASS_MAPPINGS
    out = {}
    for name, cls in node_class_mappings.items():
        out[name] = node_info(name, cls)
    return out


def node_info(name: str, cls) -> dict:
    if hasattr(cls, "GET_NODE_INFO_V1"):
        try:
            info = cls.GET_NODE_INFO_V1()
        except TypeError:
            info = None
        if info is not None:
            return json.loads(json.dumps(info, default=_jsonable))
    inputs = cls.INPUT_TYPES()
    info = {
        "input": inputs,
        "input_order": {k: list(v.keys()) for k, v in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": name,
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "category": getattr(cls, "CATEGORY", "sd"),
    }
    return json.loads(json.dumps(info, default=_jsonable))


def _jsonable(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def input_specs(info: dict) -> list[tuple[str, object, dict, bool]]:
    """``[(name, type, options, optional)]`` in the editor's order (required, optional)."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    for section in ("required", "optional"):
        defs = info.get("input", {}).get(section, {}) or {}
        for name in order.get(section, list(defs)):
            if name not in defs:
                continue
            spec = defs[name]
            typ = spec[0] if isinstance(spec, (list, tuple)) else spec
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts or {}, section == "optional"))
    return out


def combo_options(typ, opts) -> list | None:
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return list(opts.get("options", []))
    return None


def is_widget(typ, opts) -> bool:
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def widget_slots(info: dict) -> list[tuple[str, str]]:
    """The editor's widgets of a node, in order: ``[(input_name, kind)]``.

    ``kind`` is ``"value"`` for the input's own widget, ``"control"`` for the
    control-after-generate widget that follows seeds, ``"upload"`` for an upload button.
    """
    slots = []
    for name, typ, opts, _ in input_specs(info):
        if not is_widget(typ, opts):
            continue
        slots.append((name, "value"))
        if isinstance(typ, list) or typ == "COMBO":
            if opts.get("control_after_generate"):
                slots.append((name, "control"))
            if any(opts.get(f) for f in UPLOAD_FLAGS):
                slots.append((name, "upload"))
        elif typ == "INT":
            cag = opts.get("control_after_generate")
            if cag if cag is not None else name in ("seed", "noise_seed"):
                slots.append((name, "control"))
    return slots


def widget_values(node: dict, info: dict) -> dict:
    """``{input_name: value}`` from a UI node's ``widgets_values`` (list or dict form)."""
    wv = node.get("widgets_values")
    if wv is None:
        return {}
    if isinstance(wv, dict):  # some nodes serialise a dict keyed by widget name
        return {k: v for k, v in wv.items() if k in {s[0] for s in widget_slots(info)}}
    out = {}
    for (name, kind), value in zip(widget_slots(info), wv):
        if kind == "value":
            out[name] = value
    return out


# --------------------------------------------------------------------------- loading


def load(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    with open(path_or_dict, encoding="utf-8") as f:
        return json.load(f)


def _links(wf: dict) -> dict:
    """``{link_id: (origin_id, origin_slot, target_id, target_slot, type)}``."""
    out = {}
    for link in wf.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            lid, o, os_, t, ts, typ = link[:6]
            out[lid] = (o, os_, t, ts, typ)
    return out


def _nodes(wf: dict) -> dict:
    if wf.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    return {n["id"]: n for n in wf.get("nodes", [])}


def _resolve(nodes_by_id, links, link_id, seen=None):
    """Follow a link upstream through Reroute nodes: ``(origin_node, origin_slot)``."""
    seen = seen or set()
    if link_id in seen:
        raise WorkflowError(f"link {link_id}: reroute cycle")
    seen.add(link_id)
    if link_id not in links:
        raise WorkflowError(f"link {link_id} is referenced by a node but missing from 'links'")
    origin, slot, _, _, _ = links[link_id]
    node = nodes_by_id.get(origin)
    if node is None:
        raise WorkflowError(f"link {link_id} starts at node {origin}, which does not exist")
    if node.get("type") == "Reroute":
        ins = node.get("inputs") or []
        if not ins or ins[0].get("link") is None:
            return None, None
        return _resolve(nodes_by_id, links, ins[0]["link"], seen)
    return node, slot


# --------------------------------------------------------------------------- conversion


def to_prompt(workflow, defs: dict, replace: dict | None = None) -> dict:
    """Convert a UI workflow to an API prompt ``{id: {class_type, inputs, _meta}}``.

    ``defs``: node definitions in the ``/object_info`` format.  ``replace``: optional
    ``{input_name: value}`` overrides applied to every node having that widget (e.g. the
    checkpoint name swapped for the demo model).
    """
    wf = load(workflow)
    nodes_by_id = _nodes(wf)
    links = _links(wf)
    prompt: dict = {}
    for nid, node in nodes_by_id.items():
        typ = node.get("type")
        if typ in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            continue
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            raise WorkflowError(f"node {nid} ({typ}) is bypassed; bypass is not supported by this converter")
        if typ not in defs:
            raise WorkflowError(f"node {nid}: unknown node type {typ!r}")
        info = defs[typ]
        inputs = dict(widget_values(node, info))
        for slot in node.get("inputs") or []:
            lid = slot.get("link")
            if lid is None:
                continue
            origin, oslot = _resolve(nodes_by_id, links, lid)
            if origin is None:
                continue
            if origin.get("type") == "PrimitiveNode":
                vals = origin.get("widgets_values") or []
                if vals:
                    inputs[slot["name"]] = vals[0]
                continue
            if origin.get("type") in VIRTUAL_NODES:
                continue
            inputs[slot["name"]] = [str(origin["id"]), int(oslot)]
        if replace:
            widget_names = {n for n, k in widget_slots(info) if k == "value"}
            for k, v in replace.items():
                if k in widget_names and not isinstance(inputs.get(k), list):
                    inputs[k] = v
        prompt[str(nid)] = {"class_type": typ, "inputs": inputs, "_meta": {"title": node.get("title") or typ}}
    # links to skipped (muted) nodes vanish, as in the editor
    for entry in prompt.values():
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in prompt:
                del entry["inputs"][k]
    return prompt


# --------------------------------------------------------------------------- validation


def fill_defaults(prompt: dict, defs: dict) -> dict:
    """Required widget inputs a bundled workflow does not carry yet (a node gained an input
    after the workflow was written) get the node's default, as the editor would add them."""
    for entry in prompt.values():
        info = defs.get(entry["class_type"], {})
        for name, spec in (info.get("input", {}).get("required") or {}).items():
            if name not in entry["inputs"] and isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) \
                    and "default" in spec[1]:
                entry["inputs"][name] = spec[1]["default"]
    return prompt


def _types_match(out_type: str, in_type) -> bool:
    if isinstance(in_type, list):
        in_type = "COMBO"
    if out_type == "*" or in_type == "*":
        return True
    a = set(str(out_type).split(","))
    b = set(str(in_type).split(","))
    return bool(a & b)


def check_widget_value(name: str, typ, opts: dict, value) -> str | None:
    """Why ``value`` is not allowed for this widget, or None when it is."""
    options = combo_options(typ, opts)
    if options is not None:
        if opts.get("multi_select"):
            vals = value if isinstance(value, list) else [value]
            bad = [v for v in vals if v not in options]
            return f"{name}: {bad!r} not among the options" if bad else None
        if value not in options:
            shown = options if len(options) <= 8 else options[:8] + ["..."]
            return f"{name}: {value!r} is not one of {shown}"
        return None
    if typ == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                return f"{name}: {value!r} is not an integer"
    elif typ == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: {value!r} is not a number"
    elif typ == "STRING":
        if not isinstance(value, str):
            return f"{name}: {value!r} is not a string"
    elif typ == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: {value!r} is not a boolean"
    if typ in ("INT", "FLOAT") and isinstance(value, (int, float)):
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo:
            return f"{name}: {value} is below the minimum {lo}"
        if hi is not None and value > hi:
            return f"{name}: {value} is above the maximum {hi}"
    return None


CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}


def _check_widget_count(where: str, node: dict, slots: list, problems: list) -> None:
    wv = node.get("widgets_values")
    if not isinstance(wv, list):
        return
    if len(wv) < sum(1 for s in slots if s[1] != "upload"):
        problems.append(f"{where}: {len(wv)} widget values for {len(slots)} widgets {slots}")
    elif len(wv) > len(slots):
        problems.append(f"{where}: {len(wv)} widget values but only {len(slots)} widgets {slots}")
    for (name, kind), value in zip(slots, wv):
        if kind == "control" and value not in CONTROL_VALUES:
            problems.append(f"{where}: {name} control value {value!r} not in {sorted(CONTROL_VALUES)}")


def _check_link(where: str, nid, i: int, name: str, lid, in_type, nodes_by_id: dict, links: dict, defs: dict) -> list:
    """Problems of the link ``lid`` that feeds input ``name`` (slot ``i``) of node ``nid``."""
    if lid not in links:
        return [f"{where}: input {name} refers to missing link {lid}"]
    out = []
    o, os_, t, ts, ltype = links[lid]
    if t != nid or ts != i:
        out.append(f"{where}: link {lid} says it ends at node {t} slot {ts}, not slot {i}")
    try:
        origin, oslot = _resolve(nodes_by_id, links, lid)
    except WorkflowError as e:
        return out + [f"{where}: {e}"]
    if origin is None:
        return out + [f"{where}: input {name} comes from a Reroute that has no input"]
    if ltype is not None and not _types_match(ltype, in_type):
        out.append(f"{where}: link {lid} has type {ltype} but input {name} wants {in_type}")
    odef = None if origin.get("type") in VIRTUAL_NODES else defs.get(origin.get("type"))
    if odef is None:
        return out  # a virtual origin, or one reported at its own node
    outs = odef.get("output", [])
    if oslot >= len(outs):
        return out + [f"{where}: link {lid} starts at output {oslot} of {origin['type']}, which has {len(outs)} outputs"]
    if not _types_match(outs[oslot], in_type):
        out.append(f"{where}: input {name} ({in_type}) is fed {outs[oslot]} by node {origin['id']} ({origin['type']})")
    return out


def _check_inputs(where: str, nid, node: dict, specs: dict, nodes_by_id: dict, links: dict, defs: dict, problems: list) -> set:
    """Check every connected input slot; returns the names of the linked inputs."""
    linked = set()
    for i, slot in enumerate(node.get("inputs") or []):
        name = slot.get("name")
        if name not in specs:
            problems.append(f"{where}: input slot {name!r} is not an input of {node.get('type')}")
            continue
        lid = slot.get("link")
        if lid is None:
            continue
        linked.add(name)
        problems.extend(_check_link(where, nid, i, name, lid, specs[name][0], nodes_by_id, links, defs))
    return linked


def _check_values(where: str, node: dict, info: dict, specs: dict, linked: set, replace, problems: list) -> None:
    values = widget_values(node, info)
    if replace:
        values.update({k: v for k, v in replace.items() if k in values})
    for name, (t, o, optional) in specs.items():
        if not is_widget(t, o):
            if not optional and name not in linked:
                problems.append(f"{where}: required input {name} ({t}) is not connected")
            continue
        if name in linked:
            continue
        if name not in values:
            if not optional:
                problems.append(f"{where}: widget {name} has no value")
            continue
        why = check_widget_value(name, t, o, values[name])
        if why:
            problems.append(f"{where}: {why}")


def _check_outputs(nodes_by_id: dict, defs: dict, problems: list) -> None:
    """Output slots of real nodes must carry their definition's types."""
    for nid, node in nodes_by_id.items():
        d = defs.get(node.get("type"))
        if d is None or node.get("type") in VIRTUAL_NODES:
            continue
        for j, out in enumerate(node.get("outputs") or []):
            if j < len(d.get("output", [])) and out.get("type") not in (None, "*") and not _types_match(out["type"], d["output"][j]):
                problems.append(f"node {nid} ({node['type']}): output {j} says {out['type']}, the node gives {d['output'][j]}")


def validate_workflow(workflow, defs: dict, replace: dict | None = None) -> list[str]:
    """Every problem found in a UI workflow (empty list: valid).

    Checks: node types exist (virtual ones aside); each link's recorded type, its origin
    output's type and its target input's type agree; every widget value is allowed (after
    ``replace``); required inputs that are not widgets are connected; the widget count fits.
    """
    wf = load(workflow)
    problems: list[str] = []
    try:
        nodes_by_id = _nodes(wf)
    except WorkflowError as e:
        return [str(e)]
    links = _links(wf)
    for nid, node in nodes_by_id.items():
        typ = node.get("type")
        where = f"node {nid} ({typ})"
        if typ in VIRTUAL_NODES:
            continue
        if typ not in defs:
            problems.append(f"{where}: node type does not exist")
            continue
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            problems.append(f"{where}: bypassed nodes are not supported")
        info = defs[typ]
        specs = {name: (t, o, opt) for name, t, o, opt in input_specs(info)}
        _check_widget_count(where, node, widget_slots(info), problems)
        linked = _check_inputs(where, nid, node, specs, nodes_by_id, links, defs, problems)
        _check_values(where, node, info, specs, linked, replace, problems)
    _check_outputs(nodes_by_id, defs, problems)
    return problems


def workflow_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json"))


#: widgets of ComfyUI's stock loaders that name a model file, and the models folder each lists
MODEL_FILE_WIDGETS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
}


def model_files(workflow) -> list[tuple[str, str, str]]:
    """``[(widget, models folder, file name)]`` of every model file the workflow's stock loaders name.

    Read from the widget order of the definitions the loaders have on both supported ComfyUI
    versions (their file widgets come first)."""
    wf = load(workflow)
    out = []
    for n in wf.get("nodes", []):
        widgets = MODEL_FILE_WIDGETS.get(n.get("type"), {})
        for (name, folder), value in zip(widgets.items(), n.get("widgets_values") or []):
            out.append((name, folder, value))
    return out


def notes(workflow) -> list[str]:
    """The text of the workflow's Note/MarkdownNote nodes."""
    wf = load(workflow)
    out = []
    for n in wf.get("nodes", []):
        if n.get("type") in ("Note", "MarkdownNote"):
            out.append(" ".join(str(v) for v in n.get("widgets_values") or []))
    return out


def patch_inputs(prompt: dict, class_type: str, **values) -> dict:
    """A copy of ``prompt`` with widget inputs of every ``class_type`` node overridden."""
    out = copy.deepcopy(prompt)
    for entry in out.values():
        if entry["class_type"] == class_type:
            for k, v in values.items():
                if k in entry["inputs"] and isinstance(entry["inputs"][k], list) and len(entry["inputs"][k]) == 2:
                    continue  # linked: leave the link
                entry["inputs"][k] = v
    return out


# --------------------------------------------------------------------------- building


class WorkflowBuilder:
    """Write a UI workflow (format version 0.4) from node definitions, so widget order,
    seed control values and slot types always match what the editor expects.

    ``n = b.node("KSampler", seed=1, steps=20)`` sets widget values by input name (the
    definitions' defaults fill the rest); ``b.link(src, 0, n, "model")`` joins an output to
    an input.  ``b.note(text)`` adds a Note.  ``col``/``row``/``band`` place a node (bands are
    horizontal strips, one below the other).  ``b.build()`` returns the JSON-ready dict.
    """

    COL_W, ROW_H = 440, 60
    # nodes the editor draws an image in: room for it, so it does not spill over the next node
    MIN_HEIGHT = {"LoadImage": 340, "PreviewImage": 300, "SaveImage": 300}

    def __init__(self, defs: dict):
        self.defs = defs
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self._next_id = 1

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def node(self, type_: str, title: str | None = None, col: int = 0, row: int | None = None, band: int = 0,
             **widgets) -> dict:
        if type_ not in self.defs:
            raise WorkflowError(f"unknown node type {type_!r}")
        info = self.defs[type_]
        specs = {name: (t, o) for name, t, o, _ in input_specs(info)}
        unknown = {k for k in widgets if not k.endswith("__control")} - set(specs)
        if unknown:
            raise WorkflowError(f"{type_} has no inputs {sorted(unknown)}")
        values = []
        for name, kind in widget_slots(info):
            t, o = specs[name]
            if kind == "control":
                values.append(widgets.get(name + "__control", "fixed"))
            elif kind == "upload":
                values.append("image")
            elif name in widgets:
                values.append(widgets[name])
            elif "default" in o:
                values.append(o["default"])
            else:
                opts = combo_options(t, o)
                values.append(opts[0] if opts else None)
        inputs = [
            {"name": name, "type": ("COMBO" if isinstance(t, list) else t), "link": None}
            for name, t, o, _ in input_specs(info)
            if not is_widget(t, o)
        ]
        outputs = [
            {"name": (info.get("output_name") or info["output"])[j], "type": t, "links": [], "slot_index": j}
            for j, t in enumerate(info.get("output", []))
        ]
        nid = self._new_id()
        if row is None:
            row = sum(1 for n in self.nodes if n.get("_col") == col and n.get("_band", 0) == band)
        n = {
            "id": nid,
            "type": type_,
            "pos": [40 + col * self.COL_W, 40],
            "size": [320, max(60 + 26 * (len(inputs) + len(values)), self.MIN_HEIGHT.get(type_, 0))],
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": type_},
            "widgets_values": values,
            "_col": col,
            "_row": row,
            "_band": band,
        }
        if title:
            n["title"] = title
        self.nodes.append(n)
        return n

    def note(self, text: str, col: int = 0, width: int = 400, height: int = 230) -> dict:
        nid = self._new_id()
        n = {
            "id": nid, "type": "Note", "pos": [40 + col * self.COL_W, 40], "size": [width, height], "flags": {},
            "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
            "widgets_values": [text], "color": "#432", "bgcolor": "#653", "_col": col, "_row": -1,
        }
        self.nodes.append(n)
        return n

    def link(self, src: dict, out_slot: int, dst: dict, input_name: str) -> int:
        info = self.defs[dst["type"]]
        specs = {name: (t, o) for name, t, o, _ in input_specs(info)}
        if input_name not in specs:
            raise WorkflowError(f"{dst['type']} has no input {input_name!r}")
        slot_idx = next((i for i, s in enumerate(dst["inputs"]) if s["name"] == input_name), None)
        t, o = specs[input_name]
        if slot_idx is None:  # a widget turned into an input
            dst["inputs"].append({"name": input_name, "type": "COMBO" if isinstance(t, list) else t,
                                  "widget": {"name": input_name}, "link": None})
            slot_idx = len(dst["inputs"]) - 1
        out_type = src["outputs"][out_slot]["type"]
        if not _types_match(out_type, t):
            raise WorkflowError(f"{src['type']} output {out_slot} ({out_type}) cannot feed {dst['type']}.{input_name} ({t})")
        lid = len(self.links) + 1
        self.links.append([lid, src["id"], out_slot, dst["id"], slot_idx, out_type])
        src["outputs"][out_slot]["links"].append(lid)
        dst["inputs"][slot_idx]["link"] = lid
        return lid

    def _layout(self) -> None:
        """Columns of nodes, stacked by row; bands (``band=``) are horizontal strips placed one
        below the other, each as tall as its tallest column."""
        top = 40
        for band in sorted({n.get("_band", 0) for n in self.nodes}):
            cols: dict = {}
            for n in self.nodes:
                if n.get("_band", 0) == band:
                    cols.setdefault(n["_col"], []).append(n)
            bottom = top
            for col, ns in cols.items():
                y = top
                for n in sorted(ns, key=lambda n: (n["_row"], n["id"])):
                    n["pos"] = [40 + col * self.COL_W, y]
                    y += n["size"][1] + 50
                bottom = max(bottom, y)
            top = bottom + 40

    def build(self) -> dict:
        self._layout()
        nodes = []
        for n in self.nodes:
            n = {k: v for k, v in n.items() if not k.startswith("_")}
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
            nodes.append(n)
        return {
            "last_node_id": self._next_id - 1,
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]},
                      # the core node definitions the widgets were laid out from
                      "svdiff": {"generated_with_comfyui": comfy_env.comfy_version()}},
            "version": 0.4,
        }
