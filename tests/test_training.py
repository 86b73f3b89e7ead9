"""training/: tiny base model, NF4 QLoRA on CPU, adapter vectors, deltas, outer steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.adapter import (adapter_bytes, adapter_id, adapter_layout, adapter_vector,
                              load_adapter, load_adapter_bytes, load_adapter_vector,
                              save_adapter, vector_to_adapter_bytes)
from training.data import (DEMO_CORPUS, demo_split, read_local_texts, split_texts,
                           token_blocks, write_demo_shards)
from training.delta import compute_delta, mean_delta
from training.errors import AdapterRejected, TrainingUsageError
from training.evaluation import evaluate
from training.model import build_tiny_model, count_linear4bit, load_base_model, weights_id
from training.outer import DiLoCoOuter, FedAvg, fedavg
from training.qlora import LoRASettings, attach_lora, local_train
from training.vector import VectorLayout, metadata_from_bytes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the test machine is shared: two spinning OpenMP threads per process thrash
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qlora():
    base = load_base_model(None, quantize_4bit=True, device="cpu")
    return base, attach_lora(base, LoRASettings())


@pytest.fixture(scope="module")
def demo_blocks(qlora):
    base, _ = qlora
    split = demo_split(2)
    shards = [token_blocks(base.tokenizer, s, block_len=32) for s in split.shards]
    return shards, token_blocks(base.tokenizer, split.heldout, block_len=32)


# --- base model -------------------------------------------------------------------

def test_tiny_model_builds_identically():
    first, _ = build_tiny_model()
    second, _ = build_tiny_model()
    assert weights_id(first.state_dict().items()) == weights_id(second.state_dict().items())
    changed = first.state_dict()
    changed["lm_head.weight"] = changed["lm_head.weight"] + 1e-3
    assert weights_id(changed.items()) != weights_id(second.state_dict().items())


def test_cpu_base_is_nf4_linear4bit(qlora):
    base, model = qlora
    assert base.quantized and base.fallback_reason is None
    assert count_linear4bit(base.model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    quant_state = base.model.model.layers[0].self_attn.k_proj.weight.quant_state
    assert quant_state.quant_type == "nf4"
    assert base.model_id == weights_id(build_tiny_model()[0].state_dict().items())


def test_model_dir_loads_through_model_path(tmp_path, qlora):
    tiny, tokenizer = build_tiny_model()
    tiny.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_base_model(tmp_path, quantize_4bit=True, device="cpu")
    assert loaded.source == str(tmp_path) and loaded.quantized
    assert loaded.model_id == qlora[0].model_id
    text = "Many hands make light work."
    assert loaded.tokenizer(text)["input_ids"] == qlora[0].tokenizer(text)["input_ids"]


def test_model_dir_errors(tmp_path):
    with pytest.raises(TrainingUsageError) as missing:
        load_base_model(tmp_path / "nope", quantize_4bit=False)
    assert missing.value.reason == "model_not_found"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TrainingUsageError) as empty:
        load_base_model(tmp_path, quantize_4bit=False)
    assert empty.value.reason == "no_safetensors"


def test_lora_settings_are_checked(qlora):
    with pytest.raises(TrainingUsageError) as bad:
        LoRASettings(r=0)
    assert bad.value.reason == "bad_hyperparameter"
    with pytest.raises(TrainingUsageError) as unknown:
        attach_lora(qlora[0], LoRASettings(target_modules=("c_attn",)))
    assert unknown.value.reason == "bad_target_modules"


# --- adapter vectors and bytes -------------------------------------------------------

def test_adapter_vector_round_trip(qlora):
    _, model = qlora
    layout = adapter_layout(model)
    assert list(layout.names) == sorted(layout.names)
    assert all("lora_" in name for name in layout.names)
    original = adapter_vector(model)
    assert original.dtype == np.float32 and original.shape == (layout.size,)
    changed = np.random.default_rng(1).normal(size=layout.size).astype(np.float32)
    try:
        load_adapter_vector(model, changed)
        assert np.array_equal(adapter_vector(model), changed)
        # the first tensor in sorted order holds the first values of the vector
        first = model.get_parameter(layout.names[0].replace(".weight", ".default.weight"))
        assert np.array_equal(first.detach().numpy().ravel(),
                              changed[:first.numel()])
    finally:
        load_adapter_vector(model, original)


def test_adapter_bytes_are_deterministic_and_load_back(qlora, tmp_path):
    _, model = qlora
    original = adapter_vector(model)
    data = adapter_bytes(model)
    assert data == adapter_bytes(model)
    assert data == vector_to_adapter_bytes(adapter_layout(model), original)
    assert not data.startswith(b"\x80")  # not a pickle
    changed = original + np.float32(0.5)
    try:
        load_adapter_vector(model, changed)
        assert adapter_id(adapter_bytes(model)) != adapter_id(data)
        load_adapter_bytes(model, data)
        assert np.array_equal(adapter_vector(model), original)
        saved_id = save_adapter(model, tmp_path)
        assert saved_id == adapter_id(data)
        assert (tmp_path / "adapter_config.json").is_file()
        load_adapter_vector(model, changed)
        assert load_adapter(model, tmp_path) == saved_id
        assert np.array_equal(adapter_vector(model), original)
    finally:
        load_adapter_vector(model, original)


def test_adapter_bad_input_is_rejected(qlora):
    _, model = qlora
    size = adapter_layout(model).size
    cases = [
        (np.zeros(size - 1, np.float32), "size_mismatch"),
        (np.full(size, np.nan, np.float32), "non_finite"),
        (np.zeros((2, size), np.float32), "size_mismatch"),
        (np.zeros(size, np.int64), "bad_dtype"),
    ]
    for vector, reason in cases:
        with pytest.raises(AdapterRejected) as err:
            load_adapter_vector(model, vector)
        assert err.value.reason == reason
    with pytest.raises(AdapterRejected) as garbage:
        load_adapter_bytes(model, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    assert garbage.value.reason == "not_safetensors"
    other = VectorLayout(("x.lora_A.weight",), ((2, 2),))
    with pytest.raises(AdapterRejected) as foreign:
        load_adapter_bytes(model, vector_to_adapter_bytes(other, np.zeros(4, np.float32)))
    assert foreign.value.reason == "layout_mismatch"


# --- delta, FedAvg, DiLoCo ----------------------------------------------------------

def test_delta_and_fedavg_math():
    base = np.array([1.0, -2.0, 0.5], np.float32)
    trained = [np.array([1.5, -2.0, 0.0], np.float32), np.array([0.5, -1.0, 1.5], np.float32)]
    deltas = [compute_delta(base, t) for t in trained]
    assert np.allclose(deltas[0], [0.5, 0.0, -0.5])
    mean = mean_delta(deltas)
    assert np.allclose(mean, [0.0, 0.5, 0.25])
    # FedAvg with lr 1 lands on the mean of the trained vectors
    assert np.allclose(fedavg(base, mean), np.mean(trained, axis=0))
    assert np.allclose(FedAvg(lr=0.5).step(base, mean), base + 0.5 * mean)
    with pytest.raises(AdapterRejected) as size:
        mean_delta([np.zeros(3, np.float32), np.zeros(4, np.float32)])
    assert size.value.reason == "size_mismatch"
    with pytest.raises(TrainingUsageError) as none:
        mean_delta([])
    assert none.value.reason == "no_contributions"
    with pytest.raises(AdapterRejected):
        fedavg(base, np.array([0.0, np.inf, 0.0], np.float32))
    with pytest.raises(TrainingUsageError):
        fedavg(base, mean, lr=-1.0)


def test_diloco_nesterov_matches_hand_computation():
    lr, mu = 0.7, 0.9
    base = np.array([1.0, 2.0], np.float32)
    d1 = np.array([0.1, -0.2], np.float32)
    d2 = np.array([0.3, 0.1], np.float32)
    outer = DiLoCoOuter(lr, momentum=mu, nesterov=True)
    # round 1: g = -d1 = [-0.1, 0.2]; m = g; update = g + mu*m = 1.9*g
    # new = base - 0.7 * 1.9 * g = [1 + 0.133, 2 - 0.266]
    after1 = outer.step(base, d1)
    assert np.allclose(after1, [1.133, 1.734], atol=1e-6)
    # round 2: g = [-0.3, -0.1]; m = 0.9*[-0.1, 0.2] + g = [-0.39, 0.08]
    # update = g + 0.9*m = [-0.651, -0.028]; new = after1 - 0.7*update
    after2 = outer.step(after1, d2)
    assert np.allclose(after2, [1.133 + 0.4557, 1.734 + 0.0196], atol=1e-6)
    assert outer.steps == 2


def test_diloco_matches_torch_sgd_and_persists(tmp_path):
    rng = np.random.default_rng(7)
    base = rng.normal(size=50).astype(np.float32)
    deltas = [rng.normal(scale=0.1, size=50).astype(np.float32) for _ in range(4)]
    param = torch.nn.Parameter(torch.from_numpy(base.copy()))
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    outer = DiLoCoOuter(0.7)
    vector = base
    for index, delta in enumerate(deltas):
        param.grad = torch.from_numpy(-delta)
        sgd.step()
        if index == 2:  # a validator restarts mid-run from its saved momentum
            outer.save_state(tmp_path / "outer.safetensors")
            outer = DiLoCoOuter(0.7)
            outer.load_state(tmp_path / "outer.safetensors")
            assert outer.steps == 2
        vector = outer.step(vector, delta)
        assert np.allclose(vector, param.detach().numpy(), atol=1e-5)
    plain = DiLoCoOuter(0.7, nesterov=False)
    assert not np.allclose(plain.step(base, deltas[0]) - base, 0.0)


def test_outer_state_bad_input():
    fedavg_state = FedAvg().state_bytes()
    assert metadata_from_bytes(fedavg_state)["optimizer"] == "fedavg"
    with pytest.raises(AdapterRejected) as kind:
        DiLoCoOuter(0.7).load_state_bytes(fedavg_state)
    assert kind.value.reason == "optimizer_state_mismatch"
    outer = DiLoCoOuter(0.7)
    outer.step(np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(AdapterRejected) as size:
        outer.step(np.zeros(4, np.float32), np.ones(4, np.float32))
    assert size.value.reason == "size_mismatch"
    with pytest.raises(TrainingUsageError):
        DiLoCoOuter(0.7, momentum=1.0)


# --- data -----------------------------------------------------------------------------

def test_demo_split_is_deterministic_and_disjoint():
    texts = read_local_texts(DEMO_CORPUS)
    assert 200 <= len(texts) and DEMO_CORPUS.stat().st_size < 300_000
    split = demo_split(3)
    assert split == demo_split(3)
    placed = [t for shard in split.shards for t in shard] + list(split.heldout)
    assert sorted(placed) == sorted(texts)
    assert all(len(shard) > 30 for shard in split.shards) and len(split.heldout) > 10
    # a text's place depends on the text only
    assert split_texts(texts[:50], 3).heldout == tuple(t for t in split.heldout if t in texts[:50])


def test_local_files_and_their_errors(tmp_path):
    paths = write_demo_shards(tmp_path / "demo", 2)
    assert [p.name for p in paths] == ["shard-0.jsonl", "shard-1.jsonl"]
    assert tuple(read_local_texts(paths[1])) == demo_split(2).shards[1]
    (tmp_path / "notes.txt").write_text("first line\n\n  second line \n")
    assert read_local_texts(tmp_path / "notes.txt") == ["first line", "second line"]
    bad = tmp_path / "bad.jsonl"
    for content, reason in [('{"text": "ok"}\nnot json\n', "bad_data_format"),
                            (json.dumps({"body": "x"}) + "\n", "bad_data_format")]:
        bad.write_text(content)
        with pytest.raises(TrainingUsageError) as err:
            read_local_texts(bad)
        assert err.value.reason == reason
    assert ":2:" in str(pytest.raises(TrainingUsageError, read_local_texts,
                                      _write(bad, '{"text": "a"}\n[1]\n')).value)
    with pytest.raises(TrainingUsageError) as missing:
        read_local_texts(tmp_path / "absent.jsonl")
    assert missing.value.reason == "no_data"


def _write(path, content):
    path.write_text(content)
    return path


def test_token_blocks(qlora):
    tokenizer = qlora[0].tokenizer
    blocks = token_blocks(tokenizer, ["abc", "de"], block_len=3)
    # bytes + EOS after each text: a b c </s> d e </s> -> two full blocks of 3
    assert blocks.shape == (2, 3)
    assert blocks[0, 3 - 1].item() == tokenizer(["c"], add_special_tokens=False)["input_ids"][0][0]
    assert blocks[1, 0].item() == tokenizer.eos_token_id
    with pytest.raises(TrainingUsageError) as short:
        token_blocks(tokenizer, ["a"], block_len=64)
    assert short.value.reason == "not_enough_data"


# --- local rounds -----------------------------------------------------------------------

def test_local_train_delta_is_trained_minus_base(qlora, demo_blocks):
    _, model = qlora
    shards, _ = demo_blocks
    base = adapter_vector(model)
    update = local_train(model, base, shards[0], steps=3, lr=1e-2, batch_size=4, seed=5)
    assert update.delta.dtype == np.float32 and update.delta.shape == base.shape
    assert np.array_equal(update.delta, adapter_vector(model) - base)
    assert np.any(update.delta != 0) and np.isfinite(update.train_loss)
    again = local_train(model, base, shards[0], steps=3, lr=1e-2, batch_size=4, seed=5)
    assert np.array_equal(again.delta, update.delta)  # seeded: the same round, the same delta
    with pytest.raises(TrainingUsageError) as bad:
        local_train(model, base, shards[0], steps=0, lr=1e-2, batch_size=4, seed=0)
    assert bad.value.reason == "bad_hyperparameter"
    load_adapter_vector(model, base)


def test_eval_loss_falls_over_fedavg_rounds(qlora, demo_blocks):
    _, model = qlora
    shards, heldout = demo_blocks
    vector = adapter_vector(model)
    before = evaluate(model, heldout)
    history = [before.loss]
    for round_index in range(2):
        updates = [local_train(model, vector, shard, steps=10, lr=2e-2, batch_size=8,
                               seed=100 * round_index + trainer)
                   for trainer, shard in enumerate(shards)]
        vector = fedavg(vector, mean_delta([u.delta for u in updates]))
        load_adapter_vector(model, vector)
        history.append(evaluate(model, heldout).loss)
    assert history[1] < history[0] and history[2] < history[1], history
    assert evaluate(model, heldout).perplexity < before.perplexity


def test_cpu_4bit_failure_falls_back_explicitly(monkeypatch, caplog):
    import training.model as model_module

    def broken_nf4(device):
        raise RuntimeError("no NF4 kernel for this CPU")

    monkeypatch.setattr(model_module, "nf4_config", broken_nf4)
    with caplog.at_level("WARNING", logger="training.model"):
        base = load_base_model(None, quantize_4bit=True, device="cpu")
    assert not base.quantized and count_linear4bit(base.model) == 0
    assert base.fallback_reason == "RuntimeError: no NF4 kernel for this CPU"
    assert "falling back to an unquantized" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_the_same_nf4_path(demo_blocks):
    base = load_base_model(None, quantize_4bit=True, device="cuda")
    assert base.quantized and count_linear4bit(base.model) == 14
    model = attach_lora(base)
    shards, heldout = demo_blocks
    start = adapter_vector(model)
    update = local_train(model, start, shards[0], steps=5, lr=2e-2, batch_size=8, seed=0)
    assert update.delta.shape == start.shape and np.any(update.delta != 0)
    assert np.isfinite(evaluate(model, heldout).loss)


def test_package_exports_are_the_functions_not_submodules():
    # a submodule named like an export shadowed it once (training.evaluate)
    import importlib

    import training

    for name in training.__all__:
        value = getattr(training, name)
        assert not isinstance(value, type(training)), name
        importlib.import_module(training._EXPORTS[name])
        assert getattr(training, name) is value
