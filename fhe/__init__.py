"""Concrete-ML FHE inference: model zoo, compiled bundles, challenge inputs, miner engine.

Validator side: compile_model / load_manifest, ValidatorClient, draw_challenge_input.
Miner side: FheEngine. Nothing here touches the network (node/roles/ does).
"""

from fhe.bundle import (
    BundleError,
    BundleHashMismatch,
    Comparison,
    MalformedResult,
    Manifest,
    ValidatorClient,
    compare_logits,
    cosine_similarity,
    load_manifest,
)
from fhe.compile import compile_model
from fhe.engine import (
    BadIterations,
    EngineError,
    FheEngine,
    ForeignKey,
    KeyCacheFull,
    MalformedCiphertext,
    MalformedKey,
    OversizedInput,
    Timeout,
    TooManyIterations,
    UnknownKey,
)
from fhe.inputs import ChallengeInput, draw_challenge_input
from fhe.zoo import ZOO, CompileSettings, ModelSpec, ZooError, get_model

__all__ = [
    "ZOO", "BadIterations", "BundleError", "BundleHashMismatch", "ChallengeInput",
    "Comparison", "CompileSettings", "EngineError", "FheEngine", "ForeignKey", "KeyCacheFull",
    "MalformedCiphertext", "MalformedKey", "MalformedResult", "Manifest", "ModelSpec",
    "OversizedInput", "Timeout", "TooManyIterations", "UnknownKey", "ValidatorClient",
    "ZooError", "compare_logits", "compile_model", "cosine_similarity",
    "draw_challenge_input", "get_model", "load_manifest",
]
