"""exporter.stream.checkpoint against transformers' own saving and loading: checkpoint folders read
tensor by tensor, seeded random weights, random checkpoints written shard by shard."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import IdeficsForVisionText2Text

from exporter.stream import checkpoint
from exporter.stream.checkpoint import (
    RandomSource,
    open_checkpoint,
    plan_checkpoint,
    write_random_checkpoint,
)
from runtime.errors import ModelLoadError
from runtime.reference.sources import GATE_RANGE, build_config, variant_model

SHARD = "200KB"  # the tiny model (2.1 MB in fp32) in several shards


@pytest.fixture(scope="module")
def model() -> IdeficsForVisionText2Text:
    return variant_model("tiny")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def saved(request, model, tmp_path_factory) -> tuple[Path, IdeficsForVisionText2Text]:
    """A sharded safetensors checkpoint written by transformers, and the model it holds."""
    held = copy.deepcopy(model).to(request.param)
    folder = tmp_path_factory.mktemp("safetensors")
    held.save_pretrained(folder, max_shard_size=SHARD)
    return folder, held


def save_bin(model: IdeficsForVisionText2Text, folder: Path, max_shard_size: str | None = SHARD) -> Path:
    """The .bin layout transformers 4 wrote (transformers 5 writes safetensors only): shards split by
    huggingface_hub as save_pretrained splits them, pytorch_model.bin.index.json, or one
    pytorch_model.bin."""
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    model.config.save_pretrained(folder)
    if max_shard_size is None:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, folder / file)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def bin_folder(model, tmp_path_factory) -> Path:
    return save_bin(model, tmp_path_factory.mktemp("bin"))


def assert_same_as(source: checkpoint.TensorSource, held: IdeficsForVisionText2Text) -> None:
    assert source.names() == [name for name, _ in held.named_parameters()] == list(held.state_dict())
    for name, param in held.named_parameters():
        got = source.get(name)
        assert got.dtype == torch.float32 and source.shape(name) == tuple(param.shape)
        assert torch.equal(got, param.detach().float()), name
    assert torch.equal(source.get("lm_head.weight", torch.bfloat16), held.lm_head.weight.detach().bfloat16())
    layer = copy.deepcopy(variant_model("tiny", seed=1).model.layers[0])
    layer.load_state_dict(source.module_state("model.layers.0."), strict=True)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, held.model.layers[0].state_dict()[name].float()), name


# ---------------------------------------------------------------- checkpoint folders
def test_safetensors_shards_read_as_transformers_wrote_them(saved):
    folder, held = saved
    assert len(list(folder.glob("model-*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    with open_checkpoint(folder) as source:
        assert source.where == str(folder)
        assert source.config.to_dict()["hidden_size"] == held.config.hidden_size
        assert_same_as(source, held)


def test_single_safetensors_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    with open_checkpoint(tmp_path) as source:
        assert_same_as(source, model)


def test_bin_shards_are_the_slower_fallback(bin_folder, model, caplog):
    loaded = IdeficsForVisionText2Text.from_pretrained(bin_folder)  # the fixture is a layout transformers loads
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with caplog.at_level(logging.WARNING, logger="exporter.stream.checkpoint"):
        source = open_checkpoint(bin_folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slower fallback" in warnings[0] and "tensor by tensor" in warnings[0]
    with source:
        assert_same_as(source, model)


def test_single_bin_file(model, tmp_path):
    with open_checkpoint(save_bin(model, tmp_path, max_shard_size=None)) as source:
        assert_same_as(source, model)


def test_safetensors_get_reads_one_tensor(saved, monkeypatch):
    folder, _ = saved
    real_safe_open, read, readers = checkpoint.safe_open, [], []

    class Counted:
        def __init__(self, file, framework):
            self.handle = real_safe_open(file, framework=framework)
            self.open = True

        def get_tensor(self, name):
            read.append(name)
            readers.append(self)
            return self.handle.get_tensor(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.open = False

        def __getattr__(self, attr):
            return getattr(self.handle, attr)

    monkeypatch.setattr(checkpoint, "safe_open", Counted)
    with open_checkpoint(folder) as source:
        source.get("model.layers.2.mlp.up_proj.weight")
        assert read == ["model.layers.2.mlp.up_proj.weight"]
        source.module_state("model.layers.1.")
        assert read[1:] == [name for name in source.names() if name.startswith("model.layers.1.")]
        # the data is read through handles closed at once: a shard's pages do not stay mapped
        # (resident) in the process once its tensor is copied out
        assert readers and not any(r.open for r in readers)


def test_bin_holds_one_shard_at_a_time(bin_folder, monkeypatch):
    live, most, loads = [0], [0], []
    real_load = torch.load

    class Shard(dict):
        def __del__(self):
            live[0] -= 1

    def load(file, **kwargs):
        assert kwargs.get("mmap") and kwargs.get("weights_only")
        loads.append(Path(file).name)
        shard = Shard(real_load(file, **kwargs))
        live[0] += 1
        most[0] = max(most[0], live[0])
        return shard

    monkeypatch.setattr(torch, "load", load)
    weight_map = json.loads((bin_folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    with open_checkpoint(bin_folder) as source:
        assert loads == []  # opening reads the index only
        source.get("model.norm.weight")
        assert loads == [weight_map["model.norm.weight"]]
        loads.clear()
        for name in sorted(source.names(), key=weight_map.get):  # shard by shard
            source.get(name)
    assert most[0] == 1
    assert loads == sorted(set(weight_map.values())), "each shard loaded once"


def test_tied_embeddings(tmp_path):
    tied = variant_model("tied-embeddings")
    tied.save_pretrained(tmp_path, max_shard_size=SHARD)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # transformers saves a tied tensor once
    with open_checkpoint(tmp_path) as source:
        assert source.names() == list(tied.state_dict())
        assert torch.equal(source.get("lm_head.weight"), tied.lm_head.weight.detach())
        assert torch.equal(source.get("lm_head.weight"), source.get("model.embed_tokens.weight"))
    random = RandomSource(tied.config)
    assert torch.equal(random.get("lm_head.weight"), random.get("model.embed_tokens.weight"))


# ---------------------------------------------------------------- errors name what is at fault
@pytest.fixture
def copied(saved, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(saved[0], folder)
    return folder


def test_a_folder_without_weights(model, tmp_path):
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("model.safetensors.index.json", "model.safetensors",
                                            "pytorch_model.bin.index.json", "pytorch_model.bin"))


def test_a_tensor_missing_from_the_index(copied):
    index_path = copied / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    index_path.write_text(json.dumps(index))
    with open_checkpoint(copied) as source:
        source.get("model.layers.1.mlp.up_proj.weight")  # the others still read
        with pytest.raises(ModelLoadError) as info:
            source.get("model.layers.1.mlp.down_proj.weight")
    assert "model.layers.1.mlp.down_proj.weight" in str(info.value) and str(index_path) in str(info.value)


def test_a_shard_named_by_the_index_but_absent(copied):
    shard = sorted(copied.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError) as info:
        open_checkpoint(copied)
    assert str(shard) in str(info.value)


def test_a_tensor_of_another_shape(copied):
    config = json.loads((copied / "config.json").read_text())
    config["vocab_size"] = 1000  # the checkpoint's embedding has 1021 rows
    (copied / "config.json").write_text(json.dumps(config))
    with open_checkpoint(copied) as source:
        assert source.shape("model.embed_tokens.weight") == (1000, 64)
        with pytest.raises(ModelLoadError) as info:
            source.get("model.embed_tokens.weight")
    message = str(info.value)
    assert "model.embed_tokens.weight" in message and "(1021, 64)" in message and "(1000, 64)" in message


# ---------------------------------------------------------------- seeded random weights
def meta_state(config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return IdeficsForVisionText2Text(copy.deepcopy(config)).state_dict()


def test_random_source_is_a_function_of_seed_and_name():
    config = build_config("tiny")
    first = RandomSource(config)
    names = first.names()
    forward = {name: first.get(name) for name in names}
    other = RandomSource(config)
    backward = {name: other.get(name) for name in reversed(names)}
    assert all(torch.equal(forward[name], backward[name]) for name in names)
    assert not torch.equal(RandomSource(config, seed=1).get("model.layers.0.self_attn.q_proj.weight"),
                           forward["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(other.get("model.layers.0.mlp.up_proj.weight", torch.bfloat16),
                       forward["model.layers.0.mlp.up_proj.weight"].bfloat16())
    assert RandomSource.preset("tiny", seed=3).where == "random:tiny (seed 3)"


def test_random_source_shapes_and_distributions():
    config = build_config("tiny")
    source = RandomSource(config)
    state = meta_state(config)
    assert source.names() == list(state)
    assert all(source.shape(name) == tuple(t.shape) for name, t in state.items())
    gates = [source.get(name) for name in source.names() if name.endswith(("alpha_cross_attn", "alpha_dense"))]
    assert len(gates) == 4
    low, high = GATE_RANGE
    assert all(((g >= low) & (g <= high)).all() for g in gates) and len({float(g) for g in gates}) == 4
    embed = source.get("model.embed_tokens.weight")  # 1021 x 64
    assert abs(embed.std().item() - config.initializer_range) < 0.03 * config.initializer_range
    assert abs(embed.mean().item()) < 0.01 * config.initializer_range
    assert torch.equal(source.get("model.norm.weight"), torch.ones(64))
    assert torch.equal(source.get("model.vision_model.pre_layrnorm.bias"), torch.zeros(48))
    assert 0.8 < source.get("model.perceiver_resampler.latents").std().item() < 1.2


# ---------------------------------------------------------------- random checkpoints on disk
def test_random_checkpoint_loads_in_transformers(tmp_path):
    config = build_config("tiny")
    folder = write_random_checkpoint(tmp_path / "random", config, seed=7, shard_bytes=100_000, progress=False)
    source = RandomSource(config, seed=7)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["seed"] == 7 and "random" in index["metadata"]["weights"]
    # the layout is huggingface_hub's split of the same tensors, as save_pretrained cuts them
    split = split_torch_state_dict_into_shards({n: source.get(n, torch.bfloat16) for n in source.names()},
                                               max_shard_size=100_000)
    assert len(split.filename_to_tensors) > 2
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    loaded, info = IdeficsForVisionText2Text.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor.float(), source.get(name, torch.bfloat16).float()), name
    with open_checkpoint(folder) as reread:
        assert all(torch.equal(reread.get(n), source.get(n, torch.bfloat16).float()) for n in source.names())


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    written = []

    def fail_second(tensors, filename, metadata=None):
        if written:
            raise OSError("disk full")
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        write_random_checkpoint(tmp_path / "random", build_config("tiny"), shard_bytes=100_000, progress=False)
    assert written and list(tmp_path.iterdir()) == []


def test_random_9b_plan():
    config = build_config("9b")
    plan = plan_checkpoint(config)  # bf16, 1 GiB shards
    parameters = sum(p.numel() for p in meta_state(config).values())
    assert plan.total_parameters == parameters and plan.total_size == 2 * parameters
    assert 17.8e9 < plan.total_size < 18.0e9
    n = len(plan.shards)
    assert list(plan.shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(plan.weight_map) == sorted(meta_state(config))
