"""User trainers: :func:`load_user_trainer` loads a ``"module:function"`` or ``"path/to/file.py:function"``
spec and turns what the function returns into a :class:`Trainer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedstream.client.data import ClientData
from fedstream.client.trainers.base import Trainer, TrainerSpecError
from fedstream.client.trainers.keras_trainer import KerasTrainer

USER_FUNCTION_PARAMETERS = (
    "dataset",
    "partition",
    "num_clients",
    "client_index",
    "seed",
    "epochs",
    "batch_size",
)


def load_user_trainer(
    spec: str,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    learning_rate: float = 0.05,
    **context: Any,
) -> Trainer:
    """Load a trainer from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The function is called with those of these keyword arguments that it declares by name (all of
    them if it takes ``**kwargs``): ``dataset``, ``partition``, ``num_clients``, ``client_index``,
    ``seed``, ``epochs``, ``batch_size`` — the values the client was started with. It returns either

    - ``(keras_model, ClientData)``: the model must output logits for integer labels
      ``0..num_classes-1``; fedstream trains it with a :class:`KerasTrainer` (SGD, sparse categorical
      cross-entropy, FedProx and clipping included). Name the layers: weight names come from them.
    - or any object with the :class:`Trainer` methods, used as it is.

    Example, ``my_silo.py``::

        import keras
        import numpy as np
        from fedstream.client.data import ClientData

        def make(seed, **_):
            rows = np.load("/data/silo/features.npy")           # float32 (n, 20), never leaves
            labels = np.load("/data/silo/labels.npy")           # int64 (n,) in 0..2
            cut = int(0.8 * len(rows))
            data = ClientData(rows[:cut], labels[:cut], rows[cut:], labels[cut:], num_classes=3)
            model = keras.Sequential([
                keras.Input((20,)),
                keras.layers.Dense(16, activation="relu", name="hidden"),
                keras.layers.Dense(3, name="logits"),
            ])
            return model, data

    and the client runs with ``--trainer my_silo:make`` (the module importable, e.g. from the
    working directory on ``PYTHONPATH``) or ``--trainer ./my_silo.py:make``.
    """
    function = _resolve(spec)
    available = {
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        **{k: v for k, v in context.items() if k in USER_FUNCTION_PARAMETERS},
    }
    result = function(**_accepted_arguments(function, available))
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], ClientData):
        model, data = result
        return KerasTrainer(
            model, data, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed
        )
    if isinstance(result, Trainer):
        return result
    raise TrainerSpecError(
        f"{spec} returned {type(result).__name__}; expected (keras_model, ClientData) or an object with "
        "initial_weights(), fit(weights, settings) and evaluate(weights)"
    )


def _resolve(spec: str) -> Callable[..., Any]:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise TrainerSpecError(
            f"trainer spec {spec!r} is not 'module:function' or 'path/to/file.py:function'"
        )
    try:
        module = _import(module_name)
    except (ImportError, OSError) as exc:
        raise TrainerSpecError(f"trainer spec {spec!r}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise TrainerSpecError(f"trainer spec {spec!r}: module {module_name!r} has no {function_name!r}")
    if not callable(function):
        raise TrainerSpecError(f"trainer spec {spec!r}: {function_name!r} is not callable")
    return function


def _import(module_name: str) -> Any:
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name).resolve()
    if not path.is_file():
        raise ImportError(f"no such file {path}")
    name = f"fedstream_user_trainer_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _accepted_arguments(function: Callable[..., Any], available: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return available
    return {p.name: available[p.name] for p in parameters if p.name in available}
