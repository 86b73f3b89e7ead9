"""Training: QLoRA fine-tuning of the shared adapter, deltas, the outer optimizer.

The public surface is re-exported here lazily (PEP 562), so that `training.digits` or
the vector and outer-step code can be used without importing transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainingUsageError": "training.errors", "AdapterRejected": "training.errors",
    "DataError": "training.errors",
    "VectorLayout": "training.vector", "check_vector": "training.vector",
    "content_id": "training.vector",
    "TinyModelSpec": "training.model", "BaseModel": "training.model",
    "load_base_model": "training.model", "build_tiny_model": "training.model",
    "count_linear4bit": "training.model",
    "adapter_vector": "training.adapter", "load_adapter_vector": "training.adapter",
    "adapter_layout": "training.adapter", "adapter_bytes": "training.adapter",
    "load_adapter_bytes": "training.adapter", "vector_to_adapter_bytes": "training.adapter",
    "adapter_id": "training.adapter", "save_adapter": "training.adapter",
    "load_adapter": "training.adapter",
    "LoRASettings": "training.qlora", "attach_lora": "training.qlora",
    "local_train": "training.qlora",
    "LocalUpdate": "training.delta", "compute_delta": "training.delta",
    "mean_delta": "training.delta",
    "OuterOptimizer": "training.outer", "FedAvg": "training.outer",
    "DiLoCoOuter": "training.outer", "fedavg": "training.outer",
    "EvalResult": "training.evaluation", "evaluate": "training.evaluation",
    "load_texts": "training.data", "read_local_texts": "training.data", "split_texts": "training.data",
    "demo_split": "training.data", "write_demo_shards": "training.data",
    "token_blocks": "training.data", "DEMO_CORPUS": "training.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
