"""Per-task state on disk: bit-mask packing and the writer's side files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from supermerge.engine.task_state import mask_name, pack_mask, packed_size, unpack_mask
from supermerge.errors import OutputError
from supermerge.io import CheckpointWriter, open_checkpoint

# --- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (8,), (9,), (13,), (3, 5), (2, 3, 4),
                                   (4, 0, 2)])
def test_pack_round_trips(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    mask = torch.rand(shape, generator=gen) > 0.5
    packed = pack_mask(mask)
    numel = mask.numel()
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (packed_size(numel),)
    assert packed_size(numel) == -(-numel // 8)
    back = unpack_mask(packed, shape)
    assert back.dtype == torch.bool and back.shape == mask.shape and torch.equal(back, mask)


def test_bit_order_is_little_and_padding_is_zero():
    mask = torch.tensor([True, False, False, False, False, False, False, True, True, True])
    # byte 0: bits 0 and 7 -> 1 + 128; byte 1: bits 0 and 1 -> 3 (the rest padding, zero)
    assert pack_mask(mask).tolist() == [129, 3]
    assert np.array_equal(pack_mask(mask).numpy(), np.packbits(mask.numpy(), bitorder="little"))


def test_all_true_and_all_false_masks():
    for value in (True, False):
        mask = torch.full((3, 3), value)
        assert torch.equal(unpack_mask(pack_mask(mask), (3, 3)), mask)


def test_unpack_refuses_a_mask_of_another_size():
    packed = pack_mask(torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"uint8\[1\]"):
        unpack_mask(packed, (8,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(packed.to(torch.int16), (9,))


def test_mask_names():
    assert mask_name(3, "model.layers.0.mlp.weight") == "mask.3.model.layers.0.mlp.weight"


# --- side files of the writer -------------------------------------------------------------

SIDE = "task_state.safetensors"


def _side_layout(tensors):
    return {SIDE: [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]}


@pytest.mark.parametrize("mode", ["buffered", "layout"])
def test_side_files_are_published_with_the_model(tmp_path, mode):
    model = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    side = {"mask.0.w": pack_mask(torch.tensor([True] * 6)), "mask.1.w": torch.zeros(1,
            dtype=torch.uint8), "scalar": torch.tensor(2.5)}
    layout = [(n, tuple(t.shape), t.dtype) for n, t in model.items()] if mode == "layout" else None
    with CheckpointWriter(tmp_path / "out", layout=layout, side_files=_side_layout(side),
                          shard_size=30) as writer:
        for name in reversed(list(side)):  # any order
            writer.add_side(SIDE, name, side[name])
        for name, tensor in model.items():
            writer.add(name, tensor)
        out = writer.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert SIDE not in index["weight_map"].values()  # not part of the weights
    with open_checkpoint(out) as ckpt:
        assert set(ckpt.names()) == set(model)
    with safe_open(out / SIDE, "pt") as f:
        assert sorted(f.keys()) == sorted(side)
        for name, tensor in side.items():
            assert torch.equal(f.get_tensor(name), tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_missing_side_tensor_refuses_the_commit(tmp_path):
    side = {"a": torch.ones(2), "b": torch.ones(3)}
    with CheckpointWriter(tmp_path / "out", side_files=_side_layout(side)) as writer:
        writer.add("w", torch.ones(2))
        writer.add_side(SIDE, "a", side["a"])
        with pytest.raises(OutputError, match="never added") as err:
            writer.commit()
    assert err.value.tensor == "b"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_side_file_misuse_is_reported(tmp_path):
    side = {"a": torch.ones(2)}
    with CheckpointWriter(tmp_path / "out", side_files=_side_layout(side)) as writer:
        with pytest.raises(OutputError, match="not a side file"):
            writer.add_side("other.safetensors", "a", side["a"])
        with pytest.raises(OutputError, match="not in the writer's layout"):
            writer.add_side(SIDE, "zzz", torch.ones(2))
        with pytest.raises(OutputError, match="layout says"):
            writer.add_side(SIDE, "a", torch.ones(3))
    assert list(tmp_path.iterdir()) == []
    with CheckpointWriter(tmp_path / "out2", side_files=_side_layout(side)) as writer:
        writer.add_side(SIDE, "a", side["a"])
        with pytest.raises(OutputError, match="added twice"):
            writer.add_side(SIDE, "a", side["a"])
        writer.add("a", torch.ones(1))  # the same name in the weights is another tensor


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors",
                                  "shard-00001.safetensors", "sub/masks.safetensors",
                                  "masks.json", "../masks.safetensors"])
def test_side_file_names_cannot_take_the_weights_names(tmp_path, name):
    with pytest.raises(OutputError, match="cannot be a side file"):
        CheckpointWriter(tmp_path / "out", side_files={name: []})
    assert list(tmp_path.iterdir()) == []


def test_write_text_cannot_replace_a_side_file(tmp_path):
    with CheckpointWriter(tmp_path / "out", side_files={SIDE: []}) as writer, \
            pytest.raises(OutputError, match="clash"):
        writer.write_text(SIDE, "x")
