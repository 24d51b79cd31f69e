"""``fedstream model init`` and ``fedstream model train``: model files made by hand.

``init`` writes version 0 of a trainer's model (what a run starts from); ``train`` runs one client's
local training from a global model, as a silo's client would, and writes the update with the number
of examples it trained on. With ``fedstream aggregate`` they make a round on the command line, and
``init`` makes the initial model a deployment's run starts from.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from fedstream.cli import CliError

TRAINERS = "keras | numpy | module:function"


def add_commands(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser(
        "init",
        help="write version 0 of a trainer's model (the initial global model)",
        description="Build the trainer's model for --dataset, seeded, and write its weights as safetensors.",
    )
    _trainer_arguments(init)
    init.add_argument(
        "--out", type=Path, required=True, help="the .safetensors file to write (must not exist)"
    )
    init.set_defaults(func=init_command)

    train = commands.add_parser(
        "train",
        help="one client's local training from a global model, written as an update",
        description="Train on client --client of --clients (its shard of --dataset under --partition) "
        "from the global model, as the client would in a round, and write the resulting weights. It "
        "prints PATH:N, the update as `fedstream aggregate` takes it (N: the examples trained on).",
    )
    train.add_argument("model", type=Path, help="the global model, a .safetensors file")
    _trainer_arguments(train)
    train.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:S (default iid)")
    train.add_argument(
        "--clients", type=int, default=1, help="how many clients share the dataset (default 1)"
    )
    train.add_argument("--client", type=int, default=1, help="which of them trains, from 1 (default 1)")
    train.add_argument("--epochs", type=int, default=1, help="local epochs (default 1)")
    train.add_argument(
        "--out", type=Path, required=True, help="the .safetensors file to write (must not exist)"
    )
    train.set_defaults(func=train_command)


def _trainer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="mnist-5k | digits | fashion-mnist")
    parser.add_argument("--trainer", default="keras", help=f"{TRAINERS} (default keras)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the model and the data split (default 0)"
    )


def _check(args: argparse.Namespace) -> None:
    from fedstream.client.data import DATASETS
    from fedstream.client.trainers import check_trainer_spec

    if args.dataset not in DATASETS:
        raise CliError(f"--dataset: unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.trainer == "instant" or args.trainer.startswith("instant:"):
        raise CliError("--trainer: the instant trainer learns nothing; choose one of " + TRAINERS)
    try:
        check_trainer_spec(args.trainer)
    except ValueError as exc:
        raise CliError(f"--trainer: {exc}") from None
    if args.out.exists():
        raise CliError(f"--out {args.out}: exists; name a new file")


def _build(args: argparse.Namespace, clients: int = 1, client: int = 1, partition: str = "iid") -> Any:
    from fedstream.client.trainers import build_trainer

    return build_trainer(
        args.trainer,
        args.dataset,
        partition,
        clients,
        client - 1,
        seed=args.seed,
        epochs=getattr(args, "epochs", 1),
    )


def build_initial(trainer: str, dataset: str, seed: int = 0) -> bytes:
    """Version 0 of ``trainer``'s model for ``dataset``, seeded, as safetensors bytes."""
    from fedstream.client.data import DATASETS
    from fedstream.client.trainers import build_trainer, check_trainer_spec

    if dataset not in DATASETS:
        raise CliError(f"--dataset: unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    try:
        check_trainer_spec(trainer)
    except ValueError as exc:
        raise CliError(f"--trainer: {exc}") from None
    return encode_initial(
        build_trainer(trainer, dataset, "iid", 1, 0, seed=seed).initial_weights(), trainer, dataset
    )


def encode_initial(weights: Any, trainer: str, dataset: str) -> bytes:
    from fedstream.weights import encode

    return encode(
        weights, {"version": "0", "creator": "fedstream model init", "trainer": trainer, "dataset": dataset}
    )


def init_command(args: argparse.Namespace) -> int:
    _check(args)
    weights = _build(args).initial_weights()
    data = encode_initial(weights, args.trainer, args.dataset)
    args.out.write_bytes(data)
    parameters = sum(int(array.size) for array in weights.values())
    digest = hashlib.sha256(data).hexdigest()
    print(f"{args.out}: {len(weights)} tensors, {parameters} parameters, sha256 {digest}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from fedstream.client.data import parse_scheme

    from fedstream.weights import WireFormatError, decode, encode

    _check(args)
    if args.clients < 1 or not 1 <= args.client <= args.clients:
        raise CliError(f"--client must be between 1 and --clients ({args.clients}), got {args.client}")
    if args.epochs < 1:
        raise CliError(f"--epochs must be at least 1, got {args.epochs}")
    try:
        parse_scheme(args.partition)
    except ValueError as exc:
        raise CliError(f"--partition: {exc}") from None
    try:
        data = args.model.read_bytes()
        weights, metadata = decode(data)
    except OSError as exc:
        raise CliError(f"cannot read {args.model}: {exc.strerror or exc}") from None
    except WireFormatError as exc:
        raise CliError(f"{args.model} is not a fedstream model: {exc}") from None
    trainer = _build(args, args.clients, args.client, args.partition)
    expected = trainer.initial_weights()
    wrong = sorted(
        name
        for name in set(expected) | set(weights)
        if name not in expected or name not in weights or expected[name].shape != weights[name].shape
    )
    if wrong:
        raise CliError(f"{args.model} does not fit the {args.trainer} model of {args.dataset!r}: {wrong[:5]}")
    result = trainer.fit(weights, {})
    args.out.write_bytes(
        encode(
            result.weights,
            {
                "creator": "fedstream model train",
                "base_sha256": hashlib.sha256(data).hexdigest(),
                "base_version": metadata.get("version", ""),
                "client": f"{args.client} of {args.clients}",
                "num_examples": str(result.num_examples),
            },
        )
    )
    loss = result.metrics.get("train_loss")
    print(f"{args.out}:{result.num_examples}" + ("" if loss is None else f"  (train loss {loss:.4f})"))
    return 0
