"""Every node of the pack: in the SVDiff category, every input with a tooltip, V3 schema."""



def pack_nodes(comfy):
    import nodes

    name = comfy["pack_name"]
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "__module__", "").startswith(name)}


def test_pack_registers_its_nodes_in_the_svdiff_category(comfy):
    found = pack_nodes(comfy)
    assert {"SVDiffLoadShift", "SVDiffApplyShift", "SVDiffSaveShift"} <= set(found)
    for nid, cls in found.items():
        assert nid.startswith("SVDiff"), nid
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("SVDiff"), (nid, schema.category)
        assert schema.display_name, nid


def test_every_input_has_a_tooltip(comfy):
    for nid, cls in pack_nodes(comfy).items():
        info = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{nid}.{name} has no tooltip"
