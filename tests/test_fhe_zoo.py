"""Model zoo, compilation, manifests and challenge inputs (fhe/zoo, compile, bundle, inputs)."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fhe.bundle import (
    CLIENT_ZIP,
    MANIFEST_JSON,
    SERVER_ZIP,
    BundleError,
    BundleHashMismatch,
    load_manifest,
)
from fhe.compile import compile_model, compile_quantized_module, write_bundle
from fhe.inputs import draw_challenge_input, rng_from_seed
from fhe.zoo import ZOO, CompileSettings, ZooError, digits_split, get_model, weights_sha256

DIGITS = get_model("digits-cnn")


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Tiny convolutions run 100x slower through torch's thread pool on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_digits_bundle(tmp_path_factory, module=None, model=None) -> Path:
    """One compiled digits bundle per pytest session, shared with test_fhe_engine."""
    bundle = tmp_path_factory.getbasetemp() / "fhe-digits-bundle"
    if (bundle / MANIFEST_JSON).is_file():
        return bundle
    if module is not None:
        write_bundle("digits-cnn", module, model, DIGITS.defaults, bundle, compile_seconds=0.0)
    else:
        d = DIGITS.defaults
        compile_model("digits-cnn", bundle, n_bits=d.n_bits, p_error=d.p_error,
                      rounding_threshold_bits=d.rounding_threshold_bits,
                      rounding_method=d.rounding_method)
    return bundle


@pytest.fixture(scope="session")
def digits_compiled(tmp_path_factory):
    started = time.perf_counter()
    module, model = compile_quantized_module("digits-cnn", DIGITS.defaults)
    seconds = time.perf_counter() - started
    bundle = shared_digits_bundle(tmp_path_factory, module, model)
    return module, model, bundle, seconds


# ------------------------------------------------------------------ zoo


def test_zoo_names_and_unknown_model():
    assert set(ZOO) == {"digits-cnn", "cnv-cifar10", "synthetic-cnv", "synthetic-cnv-tiny"}
    with pytest.raises(ZooError) as info:
        get_model("resnet-9000")
    assert info.value.reason == "unknown_model"
    assert "digits-cnn" in str(info.value)


def test_digits_cnn_shipped_weights_classify_test_split():
    model = DIGITS.build(None)
    split = digits_split()
    assert len(set(map(int, split.test_labels))) == 10
    with torch.no_grad():
        predicted = model(torch.from_numpy(split.test_images)).argmax(1).numpy()
    assert (predicted == split.test_labels).mean() >= 0.9


def test_cnv_construction_and_clear_forward(tmp_path):
    from safetensors.torch import save_file

    spec = get_model("cnv-cifar10")
    model = spec.build(None)
    convs = [m for m in model.conv_features if type(m).__name__ == "QuantConv2d"]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    assert all(c.kernel_size == (3, 3) and int(c.quant_weight().bit_width) == 2 for c in convs)
    linears = [m for m in model.linear_features if type(m).__name__ == "QuantLinear"]
    assert [lin.out_features for lin in linears] == [512, 512, 10]
    assert int(model.conv_features[0].act_quant.bit_width()) == 8

    x = torch.from_numpy(np.stack([draw_challenge_input("cnv-cifar10", s).image for s in (1, 2)]))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert not torch.equal(logits[0], logits[1])  # the input matters

    # A safetensors checkpoint round-trips; the seeded init is reproducible.
    path = tmp_path / "cnv.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    reloaded = spec.build(path)
    assert weights_sha256(reloaded) == weights_sha256(model) == weights_sha256(spec.build(None))
    with torch.no_grad():
        assert torch.equal(reloaded(x), logits)


def test_checkpoints_must_be_safetensors_that_fit(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save(DIGITS.build(None).state_dict(), pickled)
    with pytest.raises(ZooError) as info:
        DIGITS.build(pickled)
    assert info.value.reason == "bad_checkpoint"
    with pytest.raises(ZooError) as info:
        DIGITS.build(tmp_path / "absent.safetensors")
    assert info.value.reason == "missing_checkpoint"
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(ZooError) as info:
        DIGITS.build(wrong)
    assert info.value.reason == "checkpoint_mismatch"


# ------------------------------------------------------------------ compile


def test_digits_simulation_agrees_with_clear_model(digits_compiled):
    module, model, _, seconds = digits_compiled
    images = digits_split().test_images
    with torch.no_grad():
        clear = model(torch.from_numpy(images)).argmax(1).numpy()
    simulated = np.asarray(module.forward(images, fhe="simulate")).argmax(1)
    agreement = float((simulated == clear).mean())
    print(f"digits-cnn: compile {seconds:.1f} s, simulated agreement {agreement:.3f}")
    assert agreement >= 0.85


def test_manifest_records_settings_and_hashes(digits_compiled):
    _, model, bundle, _ = digits_compiled
    manifest = load_manifest(bundle)
    d = DIGITS.defaults
    assert manifest.model == "digits-cnn"
    assert (manifest.n_bits, manifest.rounding_threshold_bits, manifest.rounding_method,
            manifest.p_error) == (d.n_bits, d.rounding_threshold_bits, d.rounding_method,
                                  d.p_error)
    assert manifest.input_shape == (1, 8, 8) and manifest.num_classes == 10
    assert manifest.concrete_ml_version == "1.9.0"
    assert manifest.weights_sha256 == weights_sha256(model)
    assert manifest.pbs_count > 0 and manifest.max_bit_width > d.rounding_threshold_bits
    assert json.loads((bundle / MANIFEST_JSON).read_text())["sha256"][SERVER_ZIP] \
        == manifest.server_sha256


def test_tampered_or_missing_bundle_is_refused(digits_compiled, tmp_path):
    _, _, bundle, _ = digits_compiled
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / SERVER_ZIP, "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(BundleHashMismatch) as info:
        load_manifest(copy)
    assert info.value.reason == "bundle_hash_mismatch" and SERVER_ZIP in str(info.value)

    (copy / SERVER_ZIP).unlink()  # a validator's copy needs no server.zip ...
    assert load_manifest(copy, require=(CLIENT_ZIP,)).model == "digits-cnn"
    with pytest.raises(BundleError) as info:  # ... but by default every file must be there
        load_manifest(copy)
    assert info.value.reason == "missing_bundle_file"

    (copy / MANIFEST_JSON).write_text("{not json")
    with pytest.raises(BundleError) as info:
        load_manifest(copy)
    assert info.value.reason == "bad_manifest"
    with pytest.raises(BundleError) as info:
        load_manifest(tmp_path / "nowhere")
    assert info.value.reason == "missing_manifest"


@pytest.mark.parametrize("settings", [
    CompileSettings(n_bits=1, rounding_threshold_bits=5, rounding_method="approximate",
                    p_error=0.01),
    CompileSettings(n_bits=None, rounding_threshold_bits=5, rounding_method="approximate",
                    p_error=0.01),
    CompileSettings(n_bits=4, rounding_threshold_bits=5, rounding_method="sloppy",  # type: ignore[arg-type]
                    p_error=0.01),
    CompileSettings(n_bits=4, rounding_threshold_bits=5, rounding_method="exact", p_error=0.0),
])
def test_bad_compile_settings_are_refused_before_compiling(settings):
    with pytest.raises(ZooError) as info:
        compile_quantized_module("digits-cnn", settings)
    assert info.value.reason == "bad_setting"


@pytest.mark.slow
def test_cnv_compiles_with_brevitas_qat(tmp_path):
    d = get_model("cnv-cifar10").defaults
    manifest = compile_model("cnv-cifar10", tmp_path / "cnv", n_bits=d.n_bits, p_error=d.p_error,
                             rounding_threshold_bits=d.rounding_threshold_bits,
                             rounding_method=d.rounding_method)
    print(f"cnv-cifar10: compile {manifest.compile_seconds} s, PBS {manifest.pbs_count}, "
          f"max bits {manifest.max_bit_width}")
    assert load_manifest(tmp_path / "cnv").input_shape == (3, 32, 32)


# ------------------------------------------------------------------ inputs


def test_challenge_inputs_are_deterministic_per_seed():
    a = draw_challenge_input("digits-cnn", b"challenge-1")
    b = draw_challenge_input("digits-cnn", b"challenge-1")
    c = draw_challenge_input("digits-cnn", b"challenge-2")
    assert np.array_equal(a.image, b.image) and a.source == b.source
    assert not np.array_equal(a.image, c.image)
    for drawn in (a, c):
        assert drawn.image.shape == (1, 8, 8) and drawn.image.dtype == np.float32
        assert 0.0 <= drawn.image.min() and drawn.image.max() <= 1.0
        assert 0 <= drawn.label < 10
    cnv = draw_challenge_input("cnv-cifar10", 5)
    assert cnv.image.shape == (3, 32, 32) and cnv.image.dtype == np.float32
    assert -1.0 <= cnv.image.min() and cnv.image.max() < 1.0 and cnv.label is None
    synthetic = draw_challenge_input("digits-cnn", 5, source="synthetic")
    assert synthetic.label is None and synthetic.image.shape == (1, 8, 8)


def test_augmented_digits_stay_recognisable():
    model = DIGITS.build(None)
    drawn = [draw_challenge_input("digits-cnn", seed) for seed in range(60)]
    assert len({d.source for d in drawn}) > 50  # different images and augmentations
    with torch.no_grad():
        predicted = model(torch.from_numpy(np.stack([d.image for d in drawn]))).argmax(1)
    accuracy = float((predicted.numpy() == np.array([d.label for d in drawn])).mean())
    assert accuracy >= 0.8


def test_bad_seeds_and_sources_are_refused():
    for seed in (-1, 1.5, None):
        with pytest.raises(ZooError) as info:
            rng_from_seed(seed)  # type: ignore[arg-type]
        assert info.value.reason == "bad_seed"
    with pytest.raises(ZooError) as info:
        draw_challenge_input("digits-cnn", 1, source="imagenet")  # type: ignore[arg-type]
    assert info.value.reason == "bad_source"
    with pytest.raises(ZooError):
        draw_challenge_input("no-such-model", 1)


# ------------------------------------------------------------------ CLI


def test_cli_recompiles_identical_bundles_and_reports_errors(digits_compiled, tmp_path, capsys):
    from fhe.cli_compile import fhe_compile_main

    from node.progress import PhaseProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()

    def on_screen(label, phases):  # what node/cli.py passes, drawing on a terminal
        return PhaseProgress(label, phases, stream=screen, tick_s=None)

    _, _, bundle, _ = digits_compiled
    out = tmp_path / "cli"
    assert fhe_compile_main(["--model", "digits-cnn", "--out", str(out)], progress=on_screen) == 0
    frames = [f.strip() for f in screen.getvalue().split("\r") if f.strip()]
    assert [f.split("]")[1].split(",")[0].strip() for f in frames[:-1]] == ["1/3 build", "2/3 compile", "3/3 save"]
    assert frames[-1].startswith("fhe compile digits-cnn: done (")
    manifest = load_manifest(out)
    first = load_manifest(bundle)  # compiled earlier in this session, same defaults
    assert manifest.server_sha256 == first.server_sha256  # reproducible: checkable by anyone
    assert manifest.client_sha256 == first.client_sha256
    assert manifest.server_sha256 in capsys.readouterr().out

    from node.cli import main  # the command line, with its real progress line
    assert main(["fhe", "compile", "--model", "digits-cnn", "--out", str(out)]) == 2  # not empty
    err = capsys.readouterr().err
    assert "not empty" in err and "[" not in err  # no progress line when stderr is not a terminal
    assert fhe_compile_main(["--model", "digits-cnn", "--out", str(tmp_path / "x"),
                             "--n-bits", "none"]) == 2
    assert "n_bits is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fhe_compile_main(["--model", "nope", "--out", str(tmp_path / "y")])


def test_compare_logits_accepts_a_near_tie_and_refuses_a_clear_miss():
    from fhe.bundle import compare_logits

    reference = [0.0, 10.0, 9.5, 1.0]  # classes 1 and 2 within 5 % of the span
    assert compare_logits([0.0, 9.0, 9.6, 1.0], reference).argmax_match
    assert not compare_logits([0.0, 1.0, 1.0, 9.0], reference).argmax_match  # class 3 is far off
    assert compare_logits([0.0, 10.0, 2.0, 1.0], reference).argmax_match
