"""Base models: a user's local Hugging Face directory, or the built-in tiny Llama.

Both go through one path: a directory loaded with `from_pretrained(local_files_only=True)`
(never a download), 4-bit NF4 through bitsandbytes when asked, on CPU or CUDA alike.
The tiny model is built from a seed and a byte-level tokenizer made offline, written to
a temporary directory, and loaded back through that same path, so every node builds
the identical base and the CPU demo exercises the real QLoRA code.

A base model is named by `model_id`: sha256 over its float weights (name, dtype, shape,
bytes; names sorted), computed before quantization, and independent of how a
directory shards its safetensors files.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from training.errors import TrainingUsageError

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True)
class TinyModelSpec:
    """The built-in demo model: a 2-layer Llama over bytes, small enough for 2 CPU cores."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 256
    seed: int = 0


@dataclass
class BaseModel:
    """A loaded base model with what a trainer needs beside it."""

    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    model_id: str
    quantized: bool  # True when the Linear layers are bitsandbytes NF4 Linear4bit
    device: torch.device
    source: str  # "tiny" or the directory path
    fallback_reason: str | None = None  # why 4-bit was asked for but not used


def build_byte_tokenizer():
    """A byte-level tokenizer with no merges: 3 specials + 256 bytes, same everywhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    vocab.update({symbol: index + 3 for index, symbol in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)


def build_tiny_model(spec: TinyModelSpec = TinyModelSpec()):
    """The seeded float32 tiny Llama and its tokenizer. Same spec -> same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, torch_dtype="float32")
    # fork_rng: building a model must not move the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def weights_id(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, names sorted."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{cpu.dtype}|{tuple(cpu.shape)}\n".encode())
        digest.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
    return digest.hexdigest()


def directory_weights_id(path: Path) -> str:
    """`weights_id` of a model directory's *.safetensors files, read one tensor at a time."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TrainingUsageError(f"{path} holds no *.safetensors weights; convert the model "
                                 "with save_pretrained(safe_serialization=True)",
                                 reason="no_safetensors")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)

    # the sort in weights_id holds every tensor at once; fine for demo-sized models,
    # and one pass per file keeps peak memory at the model's size for real ones
    return weights_id(tensors())


def load_base_model(path_or_none: str | Path | None, *, quantize_4bit: bool,
                    device: str | torch.device = "cpu",
                    tiny: TinyModelSpec = TinyModelSpec()) -> BaseModel:
    """Load the base for fine-tuning: `--model PATH` (local only) or the tiny model."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingUsageError("device cuda asked for but torch sees no CUDA device; "
                                 "use --device cpu", reason="no_cuda")
    if path_or_none is None:
        model, tokenizer = build_tiny_model(tiny)
        model_id = weights_id(model.state_dict().items())
        with tempfile.TemporaryDirectory(prefix="sealmesh-tiny-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            return _load_directory(Path(tmp), model_id, "tiny", quantize_4bit, device)
    path = Path(path_or_none)
    if not (path / "config.json").is_file():
        raise TrainingUsageError(f"{path} is not a Hugging Face model directory (no "
                                 "config.json); pass --model with a local save_pretrained "
                                 "directory", reason="model_not_found")
    return _load_directory(path, directory_weights_id(path), str(path), quantize_4bit, device)


def nf4_config(device: torch.device):
    """QLoRA's quantization (Dettmers et al. 2023): NF4 storage; compute in float32 on
    CPU, where bfloat16 matmuls are slow, and bfloat16 on CUDA."""
    from transformers import BitsAndBytesConfig

    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True)


def count_linear4bit(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def _load_directory(path: Path, model_id: str, source: str, quantize_4bit: bool,
                    device: torch.device) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainingUsageError(f"no usable tokenizer in {path}: {exc}",
                                 reason="tokenizer_missing") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama tokenizers ship without one
    common = dict(local_files_only=True, dtype=torch.float32, device_map={"": device})
    fallback_reason = None
    if quantize_4bit:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=nf4_config(device), **common)
        except Exception as exc:  # noqa: BLE001 - any bnb failure on CPU means "no 4-bit here"
            if device.type != "cpu":
                raise
            fallback_reason = f"{type(exc).__name__}: {exc}"
            log.warning("4-bit NF4 load on CPU failed (%s); falling back to an unquantized "
                        "float32 base", fallback_reason)
            model = AutoModelForCausalLM.from_pretrained(path, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **common)
    quantized = quantize_4bit and fallback_reason is None and count_linear4bit(model) > 0
    log.info("base model %s id=%s quantized=%s device=%s", source, model_id[:16], quantized,
             device)
    return BaseModel(model.eval(), tokenizer, model_id, quantized, device, source,
                     fallback_reason)
