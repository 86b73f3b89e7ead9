"""The Brainlock subnet's synthetic CNV in the zoo: architecture, seeded init, the
subnet's checkpoint format read safely, and one real encrypted run of the tiny variant."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fhe.bundle import CLIENT_ZIP, REFERENCE_JSON, load_manifest
from fhe.bundle import cosine_similarity
from fhe.inputs import draw_challenge_input
from fhe.zoo import (SYNTHETIC_CNV_INIT_SEED, ZooError, chained_reference, get_model,
                     load_synthetic_cnv_checkpoint, weights_sha256)

TINY = get_model("synthetic-cnv-tiny")
FULL = get_model("synthetic-cnv")


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Tiny convolutions run 100x slower through torch's thread pool on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_architecture_is_the_subnets_one_block_and_keeps_the_shape():
    model = FULL.build(None)
    identity_in, conv, norm, identity_out = model.features
    assert type(identity_in).__name__ == type(identity_out).__name__ == "QuantIdentity"
    assert type(conv).__name__ == "QuantConv2d" and isinstance(norm, nn.BatchNorm2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.stride) \
        == (3, 3, (3, 3), (1, 1), (1, 1)) and conv.bias is None
    assert norm.eps == 1e-4
    assert int(identity_in.act_quant.bit_width()) == 8
    assert int(conv.quant_weight().bit_width) == 4
    assert int(identity_out.act_quant.bit_width()) == 4  # the subnet passes weight_bit_width
    assert set(model.state_dict()) <= {k for k in model.state_dict() if k.startswith("features.")}
    for spec in (FULL, TINY):
        assert spec.output_shape == spec.input_shape and spec.num_classes == math.prod(spec.input_shape)
        x = torch.from_numpy(draw_challenge_input(spec.name, 3).image[None])
        with torch.no_grad():
            y = spec.build(None)(x)
        assert y.shape == x.shape  # what lets an iteration's output be the next input
        assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0 - 2.0**-7


def test_seeded_init_is_torch_default_conv_init_from_seed_42():
    model = FULL.build(None)
    torch.manual_seed(SYNTHETIC_CNV_INIT_SEED)
    plain = nn.Conv2d(3, 3, kernel_size=3, padding=1, bias=False)  # kaiming_uniform_(a=sqrt(5))
    assert torch.equal(model.features[1].weight, plain.weight)
    assert torch.equal(model.features[2].weight, torch.ones(3))
    assert torch.equal(model.features[2].bias, torch.zeros(3))
    assert weights_sha256(model) == weights_sha256(FULL.build(None))  # reproducible


def _other_weights() -> dict[str, torch.Tensor]:
    model = FULL.build(None)
    with torch.no_grad():
        model.features[1].weight.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(7))
        model.features[2].weight.fill_(0.8)
        model.features[2].bias.fill_(0.05)
        model.features[2].running_mean.fill_(0.1)
        model.features[2].running_var.fill_(2.0)
    return model.state_dict()


def test_subnet_checkpoint_loads_the_weights_it_holds(tmp_path):
    state = _other_weights()
    path = tmp_path / "synthetic_model_checkpoint.pth"
    torch.save({"state_dict": state}, path)  # the subnet's format
    loaded = FULL.build(path)
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert weights_sha256(loaded) != weights_sha256(FULL.build(None))
    x = torch.from_numpy(draw_challenge_input("synthetic-cnv", 1).image[None])
    reference = FULL.build(None)
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference.eval()(x))


class _Payload:
    """An object whose unpickling would create a file: what a hostile checkpoint runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_pickled_object_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _other_weights(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(ZooError) as info:
        load_synthetic_cnv_checkpoint(path)
    assert info.value.reason == "bad_checkpoint" and "weights-only" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("change, words", [
    (lambda s: {**s, "features.4.weight": torch.zeros(3)}, "unknown keys ['features.4.weight']"),
    (lambda s: {k: v for k, v in s.items() if k != "features.2.bias"},
     "missing keys ['features.2.bias']"),
    (lambda s: {**s, "features.1.weight": torch.zeros(256, 256, 3, 3)}, "has shape (256, 256, 3, 3)"),
    (lambda s: {**s, "features.2.weight": torch.full((3,), float("nan"))}, "finite"),
])
def test_checkpoint_that_does_not_fit_is_refused_with_the_reason(tmp_path, change, words):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": change(_other_weights())}, path)
    with pytest.raises(ZooError) as info:
        FULL.build(path)
    assert info.value.reason == "checkpoint_mismatch" and words in str(info.value)


def test_checkpoint_without_state_dict_or_absent_is_refused(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(_other_weights(), path)  # a bare state_dict, not the subnet's wrapper
    with pytest.raises(ZooError) as info:
        FULL.build(path)
    assert info.value.reason == "bad_checkpoint" and "state_dict" in str(info.value)
    with pytest.raises(ZooError) as info:
        FULL.build(tmp_path / "absent.pth")
    assert info.value.reason == "missing_checkpoint"


def test_calibration_inputs_are_deterministic_and_in_range():
    a, b = TINY.calibration_inputs(), TINY.calibration_inputs()
    assert a.shape == (100, 3, 8, 8) and a.dtype == np.float32 and np.array_equal(a, b)
    assert a.min() >= -1.0 and a.max() <= 1.0 - 2.0**-7
    assert FULL.calibration_inputs().shape == (100, 3, 32, 32)


# ------------------------------------------------------------------ a real FHE run


def test_tiny_compiles_through_ensure_bundle_and_runs_encrypted(tmp_path):
    """The miner's path (node.fhe_service.ensure_bundle) builds the bundle; one encrypted
    run decrypts to the clear quantized circuit and the brevitas model."""
    from concrete.ml.common.serialization.loaders import loads
    from concrete.ml.deployment import FHEModelClient, FHEModelServer

    from node.fhe_service import ensure_bundle

    bundle = tmp_path / "bundle-synthetic-cnv-tiny"
    manifest = ensure_bundle("synthetic-cnv-tiny", bundle)
    d = TINY.defaults
    assert manifest.model == "synthetic-cnv-tiny" and manifest.input_shape == (3, 8, 8)
    assert manifest.num_classes == 3 * 8 * 8
    assert (manifest.n_bits, manifest.rounding_threshold_bits, manifest.rounding_method,
            manifest.p_error) == (None, 6, "approximate", 0.01) == (
                d.n_bits, d.rounding_threshold_bits, d.rounding_method, d.p_error)
    assert load_manifest(bundle).server_sha256 == manifest.server_sha256

    client = FHEModelClient(str(bundle), key_dir=None)
    client.generate_private_and_evaluation_keys()
    keys = client.get_serialized_evaluation_keys()
    server = FHEModelServer(str(bundle))
    x = draw_challenge_input("synthetic-cnv-tiny", 11).image[None]
    result = server.run(client.quantize_encrypt_serialize(x), keys)
    decrypted = np.asarray(client.deserialize_decrypt_dequantize(result))
    assert decrypted.shape == (1, 3, 8, 8)

    clear_circuit = loads((bundle / REFERENCE_JSON).read_text()).forward(x, fhe="disable")
    with torch.no_grad():
        brevitas = TINY.build(None)(torch.from_numpy(x)).numpy()
    to_circuit, to_torch = cosine_similarity(decrypted, clear_circuit), cosine_similarity(decrypted, brevitas)
    exact = float(np.isclose(decrypted, clear_circuit).mean())
    print(f"synthetic-cnv-tiny: PBS {manifest.pbs_count}, compile {manifest.compile_seconds} s, "
          f"cosine to circuit {to_circuit:.4f}, to torch {to_torch:.4f}, exact {exact:.3f}")
    # PBS errors (p_error 0.01) and approximate 6-bit rounding move a few outputs by one
    # 1/8 step; measured: cosine 0.993 to the circuit, 0.986 to torch, 93 % exact.
    assert to_circuit > 0.98 and to_torch > 0.97 and exact > 0.8

    # Chained: the encrypted output goes back in as the next input (composable circuit),
    # and decrypts to the integer-chained clear reference.
    second = np.asarray(client.deserialize_decrypt_dequantize(server.run(result, keys)))
    module = loads((bundle / REFERENCE_JSON).read_text())
    first_ref, second_ref = chained_reference(module, x, 2)
    assert np.array_equal(first_ref, clear_circuit)
    chained_exact = float(np.isclose(second, second_ref).mean())
    print(f"synthetic-cnv-tiny: chained iteration 2, exact {chained_exact:.3f}, values "
          f"{sorted(set(np.round(second.ravel(), 4)))}")
    # With 4-bit weights the output step (1/8) is 16 input steps (1/128), so the second
    # input is a sixteenth of the first output and the outputs collapse to {-1/8, 0, 1/8}:
    # cosine means little there (measured 0.30 at 93 % exact); equality is the check.
    assert second.shape == (1, 3, 8, 8) and chained_exact > 0.8
    assert (bundle / CLIENT_ZIP).is_file()


@pytest.mark.slow
def test_full_synthetic_cnv_compiles_with_the_subnets_settings(tmp_path):
    from fhe.compile import compile_model

    d = FULL.defaults
    manifest = compile_model("synthetic-cnv", tmp_path / "full", n_bits=d.n_bits,
                             rounding_threshold_bits=d.rounding_threshold_bits,
                             rounding_method=d.rounding_method, p_error=d.p_error)
    print(f"synthetic-cnv: compile {manifest.compile_seconds} s, PBS {manifest.pbs_count}, "
          f"max bits {manifest.max_bit_width}")
    assert manifest.input_shape == (3, 32, 32) and manifest.num_classes == 3 * 32 * 32
    assert manifest.pbs_count == 3 * 32 * 32  # one TLU per output: conv+BN+requantize fused
