def test_pack_loads_in_real_comfyui(comfy):
    import nodes

    for nid in ("SVDiffLoadShift", "SVDiffApplyShift", "SVDiffSaveShift"):
        assert nid in nodes.NODE_CLASS_MAPPINGS, nid
    assert not comfy["import_failed"]
