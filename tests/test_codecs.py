"""Hidden-state codecs below 8 bits (4-bit, and the fitted pq and pca): the pure encode/decode
pairs and their error bounds, and caches stored with them (same bytes on a rerun and after
kill -9, verified, decoded in the step, a damaged codebook refused, `auto` choosing by budget)."""

import copy
import hashlib
import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml

from cache_format import fitted
from cache_format.encode import FOUR_BIT_LEVELS, dequantize_4bit, int4_group, quantize_4bit, rotate, unrotate
from cache_format.fitted import FIT_FILE, assign_eager, decode_fitted, encode_fitted, fit_bytes, fit_pca, fit_pq
from cache_format.hidden import decode_hidden, decode_hidden_tensor, encode_hidden, stored_hidden_width
from cache_format.kd_modes import KD_MODES
from cache_format.reader import CacheReader
from cache_format.verify import verify_cache
from pipeline.errors import CacheError
from student_train.config import DataConfig
from student_train.data import CacheBatches, FieldSelection, to_device
from teacher_cache.report import summary
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


# ----------------------------------------------------------------------------- fitted codecs


def test_pq_codes_are_the_nearest_centroid_and_the_fit_is_the_same_bytes():
    h = outlier_states(600, 32)
    h[:40] = 0.0  # padding: code 0, the fixed zero centroid
    fit = fit_pq(h, 8, seed=0)
    book = fit["codebook"]
    assert book.shape == (8, 256, 4) and (book[:, 0] == 0).all()
    assert fit_bytes(fit_pq(h, 8, seed=0)) == fit_bytes(fit), "same sample and seed: the same bytes"
    assert fit_bytes(fit_pq(h, 8, seed=1)) != fit_bytes(fit)
    codes, scale = encode_fitted(h, "pq", fit)
    assert scale is None and codes.dtype == torch.uint8 and codes.shape == (600, 8)
    assert (codes[:40] == 0).all() and (decode_fitted(codes, None, "pq", fit)[:40] == 0).all()
    sub = h.view(600, 8, 1, 4)
    distances = ((sub - book[None]) ** 2).sum(-1)  # (N, M, 256)
    chosen = distances.gather(-1, codes.long()[..., None])[..., 0]
    assert (chosen <= distances.amin(-1) + 1e-4 * (1 + distances.amin(-1))).all(), "each code is the nearest"
    x = h.view(600, 8, 4).transpose(0, 1)
    eager = assign_eager(x, book, (book * book).sum(-1)[:, None, :])
    assert not fitted._compiler["failed"], "the compiled search ran"
    assert torch.equal(eager.T.to(torch.uint8), codes), "compiled and eager search pick the same centroids"
    back = decode_fitted(codes, None, "pq", fit)
    assert torch.equal(back.view(600, 8, 4), book[torch.arange(8), codes.long()])
    # k-means beats its own start: fitted centroids cut the error of 256 random pilot points
    start = {"codebook": torch.cat((torch.zeros(8, 1, 4), h[40:295].view(255, 8, 4).transpose(0, 1)), 1)}
    error = (back - h).norm() / h.norm()
    assert error < 0.8 * (decode_fitted(encode_fitted(h, "pq", start)[0], None, "pq", start) - h).norm() / h.norm()


def test_pca_keeps_the_top_components_and_its_error_is_the_discarded_energy():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32))[0]
    h = (torch.randn(2000, 32) * torch.linspace(4, 0.01, 32)) @ basis.T  # decaying spectrum
    fit = fit_pca(h, 8)
    assert fit["basis"].shape == (32, 8)
    assert torch.allclose(fit["basis"].T @ fit["basis"], torch.eye(8), atol=1e-5), "orthonormal"
    assert fit_bytes(fit_pca(h, 8)) == fit_bytes(fit)
    codes, scale = encode_fitted(h, "pca", fit)
    assert codes.dtype == torch.int8 and codes.shape == (2000, 8) and scale.shape == (2000,)
    back = decode_fitted(codes, scale, "pca", fit)
    projection = h @ fit["basis"] @ fit["basis"].T
    values = torch.linalg.eigvalsh(h.double().T @ h.double() / len(h)).flip(0)
    discarded = float(values[8:].sum() / values.sum())
    assert float(((projection - h) ** 2).sum() / (h**2).sum()) == pytest.approx(discarded, rel=1e-3)
    # int8 rounding of the coefficients adds at most half a step per coefficient
    step = scale.float()[:, None] / 2
    assert ((h @ fit["basis"] - codes.float() * scale.float()[:, None]).abs() <= step * 1.001 + 1e-6).all()
    assert (back - projection).norm() / h.norm() < 0.02
    assert (decode_fitted(*encode_fitted(torch.zeros(3, 32), "pca", fit), "pca", fit) == 0).all()


# ----------------------------------------------------------------------------- caches stored with them


@pytest.fixture
def codec_cfg(cache_cfg):
    raw = copy.deepcopy(cache_cfg)
    raw["outputs"] = {"logits": "none", "hidden_dtype": "pq"}
    raw["store"].update(block_rows=2, shard_rows=4)
    return raw


def with_codec(raw: dict, tmp_path, name: str, **outputs) -> dict:
    return dict(raw, outputs=dict(raw["outputs"], **outputs), store=dict(raw["store"], output=str(tmp_path / name)))


def test_4bit_caches_store_two_codes_a_byte(codec_cfg, tmp_path):
    reader = CacheReader(build(with_codec(codec_cfg, tmp_path, "nf4", hidden_dtype="nf4")))
    spec, width = reader.fields["hidden"], reader.settings.teacher.hidden_size
    assert (spec.dtype, spec.logical_dtype, spec.row_shape[-1]) == ("uint8", "nf4", width // 2)
    assert reader.fields["hidden_scale"].row_shape[-1] == width // int4_group(width)
    assert reader.hidden_fit() is None and "hidden_fit_sha256" not in reader.header["identity"]


@pytest.mark.integration
def test_a_pq_cache_is_the_same_bytes_on_a_rerun_and_after_kill_9(codec_cfg, tmp_path):
    reference = build(codec_cfg, output=str(tmp_path / "reference"))
    assert verify_cache(reference).problems == []
    reader = CacheReader(reference)
    spec, width = reader.fields["hidden"], reader.settings.teacher.hidden_size
    assert (spec.dtype, spec.logical_dtype, spec.row_shape[-1]) == ("uint8", "pq", width // 4)
    fit_file = reference / "teacher" / FIT_FILE
    assert reader.header["identity"]["hidden_fit_sha256"] == hashlib.sha256(fit_file.read_bytes()).hexdigest()
    assert reader.header["hidden_codec"]["pilot"]["sequences"] == 40
    assert reader.hidden_fit()["codebook"].shape == (width // 4, 256, 4)
    again = build(codec_cfg, output=str(tmp_path / "again"))
    assert_same_arrays(again, reference)
    assert (again / "teacher" / FIT_FILE).read_bytes() == fit_file.read_bytes()
    assert CacheReader(again).header["fingerprint"] == reader.header["fingerprint"]
    out = tmp_path / "killed"  # killed mid-capture, then resumed: the same fit and the same shards
    raw = dict(codec_cfg, store=dict(codec_cfg["store"], output=str(out)))
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump({"cache": raw}))
    proc = subprocess.Popen(cli("cache-teacher", "--config", str(config)), env=env(), stderr=subprocess.DEVNULL)
    while not list((out / "commits").glob("*.json")) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before the end"
    build(raw)
    assert verify_cache(out).problems == []
    assert_same_arrays(out, reference)
    assert (out / "teacher" / FIT_FILE).read_bytes() == fit_file.read_bytes()


@pytest.mark.integration
def test_a_damaged_or_swapped_codebook_is_refused(codec_cfg, tmp_path):
    cache = build(codec_cfg)
    fit_file = cache / "teacher" / FIT_FILE
    good = fit_file.read_bytes()
    damaged = bytearray(good)
    damaged[-3] ^= 0x10  # a flipped bit in a centroid
    fit_file.write_bytes(bytes(damaged))
    with pytest.raises(CacheError, match=f"teacher/{FIT_FILE} differs from the manifest's record"):
        CacheReader(cache).hidden_fit()
    assert any(FIT_FILE in p for p in verify_cache(cache).problems)
    # another fit, recorded in the manifest as if it belonged: the fingerprint still names the old one
    other = fit_bytes(fit_pq(torch.randn(300, 32), 8, seed=5))
    fit_file.write_bytes(other)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["teacher_files"][f"teacher/{FIT_FILE}"] = {
        "bytes": len(other),
        "sha256": hashlib.sha256(other).hexdigest(),
    }
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="not the fitted codec the fingerprint names"):
        CacheReader(cache, check=False).hidden_fit()


@pytest.mark.integration
def test_auto_keeps_the_fewest_bytes_within_the_budget_and_records_every_candidate(codec_cfg, tmp_path):
    loose = CacheReader(build(with_codec(codec_cfg, tmp_path, "loose", hidden_dtype="auto", fidelity_budget=10.0)))
    record = loose.header["hidden_codec"]
    assert record["codec"] == "pq" == loose.settings.outputs.hidden_dtype, "the fewest bytes, 8 a token at H = 32"
    assert [c["codec"] for c in record["candidates"]] == ["pq", "pca", "nf4", "int4", "int8", "float16", "float32"]
    assert record["budget"] == 10.0 and loose.hidden_fit() is not None
    assert loose.header["config"]["outputs"]["hidden_dtype"] == "auto", "the config as given is recorded too"
    shown = summary(loose.store)  # what cache-teacher and inspect print
    assert "hidden codec pq, settled on a pilot of 40 sequences" in shown and "auto, fidelity_budget 10" in shown
    assert "pq x8" in shown, "the field's stored codec and width"
    kls = {c["codec"]: c["rebuilt_kl_t1"] for c in record["candidates"]}
    assert kls["float32"] == 0.0 and kls["int8"] < kls["nf4"]
    budget = kls["int8"] * 1.01  # int8 and float16 (and maybe more) are within: int8 has the fewest bytes of those
    expected = min(
        (c for c in record["candidates"] if c["rebuilt_kl_t1"] <= budget), key=lambda c: c["bytes_per_token"]
    )
    tight = CacheReader(build(with_codec(codec_cfg, tmp_path, "tight", hidden_dtype="auto", fidelity_budget=budget)))
    assert tight.settings.outputs.hidden_dtype == expected["codec"]
    # the same choice made explicitly is the same cache: auto records what it chose, not itself
    explicit = CacheReader(build(with_codec(codec_cfg, tmp_path, "explicit", hidden_dtype=expected["codec"])))
    assert explicit.header["fingerprint"] == tight.header["fingerprint"]


@pytest.mark.integration
@pytest.mark.parametrize("codec", ["int8", "nf4", "pq", "pca"])
def test_the_step_decodes_as_the_host_does(codec_cfg, tmp_path, codec):
    """The data path ships the stored codes and scales; decoding them inside the step gives the
    host decoding (what the DataLoader workers did before) bit for bit, on any CPU."""
    cache = build(with_codec(codec_cfg, tmp_path, "cache", hidden_dtype=codec))
    reader = CacheReader(cache)
    data = DataConfig(micro_batch_size=4, num_workers=0, mix_blocks=1, local_cache_gb=0)
    fields = FieldSelection.for_run(reader.settings, set(reader.fields), KD_MODES["exact"], True, 2.0, None)
    batch = next(iter(CacheBatches(reader, data, fields, 56, 1, 0, 1)))
    assert batch["hidden"].dtype == {"int8": torch.int8, "pca": torch.int8}.get(codec, torch.uint8), "codes travel"
    fit = reader.hidden_fit()
    decoded = to_device(batch, reader.settings, torch.device("cpu"), fit)["hidden"]
    scale = batch.get("hidden_scale")
    host = decode_hidden(batch["hidden"].numpy(), None if scale is None else scale.numpy(), codec, fit)
    assert torch.equal(decoded, host)
    assert torch.equal(decode_hidden_tensor(batch["hidden"], scale, codec, fit), host)
    lengths = batch["lengths"].numpy()
    pad = np.arange(decoded.shape[1])[None, :] >= lengths[:, None]
    assert (decoded[torch.from_numpy(pad)] == 0).all(), "padding decodes to zeros"
