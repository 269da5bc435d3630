"""The registry: built-ins, entry points, V1 admission rules, clear errors."""
import pytest

from tokenmill import (PluginLoadError, RefusedComponentError, Registry, UnknownComponentError)
from tokenmill.registry import PluginLoadWarning

DRAFTER_PLUGIN = """
    from tokenmill import Drafter, hookimpl

    class RepeatLastDrafter(Drafter):
        name = "repeat-last"
        def propose(self, token_ids, max_num_tokens):
            return [[int(t[-1])] * n if len(t) else [] for t, n in zip(token_ids, max_num_tokens)]

    @hookimpl
    def tokenmill_register_drafters(register):
        register(RepeatLastDrafter)
"""

V0_MODEL_PLUGIN = """
    from tokenmill import Model, SupportsV0Only, hookimpl

    class OldMamba(Model, SupportsV0Only):
        architectures = ("AcmeMambaForCausalLM",)
        v0_only_reason = "its recurrent state cache only exists in V0"

    @hookimpl
    def tokenmill_register_models(register):
        register(OldMamba)
"""


def third_party(registry):
    return [r for r in registry.records() if not r.provider.is_builtin]


def test_builtins_are_registered_like_plugins():
    registry = Registry(entry_points=False)
    record = next(r for r in registry.records("attention_backend") if r.name == "torch")
    assert record.status == "available"
    assert str(record.provider) == "builtin"
    assert record.provider.plugin == "tokenmill.plugins.attention"


def test_entry_point_drafter_is_registered_with_its_distribution(plugin_site):
    plugin_site("acme-drafters", DRAFTER_PLUGIN, version="1.2.0")
    registry = Registry()
    [record] = third_party(registry)
    assert (record.kind, record.name, record.status) == ("drafter", "repeat-last", "available")
    assert str(record.provider) == "acme-drafters 1.2.0"
    assert registry.get("drafter", "repeat-last").__name__ == "RepeatLastDrafter"


def test_v0_only_component_is_refused_with_reason_naming_its_distribution(plugin_site):
    plugin_site("acme-mamba", V0_MODEL_PLUGIN, version="0.3.0")
    registry = Registry()
    [record] = third_party(registry)
    assert record.status == "refused"
    assert "recurrent state cache" in record.reason
    assert "AcmeMambaForCausalLM" not in registry.available("model")
    with pytest.raises(RefusedComponentError, match=r"acme-mamba.*0\.3\.0.*refused: this engine does not run it "
                                                  r"\(it declares SupportsV0Only\): its recurrent state"):
        registry.get("model", "AcmeMambaForCausalLM")


def test_plugin_failing_to_import_is_an_error_naming_distribution_and_entry_point(plugin_site):
    plugin_site("acme-broken", "import does_not_exist_anywhere\n", entry_name="broken")
    with pytest.raises(PluginLoadError, match=r"'acme-broken'.*entry point 'broken = acme_broken'.*"
                                              r"failed to import.*does_not_exist_anywhere"):
        Registry()


def test_plugin_error_downgraded_to_warning_is_recorded_and_others_still_load(plugin_site):
    plugin_site("acme-broken", "raise RuntimeError('boom')\n")
    plugin_site("acme-drafters", DRAFTER_PLUGIN)
    with pytest.warns(PluginLoadWarning, match="acme-broken.*boom"):
        registry = Registry(on_plugin_error="warn")
    assert [r.name for r in third_party(registry)] == ["repeat-last"]
    assert len(registry.plugin_errors) == 1 and "acme-broken" in registry.plugin_errors[0]
    assert "acme-broken" in registry.feature_matrix()["plugin_errors"][0]


def test_plugin_raising_during_registration_is_an_error_naming_the_hook(plugin_site):
    plugin_site("acme-raises", """
        from tokenmill import hookimpl

        @hookimpl
        def tokenmill_register_models(register):
            raise ValueError("config missing")
    """)
    with pytest.raises(PluginLoadError, match=r"acme-raises.*raised in tokenmill_register_models.*config missing"):
        Registry()


def test_a_failed_plugin_registers_nothing(plugin_site):
    plugin_site("acme-half", DRAFTER_PLUGIN + """
    @hookimpl
    def tokenmill_register_models(register):
        register(object)
    """)
    with pytest.warns(PluginLoadWarning, match="subclass of tokenmill.Model"):
        registry = Registry(on_plugin_error="warn")
    assert third_party(registry) == []


def test_duplicate_name_is_an_error_naming_both_providers(plugin_site):
    plugin_site("acme-attn", """
        from tokenmill import hookimpl
        from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend

        class Mine(TorchAttentionBackend):
            pass

        @hookimpl
        def tokenmill_register_attention_backends(register):
            register(Mine)
    """, version="2.0")
    with pytest.raises(PluginLoadError, match=r"attention_backend name 'torch' is registered twice: by "
                                              r"built-in plugin 'tokenmill.plugins.attention'.*and by plugin "
                                              r"distribution 'acme-attn' 2.0"):
        Registry()


@pytest.mark.parametrize("body, message", [
    ("class D(Drafter):\n        name = ''\n        def propose(self, t, m): return []",
     "name must be a non-empty string"),
    ("class D(Drafter):\n        name = 'incomplete'", "does not implement propose"),
    ("D = 'not a class'", "takes a subclass of tokenmill.Drafter"),
])
def test_component_contract_is_checked_at_registration(plugin_site, body, message):
    plugin_site("acme-bad", f"""
    from tokenmill import Drafter, hookimpl

    {body}

    @hookimpl
    def tokenmill_register_drafters(register):
        register(D)
    """)
    with pytest.raises(PluginLoadError, match=message):
        Registry()


def test_hook_with_a_misspelled_name_is_rejected(plugin_site):
    plugin_site("acme-typo", """
        from tokenmill import hookimpl

        @hookimpl
        def tokenmill_register_drafter(register):
            pass
    """)
    with pytest.raises(PluginLoadError, match=r"acme-typo.*not a valid plugin.*tokenmill_register_drafter"):
        Registry()


def test_allowlist_selects_plugins_by_entry_point_or_distribution(plugin_site, monkeypatch):
    plugin_site("acme-drafters", DRAFTER_PLUGIN)
    plugin_site("acme-mamba", V0_MODEL_PLUGIN)
    monkeypatch.setenv("TOKENMILL_PLUGINS", "acme-mamba")
    registry = Registry()
    assert [r.provider.distribution for r in third_party(registry)] == ["acme-mamba"]
    assert any("acme-drafters" in s for s in registry.skipped_plugins)
    monkeypatch.setenv("TOKENMILL_PLUGINS", "acme_drafters, acme_mamba")
    assert len(third_party(Registry())) == 2
    monkeypatch.setenv("TOKENMILL_PLUGINS", "")
    assert third_party(Registry()) == []
    assert Registry(allowlist=["acme_drafters"]).available("drafter").keys() >= {"repeat-last"}


def test_unknown_component_lists_the_registered_names():
    with pytest.raises(UnknownComponentError, match=r"no attention_backend named 'flash'; registered: .*'torch'"):
        Registry(entry_points=False).get("attention_backend", "flash")
