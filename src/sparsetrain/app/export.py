"""``sparsetrain export RUN_DIR --format sparse|pt2|onnx``: a finished run's model in a form to ship.

- ``sparse``: the sparse checkpoint (:func:`~sparsetrain.app.artifact.save_sparse`: kept values and a bitmask).
- ``pt2``: a ``torch.export`` program of the inference form (:func:`~sparsetrain.app.inference.for_inference`),
  whose sparse layers are the project's operators (``sparsetrain::condensed_linear``, ``sparsetrain::direct_conv2d``);
  ``torch.export.load`` reads it back wherever ``sparsetrain`` is imported (importing it registers the operators).

- ``onnx``: for models whose savings are structural: BatchNorm folded and pruned channels taken out
  (:func:`~sparsetrain.app.inference.slim_channels`), so the layers are physically smaller and any ONNX runtime
  gains. ONNX has no operator that keeps unstructured sparsity: a model with unstructured sparse layers left is
  refused, naming them and the formats that keep them sparse. Needs ``pip install "sparsetrain[onnx]"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..execution import native
from .checkpoint import CheckpointError, write_atomic

__all__ = ["FORMATS", "export_run", "trained_model", "example_batch"]

FORMATS = {"sparse": "model.sparse.safetensors", "pt2": "model.pt2", "onnx": "model.onnx"}


def trained_model(run: Path) -> tuple[object, nn.Module]:
    """The configuration and the final model of the finished run in ``run`` (its ``model.pt``)."""
    from ..data.images import DATASETS
    from ..data.text import CharVocab
    from ..models import build_configured
    from .checkpoint import load_checkpoint
    from .config import load_config

    if not (run / "config.yaml").exists():
        raise CheckpointError(f"{run} is not a run directory (no config.yaml)")
    if not (run / "model.pt").exists():
        raise CheckpointError(f"{run} has no model.pt yet: the run is unfinished; finish it first")
    cfg = load_config(run / "config.yaml")
    classes = len(CharVocab.load(run / "vocab.json")) if (run / "vocab.json").exists() else None
    model = build_configured(cfg.model, classes or DATASETS[cfg.data.dataset].num_classes, cfg.data.context)
    model.load_state_dict(load_checkpoint(run / "model.pt")["model"])
    return cfg, model.eval()


def example_batch(cfg, batch: int) -> torch.Tensor:
    """A batch of the run's inputs' shape (tokens for a text run, images otherwise), for timing and tracing."""
    from ..data.images import DATASETS, TEXT_DATASETS

    if cfg.data.dataset in TEXT_DATASETS:
        return torch.zeros(batch, cfg.data.context, dtype=torch.long)
    return torch.randn(batch, *DATASETS[cfg.data.dataset].image_shape)


def exported_program(served, inputs: tuple):
    """``torch.export`` of an inference form's module; a layer whose path ``torch.export`` cannot take (CSR) is
    put on its dense product, with a warning naming it."""
    moved = []
    while True:
        try:
            program = torch.export.export(served.model, inputs, strict=False)
            break
        except native.NoDataError as e:  # the layer that refused names itself
            name = e.layer
            if name not in served.layers or name in moved:
                raise
            served.layers[name].fix_backend("masked")
            moved.append(name)
    if moved:
        warnings.warn(
            f"torch.export cannot take these layers' kernels; they run their dense product: {moved}",
            RuntimeWarning,
            stacklevel=2,
        )
    return program


def export_run(run: str | Path, fmt: str, out: str | Path | None = None, batch: int = 1) -> Path:
    """Write the finished run ``run``'s model as ``fmt`` (:data:`FORMATS`) to ``out`` (default: in the run's
    folder); ``batch``: the batch size the ``pt2`` program is timed and traced at. Returns the file written."""
    from .artifact import save_sparse
    from .inference import for_inference

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {sorted(FORMATS)}")
    if batch < 1:
        raise ValueError(f"--batch must be 1 or more, got {batch}")
    run = Path(run)
    target = Path(out) if out else run / FORMATS[fmt]
    cfg, model = trained_model(run)
    if fmt == "sparse":
        return save_sparse(model, target)
    inputs = (example_batch(cfg, batch),)
    if fmt == "onnx":
        data = onnx_bytes(model, inputs)
        write_atomic(target, lambda f: f.write(data))
        return target
    served = for_inference(model, example_inputs=inputs[0])
    program = exported_program(served, inputs)
    write_atomic(target, lambda f: torch.export.save(program, f))
    return target


def onnx_bytes(model: nn.Module, inputs: tuple) -> bytes:
    """The ONNX file of ``model`` with BatchNorm folded and pruned channels taken out, checked by ``onnx.checker``;
    refused (ValueError) while unstructured sparse layers are left, or without the ONNX packages."""
    import io

    from .inference import _sparse_weights, fold_batchnorm, slim_channels

    try:
        import onnx
    except ImportError:
        raise ValueError('--format onnx needs the ONNX packages: pip install "sparsetrain[onnx]"') from None
    slim = slim_channels(fold_batchnorm(model.eval()))
    left = sorted(_sparse_weights(slim))
    if left:
        raise ValueError(
            f"--format onnx: ONNX has no operator that keeps unstructured sparsity, and {len(left)} layer(s) are "
            f"unstructured sparse ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}): such a file would hold "
            "the dense model. Export them as --format sparse (the file) or --format pt2 (the kernels as operators); "
            "ONNX pays where whole channels are pruned"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on operators of packages not installed
        program = torch.onnx.export(slim, inputs, dynamo=True, verbose=False)
    buf = io.BytesIO()
    program.save(buf)
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()))
    return buf.getvalue()
