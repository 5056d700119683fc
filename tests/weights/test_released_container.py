"""Released checkpoint files: read without running pickled code, the task's container checked, and every bad file
(truncated, damaged, another task's, one that needs code to unpickle) a named error before anything is written."""
from __future__ import annotations

import argparse
import collections
import os
import zipfile

import numpy as np
import pytest
import torch

from tests.helpers.original_vpd import SCHEDULE_BUFFERS
from vpd_jax.weights.released import ReleasedCheckpointError, map_released, read_released
from vpd_jax.weights.released.container import read_archive

UNET = "unet.unet.diffusion_model."


def _seg_state() -> "collections.OrderedDict":
    """The key layout of a VPDSeg state dict, tiny tensors."""
    keys = [f"{UNET}input_blocks.0.0.weight", f"{UNET}input_blocks.1.0.in_layers.0.weight", f"{UNET}out.2.weight",
            "encoder_vq.encoder.conv_in.weight", "encoder_vq.quant_conv.weight", "encoder_vq.post_quant_conv.weight",
            "text_adapter.fc.0.weight", "gamma", "neck.lateral_convs.0.conv.weight", "decode_head.conv_seg.weight",
            "decode_head.scale_heads.0.0.bn.num_batches_tracked", "class_embeddings",
            *(f"sd_model.{name}" for name in SCHEDULE_BUFFERS)]
    return collections.OrderedDict((k, torch.ones(2)) for k in keys)


def _save_seg(path, **extra):
    torch.save({"meta": {"CLASSES": ("wall",), "iter": 80000}, "state_dict": _seg_state(), **extra}, path)
    return str(path)


def test_a_seg_container_is_read_and_its_buffers_dropped_with_reasons(tmp_path):
    state = read_released(_save_seg(tmp_path / "seg.pth"), "seg")
    mapped = map_released(state, "seg", {})
    np.testing.assert_array_equal(mapped.constants["class_embeddings"], np.ones(2))
    assert {f"sd_model.{name}" for name in SCHEDULE_BUFFERS} <= set(mapped.dropped)
    assert {f"{UNET}out.2.weight", "encoder_vq.post_quant_conv.weight",
            "decode_head.scale_heads.0.0.bn.num_batches_tracked"} <= set(mapped.dropped)
    assert {"unet.conv_in.weight", "text_adapter.gamma", "head.decode_head.conv_seg.weight",
            "head.neck.lateral_convs.0.conv.weight", "vae.quant_conv.weight"} <= set(mapped.renamed)
    assert mapped.origin["text_adapter.gamma"] == "gamma"


def test_ddp_prefix_is_removed_from_depth_files(tmp_path):
    keys = ["encoder.layer1.0.weight", "decoder.deconv_layers.0.weight", f"encoder.{UNET}input_blocks.0.0.weight"]
    torch.save({"model": {f"module.{k}": torch.zeros(1) for k in keys}}, tmp_path / "best.ckpt")
    assert sorted(read_released(str(tmp_path / "best.ckpt"), "depth")) == sorted(keys)


def test_a_file_of_another_task_names_the_task_it_is(tmp_path):
    path = _save_seg(tmp_path / "seg.pth")
    with pytest.raises(ReleasedCheckpointError, match=r"not a released VPD referring.*import it with task 'seg'"):
        read_released(path, "refer")
    with pytest.raises(ReleasedCheckpointError, match=r"under 'model'.*\['meta', 'state_dict'\]"):
        read_released(path, "depth")


def test_truncated_and_damaged_files_are_named(tmp_path):
    path = _save_seg(tmp_path / "seg.pth")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleasedCheckpointError, match="truncated.pth.*truncated"):
        read_released(str(truncated), "seg")

    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(path) as source:
        start = next(info for info in source.infolist() if "/data/" in info.filename).header_offset
    name_length, extra_length = (int.from_bytes(data[start + i:start + i + 2], "little") for i in (26, 28))
    offset = start + 30 + name_length + extra_length  # the first byte of the tensor's data (local file header)
    corrupt = bytearray(data)
    corrupt[offset] ^= 0xFF  # one byte of a tensor: the CRC check fails
    damaged.write_bytes(bytes(corrupt))
    with pytest.raises(ReleasedCheckpointError, match="damaged.pth.*corrupt"):
        read_released(str(damaged), "seg")


def test_the_refer_container_with_its_argparse_namespace_is_read(tmp_path):
    keys = ["classifier.conv1_4.weight", f"{UNET}input_blocks.0.0.weight"]
    torch.save({"model": {k: torch.zeros(1) for k in keys}, "epoch": 3, "optimizer": {}, "lr_scheduler": {},
                "args": argparse.Namespace(token_length=40, model_id="refcoco")}, tmp_path / "refer.pth")
    container = read_archive(str(tmp_path / "refer.pth"))
    assert container["args"].token_length == 40
    assert sorted(read_released(str(tmp_path / "refer.pth"), "refer")) == sorted(keys)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_file_that_needs_code_to_unpickle_is_refused(tmp_path):
    path = _save_seg(tmp_path / "evil.pth", optimizer=_Exploit())
    with pytest.raises(ReleasedCheckpointError, match="evil.pth.*refusing"):
        read_released(path, "seg")
