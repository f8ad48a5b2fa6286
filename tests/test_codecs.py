"""Hidden-state codecs below 8 bits: the pure encode/decode pairs and their error bounds, and a
cache stored with one (same bytes on a rerun and after kill -9, verified, decoded in the step)."""

import copy
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml

from cache_format.encode import (
    FOUR_BIT_LEVELS,
    decode_hidden,
    decode_hidden_tensor,
    dequantize_4bit,
    encode_hidden,
    int4_group,
    quantize_4bit,
    rotate,
    stored_hidden_width,
    unrotate,
)
from cache_format.kd_modes import KD_MODES
from cache_format.reader import CacheReader
from cache_format.verify import verify_cache
from student_train.config import DataConfig
from student_train.data import CacheBatches, FieldSelection, to_device
from tests.conftest import assert_same_arrays
from tests.test_faults import build, cli, env


def outlier_states(*shape: int) -> torch.Tensor:
    """Hidden-state-like values: per-token magnitudes and a few outlier dimensions, as BERT's."""
    torch.manual_seed(3)
    h = torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 4
    h[..., 5] *= 25.0
    return h


@pytest.mark.parametrize("width", [32, 64, 384, 768])
def test_rotation_is_orthonormal_and_its_own_inverse_per_token(width):
    h = outlier_states(4, 7, width)
    y = rotate(h)
    torch.testing.assert_close(y.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unrotate(y), h, rtol=0, atol=1e-4)
    # butterflies only: a token's rotation does not depend on the batch it sits in (same cache
    # bytes whatever the capture's batch size or process count)
    assert torch.equal(rotate(h[1:2, 3:4]), y[1:2, 3:4])
    # it spreads the outlier: the largest rotated element is far below the largest input one
    assert y.abs().amax() < 0.5 * h.abs().amax()


@pytest.mark.parametrize("codec", list(FOUR_BIT_LEVELS))
@pytest.mark.parametrize("width", [32, 384, 768])
def test_4bit_codes_are_the_nearest_level_in_the_rotated_basis(width, codec):
    h = outlier_states(5, 9, width)
    h[0, 0] = 0.0  # an all-zero token (padding) encodes to zeros
    packed, scale = quantize_4bit(h, codec)
    group = int4_group(width)
    assert packed.shape == (5, 9, width // 2) and packed.dtype == torch.uint8
    assert scale.shape == (5, 9, width // group) and scale.dtype == torch.float16
    assert stored_hidden_width(width, codec) == (width // 2, width // group)
    back = dequantize_4bit(packed, scale, codec)
    # in the coded basis every value sits on its nearest level: the error is at most half the
    # widest gap between levels times the group's absmax (the rotation is orthonormal, so a
    # token's error norm is the same in both bases)
    levels = torch.tensor(FOUR_BIT_LEVELS[codec])
    absmax = scale.float().repeat_interleave(group, -1)
    rotated, decoded = rotate(h), rotate(back)
    error = (decoded - rotated).abs()
    nearest = (rotated.unsqueeze(-1) / absmax.clamp_min(1e-30).unsqueeze(-1) - levels).abs().amin(-1) * absmax
    assert (error <= nearest + 1e-4 * (1 + absmax)).all()
    assert (error <= absmax * float((levels[1:] - levels[:-1]).max()) / 2 + 1e-4 * (1 + absmax)).all()
    assert (back[0, 0] == 0).all()
    # the stated bound on what a student sees: on these outlier-heavy states a token's relative
    # error stays under 15 % (docs/results/fidelity.md: 9.5 % (nf4) and 11.6 % (int4) on the
    # shared teacher's states)
    relative = (back - h).norm(dim=-1)[1:] / h.norm(dim=-1)[1:]
    assert float(relative.max()) < 0.15
    stored, stored_scale = encode_hidden(h, codec)
    assert torch.equal(decode_hidden(stored, stored_scale, codec), back)


def test_4bit_packs_the_low_nibble_first():
    h = torch.zeros(1, 32)
    h[0, 0], h[0, 1] = 1.0, -1.0  # in the rotated basis: the extreme levels of a group of absmax 1
    packed, scale = quantize_4bit(unrotate(h), "int4")
    lo, hi = packed[0, 0] & 15, packed[0, 0] >> 4
    assert (int(lo) - 8, int(hi) - 8) == (7, -7)
    assert float(scale[0, 0]) == pytest.approx(1.0, rel=1e-3)
    packed, _ = quantize_4bit(unrotate(h), "nf4")
    assert (int(packed[0, 0] & 15), int(packed[0, 0] >> 4)) == (15, 0)


# ----------------------------------------------------------------------------- a cache stored as nf4


@pytest.fixture
def int4_cfg(cache_cfg):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"] = {"logits": "none", "hidden_dtype": "nf4"}
    raw["store"].update(block_rows=2, shard_rows=4)
    return raw


@pytest.mark.integration
def test_an_nf4_cache_is_the_same_bytes_on_a_rerun_and_after_kill_9(int4_cfg, tmp_path):
    reference = build(int4_cfg, output=str(tmp_path / "reference"))
    assert verify_cache(reference).problems == []
    reader = CacheReader(reference)
    spec = reader.fields["hidden"]
    width = reader.settings.teacher.hidden_size
    assert (spec.dtype, spec.logical_dtype, spec.row_shape[-1]) == ("uint8", "nf4", width // 2)
    assert reader.fields["hidden_scale"].row_shape[-1] == width // int4_group(width)
    assert_same_arrays(build(int4_cfg, output=str(tmp_path / "again")), reference)
    for i, delay in enumerate((0.3, 1.0)):  # a kill early and one late in the capture, then a resume
        out = tmp_path / f"kill-{i}"
        raw = dict(int4_cfg, store=dict(int4_cfg["store"], output=str(out)))
        config = tmp_path / f"kill-{i}.yaml"
        config.write_text(yaml.safe_dump({"cache": raw}))
        proc = subprocess.Popen(cli("cache-teacher", "--config", str(config)), env=env(), stderr=subprocess.DEVNULL)
        while not (out / "cache.json").exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        build(raw)
        assert verify_cache(out).problems == []
        assert_same_arrays(out, reference)


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_the_step_decodes_as_the_host_does(int4_cfg, tmp_path, codec):
    """The data path ships the stored codes and scales; decoding them inside the step gives the
    host decoding (what the DataLoader workers did before) bit for bit, on any CPU."""
    raw = copy.deepcopy(int4_cfg)
    raw["outputs"]["hidden_dtype"] = codec
    cache = build(raw, output=str(tmp_path / "cache"))
    reader = CacheReader(cache)
    data = DataConfig(micro_batch_size=4, num_workers=0, mix_blocks=1, local_cache_gb=0)
    fields = FieldSelection.for_run(reader.settings, set(reader.fields), KD_MODES["exact"], True, 2.0, None)
    batch = next(iter(CacheBatches(reader, data, fields, 56, 1, 0, 1)))
    assert batch["hidden"].dtype == {"int8": torch.int8, "nf4": torch.uint8}[codec], "the workers ship the codes"
    decoded = to_device(batch, reader.settings, torch.device("cpu"))["hidden"]
    host = decode_hidden(batch["hidden"].numpy(), batch["hidden_scale"].numpy(), codec)
    assert torch.equal(decoded, host)
    assert torch.equal(decode_hidden_tensor(batch["hidden"], batch["hidden_scale"], codec), host)
    lengths = batch["lengths"].numpy()
    pad = np.arange(decoded.shape[1])[None, :] >= lengths[:, None]
    assert (decoded[torch.from_numpy(pad)] == 0).all(), "padding decodes to zeros"
