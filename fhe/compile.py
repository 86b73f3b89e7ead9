"""Compile a zoo model into client/server bundles plus a manifest.

Every setting that changes the circuit is an explicit argument and lands in the
manifest; so do the library versions, because a bundle only loads under the same
concrete-python and concrete-ml.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from fhe.bundle import (
    CLIENT_ZIP,
    MANIFEST_JSON,
    REFERENCE_JSON,
    SERVER_ZIP,
    Manifest,
    load_manifest,
    normalize_zip,
    sha256_file,
)
from fhe.zoo import CompileSettings, ZooError, get_model, weights_sha256

__all__ = ["COMPILE_PHASES", "compile_model", "compile_quantized_module", "load_manifest", "write_bundle"]

# The steps compile_model reports to its on_phase callback, in order. "compile" (Concrete's
# calibration, graph and circuit) is nearly all of the time and cannot be measured inside.
COMPILE_PHASES = ("build", "compile", "save")
PhaseCallback = Callable[[str], None]


def _quiet(phase: str) -> None:
    pass


def _check_settings(settings: CompileSettings, quantization: str) -> None:
    if settings.n_bits is not None and not 2 <= settings.n_bits <= 16:
        raise ZooError(f"n_bits must be in [2, 16], got {settings.n_bits}", reason="bad_setting")
    if settings.n_bits is None and quantization == "post_training":
        raise ZooError("n_bits is required for a post-training-quantized model",
                       reason="bad_setting")
    rounding = settings.rounding_threshold_bits
    if rounding is not None and not 2 <= rounding <= 16:
        raise ZooError(f"rounding_threshold_bits must be in [2, 16] or None, got {rounding}",
                       reason="bad_setting")
    if settings.rounding_method not in ("approximate", "exact"):
        raise ZooError(f"rounding_method must be 'approximate' or 'exact', "
                       f"got {settings.rounding_method!r}", reason="bad_setting")
    if not 0.0 < settings.p_error < 1.0:
        raise ZooError(f"p_error must be in (0, 1), got {settings.p_error}", reason="bad_setting")


def compile_quantized_module(name: str, settings: CompileSettings,
                             checkpoint: str | Path | None = None, *, on_phase: PhaseCallback = _quiet):
    """Build the model and compile it; returns (QuantizedModule, torch model). Used by
    compile_model and by tests that want fhe="simulate"."""
    spec = get_model(name)
    _check_settings(settings, spec.quantization)
    on_phase("build")
    model = spec.build(Path(checkpoint) if checkpoint is not None else None)
    calibration = spec.calibration_inputs()
    on_phase("compile")
    # Bounds are measured one sample at a time; torch's thread pool makes each tiny conv
    # 100x slower on a busy machine (10 ms instead of 0.1 ms), so compile single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compile(spec, settings, model, calibration), model
    finally:
        torch.set_num_threads(threads)


def _configuration(spec):
    """A model whose output is shaped like its input is run chained (each iteration's
    encrypted output is the next one's input). Concrete only accepts an output back as an
    input when the circuit is composable; otherwise it refuses ("incompatible type info":
    the input is encoded at the accumulator's width, the output at its own)."""
    if spec.output_shape is None or spec.output_shape != spec.input_shape:
        return None
    from concrete.fhe import Configuration

    return Configuration(composable=True)


def _compile(spec, settings: CompileSettings, model, calibration):
    if spec.quantization == "brevitas_qat":
        from concrete.ml.torch.compile import compile_brevitas_qat_model

        n_bits = ({"model_inputs": settings.io_bits, "model_outputs": settings.io_bits}
                  if settings.n_bits is None else settings.n_bits)
        module = compile_brevitas_qat_model(
            model, calibration, n_bits=n_bits, configuration=_configuration(spec),
            rounding_threshold_bits=settings.rounding_argument(), p_error=settings.p_error)
    else:
        from concrete.ml.torch.compile import compile_torch_model

        module = compile_torch_model(
            model, calibration, n_bits=settings.n_bits,
            rounding_threshold_bits=settings.rounding_argument(), p_error=settings.p_error)
    return module


def compile_model(name: str, out_dir: str | Path, *, n_bits: int | None,
                  rounding_threshold_bits: int | None, p_error: float,
                  rounding_method: str = "approximate",
                  checkpoint: str | Path | None = None, on_phase: PhaseCallback = _quiet) -> Manifest:
    """Compile `name` into `out_dir` (created; must be empty or absent) and return its
    manifest. Same model, weights, settings and versions give byte-identical zips.
    `on_phase` is told each of COMPILE_PHASES as it starts (a progress line)."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    settings = CompileSettings(n_bits=n_bits, rounding_threshold_bits=rounding_threshold_bits,
                               rounding_method=rounding_method, p_error=p_error)  # type: ignore[arg-type]
    started = time.perf_counter()
    module, model = compile_quantized_module(name, settings, checkpoint, on_phase=on_phase)
    on_phase("save")
    return write_bundle(name, module, model, settings, out_dir,
                        compile_seconds=time.perf_counter() - started)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ZooError(f"{out_dir} is not empty; choose a new directory or delete it",
                       reason="out_dir_not_empty")


def write_bundle(name: str, module, model, settings: CompileSettings, out_dir: str | Path, *,
                 compile_seconds: float) -> Manifest:
    """Save a compiled QuantizedModule as client.zip, server.zip, reference.json and
    manifest.json in `out_dir`."""
    from concrete.ml.deployment import FHEModelDev

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    spec = get_model(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    # FHEModelDev wants an empty directory and leaves nothing else; save beside, then move.
    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        FHEModelDev(staging, module).save()
        for zip_name in (CLIENT_ZIP, SERVER_ZIP):
            normalize_zip(Path(staging) / zip_name)
            shutil.move(str(Path(staging) / zip_name), out_dir / zip_name)
    (out_dir / REFERENCE_JSON).write_text(module.dumps())

    circuit = module.fhe_circuit
    manifest = Manifest(
        model=name,
        sha256={file: sha256_file(out_dir / file)
                for file in (CLIENT_ZIP, SERVER_ZIP, REFERENCE_JSON)},
        n_bits=settings.n_bits,
        rounding_threshold_bits=settings.rounding_threshold_bits,
        rounding_method=settings.rounding_method,
        p_error=settings.p_error,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        weights_sha256=weights_sha256(model),
        concrete_ml_version=version("concrete-ml"),
        concrete_python_version=version("concrete-python"),
        compile_seconds=round(compile_seconds, 3),
        max_bit_width=int(circuit.graph.maximum_integer_bit_width()),
        pbs_count=int(circuit.statistics.get("programmable_bootstrap_count", 0)),
    )
    (out_dir / MANIFEST_JSON).write_text(manifest.to_json())
    return manifest
