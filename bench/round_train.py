"""One trainer's local round on the tiny model: seconds per step, 4-bit NF4 vs float32.

Both bases are built in the same run from the same seed and trained on the same demo
shard with the same seeds; the baseline is the unquantized float32 base, so the ratio
is what NF4 (dequantize on every matmul) costs on this machine.

    .venv/bin/python bench/round_train.py --steps 20 --batch 8 --block 64 --threads 1

Last line: round_train device=cpu steps=K nf4_s_per_step=x fp32_s_per_step=y ratio=x/y
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.adapter import adapter_layout, adapter_vector  # noqa: E402
from training.data import demo_split, token_blocks  # noqa: E402
from training.model import load_base_model  # noqa: E402
from training.qlora import LoRASettings, attach_lora, local_train  # noqa: E402


def time_rounds(quantize: bool, args: argparse.Namespace) -> tuple[float, int, bool]:
    base = load_base_model(None, quantize_4bit=quantize, device=args.device)
    model = attach_lora(base, LoRASettings(r=args.rank))
    blocks = token_blocks(base.tokenizer, demo_split(2).shards[0], block_len=args.block)
    start = adapter_vector(model)
    local_train(model, start, blocks, steps=2, lr=1e-2, batch_size=args.batch, seed=0)  # warm-up
    per_step = [local_train(model, start, blocks, steps=args.steps, lr=1e-2,
                            batch_size=args.batch, seed=seed).seconds_per_step
                for seed in range(args.repeats)]
    return statistics.median(per_step), adapter_layout(model).size, base.quantized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds timed; median reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nf4, size, quantized = time_rounds(True, args)
    fp32, _, _ = time_rounds(False, args)
    print(f"adapter values={size} vector_bytes={size * 4} nf4_used={quantized} "
          f"torch_threads={torch.get_num_threads()}")
    print(f"round_train device={args.device} steps={args.steps} batch={args.batch}x{args.block} "
          f"nf4_s_per_step={nf4:.4f} fp32_s_per_step={fp32:.4f} ratio={nf4 / fp32:.2f} "
          f"nf4_round_s={nf4 * args.steps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
