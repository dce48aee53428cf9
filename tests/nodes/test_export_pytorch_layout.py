"""Export Spectral Shift (svdiff-pytorch) writes files Load Spectral Shift reads back."""

import os

import torch

from svdiff.shift import SpectralShift, delta_length


def test_export_then_read_back_round_trips_matrices_and_projects_1d(comfy, tiny):
    import folder_paths
    import nodes
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    ad = pack_module("nodes.adapter")
    shifts = pack_module("nodes.shifts")
    shapes = {**ad.shiftable_shapes(mp, "diffusion_model."), **ad.shiftable_shapes(clip.patcher)}
    shapes = {k: s for k, s in shapes.items() if "text_projection" not in k}  # not in the HF text model
    g = torch.Generator().manual_seed(3)
    sh = SpectralShift({k: torch.randn(delta_length(s), generator=g) * 0.05 for k, s in shapes.items()}, shapes, {})
    Export = nodes.NODE_CLASS_MAPPINGS["SVDiffExportPytorchLayout"]
    report = Export.execute(shift=sh, model=mp, clip=clip, filename_prefix="tests/pt_layout").args[0]
    out = folder_paths.get_output_directory()
    files = sorted(f for f in os.listdir(os.path.join(out, "tests")) if f.startswith("pt_layout"))
    unet_file = next(f for f in files if not f.startswith("pt_layout_te"))
    te_file = next(f for f in files if f.startswith("pt_layout_te"))
    assert "projected" in report  # per-element 1-D deltas have no exact scalar form there
    back_u = shifts.read_shift_file("test", os.path.join(out, "tests", unet_file), model=mp)
    back_t = shifts.read_shift_file("test", os.path.join(out, "tests", te_file), clip=clip)
    for back in (back_u, back_t):
        for k, d in back.deltas.items():
            if len(shapes[k]) >= 2:
                assert torch.allclose(d, sh.deltas[k], atol=1e-6), k
    n_matrices = sum(1 for s in shapes.values() if len(s) >= 2)
    assert sum(1 for k in {**back_u.deltas, **back_t.deltas} if len(shapes[k]) >= 2) == n_matrices


def test_export_needs_the_clip_for_text_encoder_parts(comfy, tiny):
    import nodes
    import pytest
    from svdiff_testkit.comfy_env import pack_module

    mp, clip = tiny
    ad = pack_module("nodes.adapter")
    shapes = ad.shiftable_shapes(clip.patcher)
    k = next(k for k, s in shapes.items() if len(s) == 2 and "q_proj" in k)
    sh = SpectralShift({k: torch.ones(delta_length(shapes[k]))}, {k: shapes[k]}, {})
    Export = nodes.NODE_CLASS_MAPPINGS["SVDiffExportPytorchLayout"]
    with pytest.raises(Exception, match=r"\[Export Spectral Shift \(svdiff-pytorch\)\] clip"):
        Export.execute(shift=sh, model=mp, filename_prefix="tests/pt_layout_noclip")
