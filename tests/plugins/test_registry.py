"""Plugin discovery and the aggregator registry, as a plugin author and a user see them."""

from __future__ import annotations

import inspect
import json
import textwrap

import pluggy
import pytest

from fedstream import hookimpl, hookspecs
from fedstream.aggregation import Aggregator
from fedstream.cli import main
from fedstream.registry import AUTOLOAD_ENV, PluginError, build_registry, get_plugin_manager

BUILT_INS = {"fedavg", "fedprox", "dp-noise", "fedasync", "fedbuff"}


class _Constant(Aggregator):
    pass


class InlinePlugin:
    """A tiny plugin defined in the test, registered and unregistered by hand."""

    @hookimpl
    def register_aggregators(self, register):
        register(
            "inline-test", lambda params, ctx: _Constant(), modes=("sync", "async"), description="a test"
        )


def write_plugin(folder, name: str, body: str):
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_plugins_list_json_shows_the_five_built_ins(capsys):
    assert main(["plugins", "list", "--json"]) == 0

    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert set(listed) >= BUILT_INS
    assert listed["fedbuff"]["source"] == "built-in"
    assert listed["fedbuff"]["modes"] == ["async"]
    assert "Nguyen" in listed["fedbuff"]["description"]
    clip = next(p for p in listed["dp-noise"]["parameters"] if p["name"] == "clip_norm")
    assert clip["required"] is True
    styles = next(p for p in listed["fedasync"]["parameters"] if p["name"] == "staleness_function")
    assert styles["default"] == "polynomial"
    assert "hinge" in styles["type"]


def test_plugins_list_prints_a_table(capsys):
    assert main(["plugins", "list"]) == 0

    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["NAME", "MODES", "SOURCE", "DESCRIPTION"]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith(" ")}
    assert rows["fedprox"][1:3] == ["sync", "built-in"]
    assert "mu: float = 0.01" in out


def test_an_inline_plugin_is_discovered_and_can_be_unregistered():
    pm = get_plugin_manager(plugin_dirs=[])
    pm.register(InlinePlugin(), "inline-test-plugin")

    registry = build_registry(pm)
    assert "inline-test" in registry
    assert registry.info("inline-test").source == "plugin 'inline-test-plugin'"
    assert registry.info("inline-test").modes == frozenset({"sync", "async"})
    assert isinstance(registry.create("inline-test"), _Constant)

    pm.unregister(name="inline-test-plugin")
    assert "inline-test" not in build_registry(pm)


def test_a_drop_in_file_is_discovered(tmp_path):
    path = write_plugin(
        tmp_path,
        "median_plugin",
        """
        import pydantic
        from fedstream import hookimpl
        from fedstream.aggregation import Aggregator

        class Params(pydantic.BaseModel):
            model_config = pydantic.ConfigDict(extra="forbid")
            trim: float = 0.1

        @hookimpl
        def register_aggregators(register):
            register("winsorized-mean", lambda params, ctx: Aggregator(), params=Params, description="trims")
        """,
    )

    registry = build_registry(get_plugin_manager(plugin_dirs=[tmp_path]))

    info = registry.info("winsorized-mean")
    assert info.source == f"drop-in file {path}"
    assert info.parameters()[0]["name"] == "trim"
    assert set(registry.names()) >= BUILT_INS


def test_a_duplicate_name_names_both_sources(tmp_path):
    path = write_plugin(
        tmp_path,
        "my_fedavg",
        """
        from fedstream import hookimpl
        from fedstream.aggregation import Aggregator

        @hookimpl
        def register_aggregators(register):
            register("fedavg", lambda params, ctx: Aggregator())
        """,
    )

    with pytest.raises(PluginError) as info:
        build_registry(get_plugin_manager(plugin_dirs=[tmp_path]))
    assert "'fedavg' is registered twice" in str(info.value)
    assert "built-in" in str(info.value)
    assert f"drop-in file {path}" in str(info.value)


def test_unknown_aggregator_lists_the_available_ones():
    registry = build_registry(get_plugin_manager(plugin_dirs=[]))
    with pytest.raises(PluginError) as info:
        registry.create("fedavgg")
    assert "unknown aggregator 'fedavgg'" in str(info.value)
    assert "fedavg, fedavgm, fedbuff" in str(info.value)


def test_unknown_parameter_is_named():
    registry = build_registry(get_plugin_manager(plugin_dirs=[]))
    with pytest.raises(PluginError) as info:
        registry.create("fedprox", {"mu": 0.1, "proximal": 2})
    assert "invalid parameters for aggregator 'fedprox'" in str(info.value)
    assert "proximal" in str(info.value)


def test_a_misspelled_hook_is_caught_by_check_pending(tmp_path):
    write_plugin(
        tmp_path,
        "typo_plugin",
        """
        from fedstream import hookimpl

        @hookimpl
        def register_aggregator(register):  # missing the final "s"
            pass
        """,
    )
    with pytest.raises(pluggy.PluginValidationError, match="register_aggregator"):
        get_plugin_manager(plugin_dirs=[tmp_path])


def test_a_misspelled_hook_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    write_plugin(
        tmp_path,
        "typo_plugin",
        "from fedstream import hookimpl\n@hookimpl\ndef register_aggregator(register): pass\n",
    )
    monkeypatch.setenv("FEDSTREAM_PLUGIN_PATH", str(tmp_path))

    assert main(["plugins", "list"]) == 2

    err = capsys.readouterr().err
    assert "register_aggregator" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_every_hookspec_has_a_docstring():
    specs = [
        function
        for _, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, f"{hookspecs.PROJECT}_spec")
    ]
    assert specs, "no hookspecs found"
    for function in specs:
        assert (function.__doc__ or "").strip(), f"hookspec {function.__name__} has no docstring"


def test_env_var_skips_entry_points(monkeypatch):
    calls = []
    monkeypatch.setattr(
        pluggy.PluginManager, "load_setuptools_entrypoints", lambda self, group: calls.append(group)
    )

    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    get_plugin_manager(plugin_dirs=[])
    assert calls == []

    monkeypatch.delenv(AUTOLOAD_ENV)
    get_plugin_manager(plugin_dirs=[])
    assert calls == ["fedstream"]


def test_an_aggregators_modes_come_from_what_it_implements(monkeypatch):
    from fedstream import hookimpl
    from fedstream.aggregation import Aggregator, AsyncResult, RoundResult
    from fedstream.registry import build_registry, get_plugin_manager

    class SyncOnly(Aggregator):
        def begin(self, global_weights, context): ...
        def accept(self, update): ...
        def finish(self):
            return RoundResult({}, {})

    class Both(SyncOnly):
        def apply_async(self, global_weights, update, *, staleness, state=None):
            return AsyncResult(None)

    def make_both(params, ctx) -> Both:
        return Both()

    class Plugin:
        @hookimpl
        def register_aggregators(self, register):
            register("sync-only", lambda p, ctx: SyncOnly())  # a lambda says nothing: sync, checked at create
            register("both", make_both)  # annotated: derived
            register("klass", Both)
            register("lying", lambda p, ctx: SyncOnly(), modes=("async",))

    monkeypatch.setenv("FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager(plugin_dirs=[])
    pm.register(Plugin(), "test")
    registry = build_registry(pm)
    assert SyncOnly.modes == {"sync"} and Both.modes == {"sync", "async"}
    assert registry.info("both").modes == {"sync", "async"} and registry.info("klass").modes == {
        "sync",
        "async",
    }
    assert registry.info("sync-only").modes == {"sync"}
    # a registration that claims a mode its class does not implement is refused when it is built
    with pytest.raises(
        PluginError, match="registered for async mode, but SyncOnly does not implement apply_async"
    ):
        registry.create("lying", mode="async")


def test_a_registration_contradicting_its_class_is_refused(monkeypatch):
    from fedstream.plugins.fedavg import FedAvg

    from fedstream import hookimpl
    from fedstream.registry import build_registry, get_plugin_manager

    class Plugin:
        @hookimpl
        def register_aggregators(self, register):
            register("wrong", FedAvg, modes=("async",))

    monkeypatch.setenv("FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager(plugin_dirs=[])
    pm.register(Plugin(), "test")
    with pytest.raises(PluginError, match="registered for async mode but implements sync"):
        build_registry(pm)
