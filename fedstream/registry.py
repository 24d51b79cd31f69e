"""Plugin discovery and the aggregator registry.

``get_plugin_manager()`` loads, in order: entry points of group ``fedstream`` (skipped when
``FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD`` is set), the built-in aggregator modules
(``fedstream.plugins.*``), and every module dropped into the drop-in folder ``plugins/dropin/``
(plus folders named in ``FEDSTREAM_PLUGIN_PATH``). All of them
are registered with the same ``pm.register(module, name)`` call.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pluggy
import pydantic

from fedstream import hookspecs
from fedstream.aggregation import Aggregator

BUILTIN_MODULES = (
    "fedstream.plugins.fedavg",
    "fedstream.plugins.fedprox",
    "fedstream.plugins.dp_noise",
    "fedstream.plugins.fedasync",
    "fedstream.plugins.fedbuff",
    "fedstream.plugins.median",
    "fedstream.plugins.trimmed_mean",
    "fedstream.plugins.krum",
    "fedstream.plugins.server_optimizers",
)
DROPIN_FOLDER = "dropin"
AUTOLOAD_ENV = "FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD"
PLUGIN_PATH_ENV = "FEDSTREAM_PLUGIN_PATH"
MODES = frozenset({"sync", "async"})


INNER, INNER_PARAMS = "inner", "inner_params"


def nest_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"inner": "fedprox", "inner.mu": 0.05}`` -> ``{"inner": "fedprox", "inner_params": {"mu": 0.05}}``.

    Only the first dot nests: ``inner.inner.mu`` becomes ``inner_params["inner.mu"]``, which the
    inner wrapper nests in turn."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        head, dot, rest = key.partition(".")
        if not dot:
            out[key] = value
            continue
        if head != INNER or not rest:
            raise PluginError(f"parameter {key!r}: only a wrapper's inner parameters are dotted (inner.NAME)")
        nested = out.setdefault(INNER_PARAMS, {})
        if not isinstance(nested, dict):
            raise PluginError(f"give the inner parameters as {INNER_PARAMS} or as inner.NAME, not both")
        nested[rest] = value
    if INNER_PARAMS in params and any("." in k for k in params):
        raise PluginError(f"give the inner parameters as {INNER_PARAMS} or as inner.NAME, not both")
    return out


class PluginError(ValueError):
    """A plugin or aggregator choice is wrong; the message says where each piece came from."""


class NoParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


@dataclass(frozen=True)
class FactoryContext:
    """What an aggregator factory receives besides its parameters."""

    rng: np.random.Generator
    registry: AggregatorRegistry
    # How many clients the deployment has (None: not known, e.g. the offline CLI); defaults that
    # should scale with the federation read it (FedBuff's K).
    num_clients: int | None = None
    # The mode the aggregator is built for ("sync", "async"; None: not said, e.g. listing plugins).
    mode: str | None = None

    def create(self, name: str, params: Mapping[str, Any] | None = None) -> Aggregator:
        """Build another registered aggregator (for wrappers such as dp-noise) for the same mode,
        sharing the rng."""
        return self.registry.create(name, params, rng=self.rng, mode=self.mode, num_clients=self.num_clients)


@dataclass(frozen=True)
class AggregatorInfo:
    name: str
    factory: Callable[[Any, FactoryContext], Aggregator]
    params: type[pydantic.BaseModel]
    modes: frozenset[str]
    description: str
    source: str

    def parameters(self) -> list[dict[str, Any]]:
        out = []
        for field_name, field in self.params.model_fields.items():
            kind = field.annotation
            annotation = kind.__name__ if isinstance(kind, type) else str(kind)  # Literal shows choices
            out.append(
                {
                    "name": field_name,
                    "type": annotation.replace("typing.", ""),
                    "default": None if field.is_required() else field.get_default(call_default_factory=True),
                    "required": field.is_required(),
                    "description": field.description or "",
                }
            )
        return out


class AggregatorRegistry:
    def __init__(self, infos: Iterable[AggregatorInfo] = ()) -> None:
        self._infos: dict[str, AggregatorInfo] = {}
        for info in infos:
            self.add(info)

    def add(self, info: AggregatorInfo) -> None:
        existing = self._infos.get(info.name)
        if existing is not None:
            raise PluginError(
                f"aggregator {info.name!r} is registered twice: by {existing.source} and by {info.source}"
            )
        bad_modes = set(info.modes) - MODES
        if not info.modes or bad_modes:
            raise PluginError(
                f"aggregator {info.name!r} from {info.source} has invalid modes {sorted(info.modes)}"
            )
        self._infos[info.name] = info

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        return sorted(self._infos)

    def infos(self) -> list[AggregatorInfo]:
        return [self._infos[n] for n in self.names()]

    def info(self, name: str) -> AggregatorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise PluginError(f"unknown aggregator {name!r}; available: {', '.join(self.names())}") from None

    def validate_params(self, name: str, params: Mapping[str, Any] | None) -> pydantic.BaseModel:
        """Check ``params`` against the aggregator's model. A wrapper's (a model with ``inner`` and
        ``inner_params``) inner parameters come dotted (``inner.mu``) or as ``inner_params`` and are
        checked against the inner aggregator's own model, recursively."""
        info = self.info(name)
        nested = nest_params(params or {})
        fields = info.params.model_fields
        if INNER_PARAMS in nested and not {INNER, INNER_PARAMS} <= set(fields):
            dotted = sorted(k for k in (params or {}) if "." in k) or [INNER_PARAMS]
            raise PluginError(
                f"aggregator {name!r} wraps no inner aggregator: {', '.join(dotted)} are not its parameters"
            )
        try:
            validated = info.params.model_validate(nested)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
            )
            raise PluginError(f"invalid parameters for aggregator {name!r}: {problems}") from None
        if {INNER, INNER_PARAMS} <= set(fields) and getattr(validated, INNER) is not None:
            inner = getattr(validated, INNER)
            if inner == name:
                raise PluginError(f"{name} cannot wrap itself")
            self.validate_params(inner, getattr(validated, INNER_PARAMS))
        return validated

    def create(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
        mode: str | None = None,
        num_clients: int | None = None,
    ) -> Aggregator:
        info = self.info(name)
        if mode is not None and mode not in info.modes:
            raise PluginError(
                f"aggregator {name!r} runs in {'/'.join(sorted(info.modes))} mode, not {mode!r}"
            )
        validated = self.validate_params(name, params)
        context = FactoryContext(
            rng=rng if rng is not None else np.random.default_rng(seed),
            registry=self,
            num_clients=num_clients,
            mode=mode,
        )
        aggregator = info.factory(validated, context)
        if mode is not None and mode not in type(aggregator).modes:
            method = "finish" if mode == "sync" else "apply_async"
            raise PluginError(
                f"aggregator {name!r} ({info.source}) is registered for {mode} mode, but "
                f"{type(aggregator).__name__} does not implement {method}"
            )
        return aggregator


def dropin_dir() -> Path:
    """The drop-in folder: ``plugins/dropin/`` beside the built-ins (``fedstream/plugins/dropin/``
    once installed). It ships in the Lambda asset; a wheel carries none of its files."""
    import fedstream.plugins

    return Path(fedstream.plugins.__file__).resolve().parent / DROPIN_FOLDER


def _plugin_dirs() -> list[Path]:
    dirs = [dropin_dir()]
    extra = os.environ.get(PLUGIN_PATH_ENV, "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def _import_dropin(path: Path) -> ModuleType:
    module_name = f"fedstream_dropin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"plugin file {path} failed to import: {exc}") from exc
    return module


def get_plugin_manager(plugin_dirs: Iterable[Path] | None = None) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if not os.environ.get(AUTOLOAD_ENV):
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    builtin_files = set()
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        builtin_files.add(Path(module.__file__).resolve())
        pm.register(module, f"built-in:{module_name.rsplit('.', 1)[1]}")
    for folder in plugin_dirs if plugin_dirs is not None else _plugin_dirs():
        for path in sorted(Path(folder).glob("*.py")):
            if path.name.startswith("_") or path.resolve() in builtin_files:
                continue
            pm.register(_import_dropin(path), f"file:{path}")
    pm.check_pending()
    return pm


def _describe_source(pm: pluggy.PluginManager, plugin_name: str) -> str:
    if plugin_name.startswith("built-in:"):
        return "built-in"
    if plugin_name.startswith("file:"):
        return f"drop-in file {plugin_name[5:]}"
    for name, dist in pm.list_plugin_distinfo():
        if pm.get_name(name) == plugin_name:
            return f"entry point {plugin_name!r} of package {dist.project_name}"
    return f"plugin {plugin_name!r}"


def derived_modes(factory: Callable[..., Any]) -> frozenset[str] | None:
    """The modes a factory's aggregator implements, when the factory says which class it builds (it
    is an ``Aggregator`` subclass, or its return type is one); None when it does not say."""
    built: Any = factory
    if not isinstance(factory, type):
        try:  # names the factory closes over resolve too (a class defined in a function)
            local = inspect.getclosurevars(factory).nonlocals if inspect.isfunction(factory) else {}
            built = typing.get_type_hints(factory, localns=local).get("return")
        except Exception:  # an annotation that does not resolve says nothing
            return None
    if isinstance(built, type) and issubclass(built, Aggregator):
        return built.modes
    return None


def build_registry(pm: pluggy.PluginManager | None = None) -> AggregatorRegistry:
    """Ask every plugin to register its aggregators; each registration remembers its source."""
    pm = pm or get_plugin_manager()
    registry = AggregatorRegistry()
    for impl in pm.hook.register_aggregators.get_hookimpls():
        source = _describe_source(pm, impl.plugin_name)

        def register(
            name: str,
            factory: Callable[[Any, FactoryContext], Aggregator],
            *,
            params: type[pydantic.BaseModel] = NoParams,
            modes: Iterable[str] | None = None,
            description: str = "",
            _source: str = source,
        ) -> None:
            derived = derived_modes(factory)
            if modes is None:
                modes = derived or ("sync",)
            elif derived is not None and frozenset(modes) != derived:
                raise PluginError(
                    f"aggregator {name!r} from {_source} is registered for {'/'.join(sorted(modes))} "
                    f"mode but implements {'/'.join(sorted(derived)) or 'neither'}"
                )
            registry.add(
                AggregatorInfo(name, factory, params, frozenset(modes), description.strip(), _source)
            )

        impl.function(register=register)
    return registry


_default_registry: AggregatorRegistry | None = None


def default_registry() -> AggregatorRegistry:
    """The process-wide registry (built once; Lambda handlers reuse it across invocations)."""
    global _default_registry
    if _default_registry is None:
        _default_registry = build_registry()
    return _default_registry
