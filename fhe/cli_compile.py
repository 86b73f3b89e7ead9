"""`sealmesh fhe compile --model NAME --out DIR`: compile a zoo model into a bundle.

node/cli.py wires this in; `add_compile_arguments` fills its subparser and
`run_compile` runs the parsed namespace, or call `fhe_compile_main(argv)` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from fhe.bundle import BundleError
from fhe.zoo import ZOO, ZooError, get_model


_MODEL_DEFAULT = object()  # "flag not given": take the zoo's setting ('none' is a value)

# (label, phases) -> a context manager with .enter(phase): node/cli.py passes a terminal
# progress line (fhe/ never imports node/); by default nothing is shown.
PhaseProgressFactory = Callable[[str, Sequence[str]], ContextManager[Any]]


class _NoProgress(contextlib.nullcontext):
    def enter(self, phase: str) -> None:
        pass


def _no_progress(label: str, phases: Sequence[str]) -> ContextManager[Any]:
    return _NoProgress(_NoProgress())


def _bits_or_none(text: str) -> int | None:
    if text.lower() in ("none", "qat"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=sorted(ZOO), help="zoo model name")
    parser.add_argument("--out", required=True, type=Path,
                        help="bundle directory to create (must be empty or absent)")
    parser.add_argument("--checkpoint", type=Path,
                        help="state_dict in safetensors (default: shipped or seeded weights)")
    parser.add_argument("--n-bits", type=_bits_or_none, default=_MODEL_DEFAULT,
                        help="quantization bits, or 'none' to keep a QAT model's own "
                             "(default: the model's)")
    parser.add_argument("--rounding-bits", type=_bits_or_none, default=_MODEL_DEFAULT,
                        help="rounding threshold bits, or 'none' (default: the model's)")
    parser.add_argument("--rounding-method", choices=["approximate", "exact"],
                        default=_MODEL_DEFAULT, help="default: the model's")
    parser.add_argument("--p-error", type=float, default=_MODEL_DEFAULT,
                        help="PBS error probability (default: the model's)")


def run_compile(args: argparse.Namespace, progress: PhaseProgressFactory = _no_progress) -> int:
    """Compile from parsed arguments; prints the bundle hashes. Returns an exit code."""
    from fhe.compile import COMPILE_PHASES, compile_model

    def chosen(value, default):
        return default if value is _MODEL_DEFAULT else value

    try:
        defaults = get_model(args.model).defaults
        with progress(f"fhe compile {args.model}", COMPILE_PHASES) as line:
            manifest = compile_model(
                args.model, args.out,
                n_bits=chosen(args.n_bits, defaults.n_bits),
                rounding_threshold_bits=chosen(args.rounding_bits, defaults.rounding_threshold_bits),
                rounding_method=chosen(args.rounding_method, defaults.rounding_method),
                p_error=chosen(args.p_error, defaults.p_error),
                checkpoint=args.checkpoint, on_phase=line.enter)
    except (ZooError, BundleError) as exc:
        print(f"sealmesh fhe compile: {exc}", file=sys.stderr)
        return 2
    print(f"compiled {manifest.model} in {manifest.compile_seconds:.1f} s into {args.out}")
    print(f"server.zip sha256 {manifest.server_sha256} (what miners announce)")
    print(f"client.zip sha256 {manifest.client_sha256}")
    return 0


def fhe_compile_main(argv: list[str] | None = None, progress: PhaseProgressFactory = _no_progress) -> int:
    """Entry point for `sealmesh fhe compile ...`; argv excludes the 'fhe compile' words."""
    parser = argparse.ArgumentParser(prog="sealmesh fhe compile",
                                     description="Compile a zoo model into client/server "
                                                 "bundles with a manifest.")
    add_compile_arguments(parser)
    return run_compile(parser.parse_args(argv), progress)


if __name__ == "__main__":
    raise SystemExit(fhe_compile_main())
