"""The pack's environment settings: one parser for every SVDIFF_* variable."""

from svdiff_testkit.comfy_env import pack_module


def test_settings_parse_each_variable_once_with_one_boolean_parser(comfy, monkeypatch):
    settings = pack_module("nodes.settings")
    d = settings.PackSettings.from_env({})
    assert d == settings.PackSettings()
    env = {"SVDIFF_SVD_MEMORY_MB": "512", "SVDIFF_DISK_CACHE": "Off", "SVDIFF_DISK_CACHE_GB": "1.5",
           "SVDIFF_RESIDUAL_CACHE_MB": "64", "SVDIFF_LOWVRAM_MERGE": "no"}
    s = settings.PackSettings.from_env(env)
    assert (s.svd_memory_mb, s.disk_cache, s.disk_cache_gb, s.residual_cache_mb, s.lowvram_merge) == (512.0, False, 1.5, 64.0, False)
    for raw, want in (("1", True), ("TRUE", True), ("yes", True), ("on", True), ("0", False), ("false", False), ("", True)):
        assert settings.parse_bool("X", raw, True) is want
    assert settings.parse_bool("X", "maybe", False) is False  # unreadable: the default
    assert settings.parse_float("X", "lots", 3.0) == 3.0
    monkeypatch.setattr(settings, "_CURRENT", None)
    monkeypatch.setenv("SVDIFF_SVD_MEMORY_MB", "123")
    first = settings.current()
    monkeypatch.setenv("SVDIFF_SVD_MEMORY_MB", "456")
    assert settings.current() is first and first.svd_memory_mb == 123.0  # read once
    assert settings.reload().svd_memory_mb == 456.0
