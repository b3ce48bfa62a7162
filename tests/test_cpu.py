"""Training threads that follow the load of other processes, measured for real from /proc/stat."""

import subprocess
import sys
import time

import pytest
import torch

from featuresum.tasks import cpu, data, training

pytestmark = pytest.mark.skipif(cpu._host_busy_seconds() is None, reason="no /proc/stat: the policy stays off")


@pytest.mark.parametrize(
    ("others", "cores", "limit", "threads"),
    [(0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1), (3.0, 16, 8, 8), (12.2, 16, 8, 4)],
)
def test_threads_fit_beside_the_cores_others_keep_busy(others, cores, limit, threads):
    assert cpu.threads_for(others, cores, limit) == threads


class Spinner:
    """A real process that keeps one core busy."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc_info):
        self.process.kill()
        self.process.wait()


def test_the_load_of_another_process_is_measured_and_our_own_is_not():
    load = cpu.OthersLoad()
    with Spinner():
        time.sleep(1.0)
        spun = load.read()
    assert spun >= 0.7
    # This process's own work does not count as others'.
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        pass
    assert load.read() < spun - 0.4


def test_the_policy_drops_a_thread_beside_a_busy_process_and_takes_it_back(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    counts = []
    policy = cpu.ThreadPolicy(counts.append, limit=2, interval=0.0)
    with Spinner():
        time.sleep(1.0)
        assert policy.adjust() == 1
    time.sleep(1.0)
    assert policy.adjust() == 2
    assert counts == [1, 2]
    assert [count for count, _ in policy.changes] == [1, 2]


def test_the_policy_is_on_only_when_asked_for_and_omp_num_threads_is_unset(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("FEATURESUM_THREADS", raising=False)
    assert cpu.ThreadPolicy.for_torch() is None  # off by default: training stays bit-reproducible
    monkeypatch.setenv("FEATURESUM_THREADS", "auto")
    assert cpu.ThreadPolicy.for_torch().limit == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu.ThreadPolicy.for_torch() is None


def test_training_consults_the_policy_as_it_goes():
    class Counting:
        calls = 0

        def maybe_adjust(self):
            self.calls += 1

    shard = data.generate_shard(0, "train", 0, 1000)
    config = training.TrainConfig(epochs=1, batch_size=100, schedule="constant")
    state = training.new_training_state(config, 10, torch.device("cpu"))
    policy = Counting()
    training.train_epoch(state, shard.features.T.contiguous(), shard.label, config, policy)
    assert policy.calls == 10
