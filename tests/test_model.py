"""Model shapes, a short training run, checkpoints and resuming."""

import pytest
import torch

from featuresum.tasks import data, fitting, settings, storage, training
from featuresum.tasks.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from featuresum.tasks.model import FeatureSumMLP


def test_model_shapes_match_the_original_script():
    model = FeatureSumMLP()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"fc1.weight": (128, 784), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)}
    assert model(torch.randn(5, 784)).shape == (5, 10)


def dataset(seed, stream, rows):
    shard = data.generate_shard(seed, stream, 0, rows)
    return shard.features.T.contiguous(), shard.label


def small_run(epochs):
    config = training.TrainConfig(epochs=epochs, batch_size=128, lr=0.003, seed=5)
    state = training.new_training_state(config, steps_per_epoch=-(-3000 // 128), device=torch.device("cpu"))
    return state, config


def test_short_training_lowers_loss_and_beats_the_majority_class():
    state, config = small_run(epochs=4)
    holdout = dataset(5, "holdout", 1000)
    training.fit(state, dataset(5, "train", 3000), holdout, config)
    losses = [h["train_loss"] for h in state.history]
    assert losses[-1] < losses[0] * 0.8
    # Always answering the most common class (sum < -10) scores about 0.36; a model must do better.
    majority = torch.bincount(holdout[1]).max().item() / len(holdout[1])
    assert 0.3 < majority < 0.4
    assert state.history[-1]["val_accuracy"] > majority + 0.05


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(tmp_path):
    state, config = small_run(epochs=1)
    training.fit(state, dataset(5, "train", 3000), dataset(5, "holdout", 500), config)
    path = tmp_path / "model.pt"
    save_checkpoint(path, training.to_checkpoint(state, config, {"data_fingerprint": "abc"}))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["model_config"] == {"input_dim": 784, "hidden_dim": 128, "num_classes": 10}
    assert checkpoint["class_boundaries"] == list(data.CLASS_BOUNDARIES)
    assert checkpoint["train_config"]["epochs"] == 1 and checkpoint["data_fingerprint"] == "abc"
    model = model_from_checkpoint(checkpoint, torch.device("cpu"))
    x = torch.randn(4, 784)
    assert torch.equal(model(x), state.model.eval()(x))


def test_resuming_gives_the_same_model_as_an_uninterrupted_run():
    train, holdout = dataset(5, "train", 3000), dataset(5, "holdout", 500)
    straight, config = small_run(epochs=3)
    training.fit(straight, train, holdout, config)

    first, _ = small_run(epochs=3)
    first_config = training.TrainConfig(**{**config.__dict__, "epochs": 1})
    training.fit(first, train, holdout, first_config)
    checkpoint = training.to_checkpoint(first, config, {})
    resumed, _ = small_run(epochs=3)
    training.restore(checkpoint, resumed)
    assert resumed.epoch == 1
    training.fit(resumed, train, holdout, config)
    assert resumed.epoch == 3
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[key]), key


def partition(path, seed, stream, rows):
    shards = data.generate_dataset(seed, stream, rows)
    storage.write_parquet(path, storage.DATASET_SCHEMA, map(storage.shard_to_batch, shards))
    return {"path": str(path), "fingerprint": storage.fingerprint(path)}


def test_a_checkpoint_trained_from_files_reports_progress_resumes_when_killed_and_records_its_manifest(tmp_path):
    train = [partition(tmp_path / "a.parquet", 5, "train", 800), partition(tmp_path / "b.parquet", 6, "train", 800)]
    holdout = partition(tmp_path / "holdout.parquet", 5, "holdout", 400)
    config, target, progress, reports = (
        training.TrainConfig(epochs=2, batch_size=128, seed=5),
        tmp_path / "m.pt",
        [],
        [],
    )

    def killed_after_the_first_epoch(percent):
        progress.append(percent)
        if percent == 50.0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fitting.train_checkpoint(train, holdout, config, "cpu", target, "key", on_progress=killed_after_the_first_epoch)
    assert progress == [0.0, 50.0] and storage.exists(storage.partial_checkpoint_path(target))
    manifest = fitting.train_checkpoint(
        train,
        holdout,
        config,
        "cpu",
        target,
        "key",
        on_progress=progress.append,
        on_report=lambda *a: reports.append(a),
    )
    assert progress == [0.0, 50.0, 50.0, 100.0]
    assert (manifest["start_epoch"], manifest["epochs_completed"]) == (1, 2) and storage.is_intact(target, "key")
    assert len(reports) == 1 and reports[0][1] == manifest["metrics"] and reports[0][3] == str(target)
    assert not storage.exists(storage.partial_checkpoint_path(target))
    checkpoint = load_checkpoint(target, manifest["fingerprint"])
    assert checkpoint["data_fingerprint"] == storage.spec_key({"partitions": [part["fingerprint"] for part in train]})
    assert checkpoint["holdout_fingerprint"] == holdout["fingerprint"] and checkpoint["init_fingerprint"] is None


def test_cuda_falls_back_to_the_cpu_with_a_warning_when_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "version", lambda name: "2.13.0")
    monkeypatch.setattr(settings, "GPU_DRIVERS", (str(tmp_path),))  # a driver is present: torch is asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert settings.resolve_device("auto") == ("cpu", None)
    assert settings.resolve_device("cpu") == ("cpu", None)
    device, warning = settings.resolve_device("cuda")
    assert device == "cpu" and "no GPU is available" in warning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings.resolve_device("auto") == ("cuda", None)


def test_a_cpu_build_of_torch_or_no_gpu_driver_means_the_cpu_without_asking_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(settings, "GPU_DRIVERS", (str(tmp_path),))
    monkeypatch.setattr(settings, "version", lambda name: "2.13.0+cpu")
    assert settings.resolve_device("auto") == ("cpu", None)
    monkeypatch.setattr(settings, "version", lambda name: "2.13.0")
    monkeypatch.setattr(settings, "GPU_DRIVERS", (str(tmp_path / "no-driver"),))
    assert settings.resolve_device("auto") == ("cpu", None)
