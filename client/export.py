"""``fedstream model export``: a global model (safetensors) as a serving stack loads it.

The weights are set on the built-in Keras model of the dataset the run trained (the trainer the
clients ran, by its variable names; names, shapes and dtypes are checked), and written as:

- ``model.keras``: Keras's own format (``keras.models.load_model``);
- ``serving/<name>/1/``: a TensorFlow SavedModel with a ``serve`` signature, laid out as TensorFlow
  Serving and SageMaker's TensorFlow Serving container expect (``tar -czf model.tar.gz -C serving/<name> .``
  for SageMaker);
- ``model.safetensors``: the original bytes, and ``lineage.json``: its sha256, its metadata (run,
  version, parent version, aggregator, the clients whose updates made it) and the export's.

The model outputs logits (what the clients trained); the predicted class is their argmax.
TensorFlow is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedstream.cli import CliError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="work with a trained global model")
    commands = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    export = commands.add_parser(
        "export",
        help="a global model as Keras (.keras) and a TensorFlow SavedModel for serving",
        description="Write a global model (a run's final_model.safetensors, or any version's object "
        "copied from S3) as model.keras, a SavedModel under serving/NAME/1/ and the original with its "
        "lineage, for the built-in Keras model of --dataset.",
    )
    export.add_argument("model", type=Path, nargs="?", help="the global model, a .safetensors file")
    export.add_argument(
        "--run", help="instead of a file: this run's final model (or --version) from a deployment"
    )
    export.add_argument("--version", type=int, help="with --run: this version instead of the final one")
    where = export.add_mutually_exclusive_group()
    where.add_argument("--outputs", type=Path, help="with --run: the stack's outputs file")
    where.add_argument("--stack", help="with --run: the stack's name (its outputs from CloudFormation)")
    export.add_argument("--region", help="with --stack: the stack's region")
    export.add_argument("--dataset", required=True, help="the dataset the run trained: its built-in model")
    export.add_argument("--out", type=Path, required=True, help="an empty or new directory")
    export.add_argument("--name", default="fedstream", help="the serving model name (default fedstream)")
    export.set_defaults(func=export_command)
    from fedstream.client.model_files import add_commands as add_file_commands

    add_file_commands(commands)


def export_command(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.run is None):
        raise CliError("give the model: a .safetensors file, or --run RUN_ID with --outputs or --stack")
    if args.run is None:
        report = export_model(args.model, args.dataset, args.out, name=args.name)
    else:
        import tempfile

        from fedstream.runs import fetch_model

        data, source = fetch_model(args, args.run, args.version)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.safetensors"
            path.write_bytes(data)
            report = export_model(path, args.dataset, args.out, name=args.name, source=source)
    print(json.dumps(report, indent=2))
    return 0


def export_model(
    path: Path, dataset: str, out: Path, *, name: str = "fedstream", source: str | None = None
) -> dict[str, Any]:
    from fedstream.client.data import DATASETS

    from fedstream.weights import WireFormatError, decode

    if dataset not in DATASETS:
        raise CliError(f"unknown dataset {dataset!r}; one of {', '.join(sorted(DATASETS))}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"--out {out} exists and is not an empty directory")
    try:
        data = path.read_bytes()
        weights, metadata = decode(data)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except WireFormatError as exc:
        raise CliError(f"{path} is not a fedstream model: {exc}") from None

    from fedstream.client.trainers import build_trainer

    trainer = build_trainer("keras", dataset, "iid", num_clients=1, client_index=0)
    try:
        trainer.set_weights(weights)  # type: ignore[attr-defined]
    except ValueError as exc:
        raise CliError(f"{path} does not fit the built-in model of {dataset!r}: {exc}") from None
    model = trainer.model  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    serving = out / "serving" / name / "1"
    model.export(str(serving), format="tf_saved_model", verbose=False)
    shutil.copyfile(path, out / "model.safetensors")
    lineage = {
        "source": source or str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "metadata": metadata,
        "dataset": dataset,
        "exported_at": datetime.now(UTC).isoformat(),
        "outputs": "logits; the class is their argmax",
        "files": {
            "keras": "model.keras",
            "saved_model": f"serving/{name}/1",
            "original": "model.safetensors",
        },
    }
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    return {"out": str(out), **lineage}
