"""The model zoo: which networks miners may serve, how each is built, and its defaults.

Four models:
- `digits-cnn`: a tiny CNN on sklearn's bundled 8x8 digits; weights ship in
  fhe/data/digits_cnn.safetensors (made by `train_digits_cnn(seed=0)`), so every node
  compiles the same bytes. Post-training quantization via compile_torch_model.
- `cnv-cifar10`: the CNV 2W2A network of Umuroglu et al. (FINN) as brevitas writes it,
  with Concrete-ML's FHE-friendly change (average pooling followed by a requantizer
  instead of max pooling). Quantization-aware: compiled with compile_brevitas_qat_model.
- `synthetic-cnv`: the Brainlock subnet's "synthetic CNV", one CNV block whose output has
  its input's shape (3x32x32), so a challenge can chain iterations. Its checkpoint is the
  subnet's torch file `{"state_dict": ...}`, read with weights_only=True.
- `synthetic-cnv-tiny`: the same block on 3x8x8, which compiles and runs in seconds.

Weights come from a safetensors state_dict (never pickle) or, for CNV, a seeded random
initialisation when no checkpoint is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from fhe.images import cifar_like_image
from protocol.errors import LocalProtocolError

DATA_DIR = Path(__file__).resolve().parent / "data"
DIGITS_WEIGHTS = DATA_DIR / "digits_cnn.safetensors"
DIGITS_TEST_FRACTION = 0.22  # 397 of 1797 images held out; the challenge pool


class ZooError(LocalProtocolError):
    """A model name, checkpoint or setting this node cannot use."""

    reason = "zoo"

    def __init__(self, hint: str, *, reason: str | None = None) -> None:
        super().__init__(hint)
        if reason is not None:
            self.reason = reason


@dataclass(frozen=True)
class CompileSettings:
    """Everything that changes the compiled circuit; recorded in the manifest.

    n_bits None means: take the bit widths from the brevitas quantizers (QAT models),
    except the input/output quantizers which use `io_bits`.
    """

    n_bits: int | None
    rounding_threshold_bits: int | None
    rounding_method: Literal["approximate", "exact"]
    p_error: float
    io_bits: int = 8

    def rounding_argument(self) -> dict[str, int | str] | None:
        if self.rounding_threshold_bits is None:
            return None
        return {"n_bits": self.rounding_threshold_bits, "method": self.rounding_method}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]  # one sample, no batch axis
    num_classes: int
    quantization: Literal["post_training", "brevitas_qat"]
    defaults: CompileSettings
    build: Callable[[Path | None], nn.Module]  # checkpoint path or None -> eval-mode model
    calibration_inputs: Callable[[], np.ndarray]  # float32, (n, *input_shape)
    description: str
    # None: a classifier with num_classes logits. Otherwise the shape of one output (no
    # batch axis); num_classes is then its element count, as the manifest records it.
    output_shape: tuple[int, ...] | None = None


# --------------------------------------------------------------------------- digits


class DigitsCNN(nn.Module):
    """Two strided 3x3 convolutions and one linear layer: 96 ReLUs, 96 PBS in FHE.

    Chosen over a wider 2-conv net (8/16 channels, 352 ReLUs, exact 6-bit rounding:
    480 PBS, 104 MB of evaluation keys); with n_bits 5 and approximate 5-bit rounding
    this one needs 39 MB of keys at ~95 % simulated agreement (docs/fhe.md).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3, stride=2, padding=1)  # 8x8 -> 4x4
        self.conv2 = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1)  # 4x4 -> 2x2
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@dataclass(frozen=True)
class DigitsSplit:
    train_images: np.ndarray  # float32 (n, 1, 8, 8) in [0, 1]
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """sklearn's bundled digits, scaled to [0, 1], split by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    order = np.random.default_rng(0).permutation(len(images))
    n_test = int(round(len(images) * DIGITS_TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(images[train], digits.target[train], images[test], digits.target[test])


def train_digits_cnn(seed: int = 0, epochs: int = 40) -> DigitsCNN:
    """Train DigitsCNN from scratch (about a second on 2 cores). The shipped weights
    were made with the defaults; torch float reductions can differ across machines, so
    nodes load the shipped file rather than retrain."""
    split = digits_split()
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.from_numpy(split.train_images)
    labels = torch.from_numpy(split.train_labels).long()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def _build_digits(checkpoint: Path | None) -> nn.Module:
    model = DigitsCNN()
    load_checkpoint(model, checkpoint if checkpoint is not None else DIGITS_WEIGHTS)
    return model.eval()


def _digits_calibration() -> np.ndarray:
    return digits_split().train_images[:500]


# --------------------------------------------------------------------------- CNV


CNV_OUT_CH_POOL = ((64, False), (64, True), (128, False), (128, True), (256, False), (256, False))
CNV_FC_FEATURES = ((256, 512), (512, 512))
CNV_INIT_SEED = 0


class Cnv2W2A(nn.Module):
    """CNV for 3x32x32 inputs in [-1, 1): 8-bit input quantizer, six 3x3 conv blocks
    (64-64-128-128-256-256, no padding, 2-bit weights and activations), FC 512-512-10.
    Quantizers are brevitas_examples' bnn_pynq ones (constant scaling, narrow range)."""

    def __init__(self, weight_bits: int = 2, act_bits: int = 2, in_bits: int = 8) -> None:
        super().__init__()
        from brevitas.core.restrict_val import RestrictValueType
        from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear
        from brevitas_examples.bnn_pynq.models.common import CommonActQuant, CommonWeightQuant
        from brevitas_examples.bnn_pynq.models.tensor_norm import TensorNorm

        self.conv_features = nn.ModuleList()
        self.linear_features = nn.ModuleList()
        self.conv_features.append(
            QuantIdentity(  # Q1.7 input
                act_quant=CommonActQuant,
                bit_width=in_bits,
                min_val=-1.0,
                max_val=1.0 - 2.0**-7,
                narrow_range=False,
                restrict_scaling_type=RestrictValueType.POWER_OF_TWO,
            )
        )
        in_ch = 3
        for out_ch, pool in CNV_OUT_CH_POOL:
            self.conv_features.append(
                QuantConv2d(
                    in_channels=in_ch,
                    out_channels=out_ch,
                    kernel_size=3,
                    bias=False,
                    weight_quant=CommonWeightQuant,
                    weight_bit_width=weight_bits,
                )
            )
            in_ch = out_ch
            self.conv_features.append(nn.BatchNorm2d(out_ch, eps=1e-4))
            self.conv_features.append(QuantIdentity(act_quant=CommonActQuant, bit_width=act_bits))
            if pool:
                # Max pooling costs many PBS in FHE; an average plus a requantizer does not.
                self.conv_features.append(nn.AvgPool2d(kernel_size=2))
                self.conv_features.append(
                    QuantIdentity(act_quant=CommonActQuant, bit_width=act_bits)
                )
        for in_features, out_features in CNV_FC_FEATURES:
            self.linear_features.append(
                QuantLinear(
                    in_features,
                    out_features,
                    bias=False,
                    weight_quant=CommonWeightQuant,
                    weight_bit_width=weight_bits,
                )
            )
            self.linear_features.append(nn.BatchNorm1d(out_features, eps=1e-4))
            self.linear_features.append(
                QuantIdentity(act_quant=CommonActQuant, bit_width=act_bits)
            )
        self.linear_features.append(
            QuantLinear(
                512, 10, bias=False, weight_quant=CommonWeightQuant, weight_bit_width=weight_bits
            )
        )
        self.linear_features.append(TensorNorm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.conv_features:
            x = module(x)
        x = torch.flatten(x, 1)
        for module in self.linear_features:
            x = module(x)
        return x


def _build_cnv(checkpoint: Path | None) -> nn.Module:
    if checkpoint is None:
        torch.manual_seed(CNV_INIT_SEED)
        model = Cnv2W2A()
        for module in model.modules():
            if hasattr(module, "weight_quant"):  # brevitas' own init for CNV
                nn.init.uniform_(module.weight.data, -1.0, 1.0)
    else:
        model = Cnv2W2A()
        load_checkpoint(model, checkpoint)
    return model.eval()


def _cnv_calibration() -> np.ndarray:
    return np.stack([cifar_like_image(np.random.default_rng(seed)) for seed in range(100)])


# --------------------------------------------------------------------------- synthetic CNV


SYNTHETIC_CNV_INIT_SEED = 42  # the subnet's seed for its un-checkpointed model
SYNTHETIC_CNV_CHANNELS = 3
SYNTHETIC_CNV_RANGE = (-1.0, 1.0 - 2.0**-7)  # Q1.7: what the input quantizer represents


class SyntheticCnv(nn.Module):
    """The Brainlock subnet's "synthetic CNV": brevitas' bnn_pynq CNV cut to one block.

    features.0: QuantIdentity, `in_bits` over [-1, 1) (Q1.7, power-of-two scale)
    features.1: QuantConv2d 3x3, stride 1, padding 1, channels -> channels, no bias
    features.2: BatchNorm2d(eps=1e-4)
    features.3: QuantIdentity over [-1, 1) (power-of-two scale)

    Padding 1 and equal channel counts keep the output shape equal to the input shape, so
    each iteration's output can be the next one's input. The subnet's output quantizer
    takes `weight_bit_width` as its bit width (its `act_bit_width` goes unused); we keep
    that, because validators score against the subnet's model, not its docstring.
    """

    def __init__(self, weight_bits: int = 4, act_bits: int = 2, in_bits: int = 8,
                 channels: int = SYNTHETIC_CNV_CHANNELS) -> None:
        super().__init__()
        from brevitas.core.restrict_val import RestrictValueType
        from brevitas.nn import QuantConv2d, QuantIdentity
        from brevitas_examples.bnn_pynq.models.common import CommonActQuant, CommonWeightQuant

        low, high = SYNTHETIC_CNV_RANGE
        self.act_bits = act_bits  # recorded, unused: see the class docstring
        self.features = nn.ModuleList([
            QuantIdentity(act_quant=CommonActQuant, return_quant_tensor=True, bit_width=in_bits,
                          min_val=low, max_val=high, narrow_range=False,
                          restrict_scaling_type=RestrictValueType.POWER_OF_TWO),
            QuantConv2d(kernel_size=3, stride=1, padding=1, in_channels=channels,
                        out_channels=channels, bias=False, weight_quant=CommonWeightQuant,
                        weight_bit_width=weight_bits),
            nn.BatchNorm2d(channels, eps=1e-4),
            QuantIdentity(act_quant=CommonActQuant, bit_width=weight_bits, min_val=low,
                          max_val=high, restrict_scaling_type=RestrictValueType.POWER_OF_TWO),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.features:
            x = module(x)
        return x


def seeded_synthetic_cnv() -> SyntheticCnv:
    """The subnet's model without a checkpoint: seed 42, then PyTorch's default init
    (kaiming-uniform, a = sqrt(5), for the conv; BatchNorm weight 1, bias 0)."""
    torch.manual_seed(SYNTHETIC_CNV_INIT_SEED)
    return SyntheticCnv().eval()


def load_synthetic_cnv_checkpoint(path: Path) -> SyntheticCnv:
    """A SyntheticCnv with the weights of the subnet's checkpoint at `path`.

    The file is a torch file holding {"state_dict": {...}} with brevitas' keys
    features.0 .. features.3. It is read with weights_only=True: tensors and plain
    containers only, so a pickled object is refused instead of run. Every key of our
    model must be there with our shape and a finite value; no other key may be.
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"checkpoint {path} does not exist", reason="missing_checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refusals are pickle.UnpicklingError, others vary
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ZooError(
            f"checkpoint {path} is not a weights-only torch file ({first_line}); "
            "it must hold only tensors: {'state_dict': model.state_dict()}",
            reason="bad_checkpoint") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ZooError(f"checkpoint {path} holds no 'state_dict' dict; save it as "
                       "torch.save({'state_dict': model.state_dict()}, path)",
                       reason="bad_checkpoint")
    model = SyntheticCnv()
    _check_state_dict(path, checkpoint["state_dict"], model.state_dict())
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()


def _check_state_dict(path: Path, state: dict, expected: dict[str, torch.Tensor]) -> None:
    """Refuse with one line naming what is wrong: load_state_dict's own errors list
    everything at once, and strict=False (the subnet's choice) would ignore a typo."""
    unknown = sorted(set(state) - set(expected), key=str)
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise ZooError(f"checkpoint {path} does not fit the synthetic CNV: unknown keys "
                       f"{unknown or 'none'}, missing keys {missing or 'none'}",
                       reason="checkpoint_mismatch")
    for key, ours in expected.items():
        theirs = state[key]
        if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != tuple(ours.shape):
            shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise ZooError(f"checkpoint {path}: {key} has shape {shape}, the synthetic CNV "
                           f"needs {tuple(ours.shape)}", reason="checkpoint_mismatch")
        if ours.is_floating_point() and not (theirs.is_floating_point()
                                             and bool(torch.isfinite(theirs).all())):
            raise ZooError(f"checkpoint {path}: {key} must be finite floating point values",
                           reason="checkpoint_mismatch")


def _build_synthetic_cnv(checkpoint: Path | None) -> nn.Module:
    return seeded_synthetic_cnv() if checkpoint is None else load_synthetic_cnv_checkpoint(checkpoint)


def synthetic_cnv_calibration(size: int, n: int = 100, seed: int = 0) -> np.ndarray:
    """Uniform noise over the input quantizer's range, from a fixed seed: every node gets
    the same bytes, and the range (not CIFAR's pixel statistics, which the subnet used)
    is what fixes a QAT model's input quantizer. Chained iterations feed the model its
    own outputs, which also lie in this range."""
    low, high = SYNTHETIC_CNV_RANGE
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(n, SYNTHETIC_CNV_CHANNELS, size, size)).astype(np.float32)


# The subnet's compile.py: compile_brevitas_qat_model(n_bits={"model_inputs": 8,
# "model_outputs": 8}, rounding_threshold_bits={"method": APPROXIMATE, "n_bits": 6},
# p_error=float(os.environ.get("P_ERROR", 0.01))).
SYNTHETIC_CNV_SETTINGS = CompileSettings(
    n_bits=None, rounding_threshold_bits=6, rounding_method="approximate", p_error=0.01, io_bits=8)


def chained_reference(quantized_module, x: np.ndarray, iterations: int) -> list[np.ndarray]:
    """The clear outputs of `iterations` chained runs, as a miner computes them encrypted.

    A chained run feeds the circuit its own output integers as input integers; nothing
    requantizes in between. So iteration k+1 sees output_k * output_scale / input_scale,
    which is output_k only when both quantizers agree (the subnet's 8-bit-weight variant:
    both 8-bit Q1.7). With 4-bit weights the output quantizer's step is 1/8 and the
    input's 1/128: each chained input is a sixteenth of the previous output. The
    validator's reference must therefore chain integers too (Concrete-ML's fhe="disable"
    path), not call the torch model on its own output.
    """
    q = quantized_module.quantize_input(np.asarray(x, dtype=np.float32))
    outputs = []
    for _ in range(iterations):
        q = quantized_module.quantized_forward(q, fhe="disable")
        outputs.append(np.asarray(quantized_module.dequantize_output(q)))
    return outputs


def _synthetic_cnv_spec(name: str, size: int, description: str) -> ModelSpec:
    shape = (SYNTHETIC_CNV_CHANNELS, size, size)
    return ModelSpec(
        name=name, input_shape=shape, num_classes=int(np.prod(shape)),
        quantization="brevitas_qat", defaults=SYNTHETIC_CNV_SETTINGS,
        build=_build_synthetic_cnv, calibration_inputs=lambda: synthetic_cnv_calibration(size),
        description=description, output_shape=shape)


# --------------------------------------------------------------------------- registry


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a safetensors state_dict strictly: every tensor present, none extra."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ZooError(f"checkpoint {path} does not exist", reason="missing_checkpoint")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ZooError(
            f"checkpoint {path} is not a safetensors file ({exc}); convert it with "
            "safetensors.torch.save_file(model.state_dict(), path)",
            reason="bad_checkpoint",
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ZooError(
            f"checkpoint {path} does not fit {type(model).__name__}: {exc}",
            reason="checkpoint_mismatch",
        ) from exc


def weights_sha256(model: nn.Module) -> str:
    """A digest of the weights (name, dtype, shape, bytes), recorded in the manifest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


ZOO: dict[str, ModelSpec] = {
    "digits-cnn": ModelSpec(
        name="digits-cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
        quantization="post_training",
        defaults=CompileSettings(
            n_bits=5, rounding_threshold_bits=5, rounding_method="approximate", p_error=0.01
        ),
        build=_build_digits,
        calibration_inputs=_digits_calibration,
        description="2-conv CNN on sklearn digits (8x8 grey, values in [0, 1])",
    ),
    "cnv-cifar10": ModelSpec(
        name="cnv-cifar10",
        input_shape=(3, 32, 32),
        num_classes=10,
        quantization="brevitas_qat",
        defaults=CompileSettings(
            n_bits=None, rounding_threshold_bits=6, rounding_method="exact", p_error=0.01
        ),
        build=_build_cnv,
        calibration_inputs=_cnv_calibration,
        description="CNV 2W2A (brevitas/FINN) for CIFAR-10 (3x32x32, values in [-1, 1))",
    ),
    "synthetic-cnv": _synthetic_cnv_spec(
        "synthetic-cnv", 32,
        "Brainlock's synthetic CNV: one 3x3 conv block, 3x32x32 in and out, values in [-1, 1)"),
    "synthetic-cnv-tiny": _synthetic_cnv_spec(
        "synthetic-cnv-tiny", 8,
        "the synthetic CNV on 3x8x8 (tests and quick meshes), values in [-1, 1)"),
}


def get_model(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise ZooError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(ZOO))}",
            reason="unknown_model",
        ) from None
