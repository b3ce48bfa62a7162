"""Training threads that follow the load of other processes: the policy on given figures, the counters for real."""

import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch

from featuresum.tasks import cpu, data, training


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


class Counters:
    """Given CPU-time counters: the host's busy seconds and this process's own, read by OthersLoad."""

    def __init__(self):
        self.now = self.host = self.own = 0.0

    def advance(self, seconds: float, host: float, own: float) -> None:
        self.now, self.host, self.own = self.now + seconds, self.host + host, self.own + own

    def load(self) -> cpu.OthersLoad:
        return cpu.OthersLoad(lambda: self.now, lambda: self.host, lambda: self.own)


def test_the_load_of_others_is_the_host_busy_time_less_our_own():
    counters = Counters()
    load = counters.load()
    counters.advance(2.0, host=3.0, own=1.2)  # over 2 s, others kept 1.8 CPU-seconds busy
    assert load.read() == pytest.approx(0.9)
    counters.advance(1.0, host=1.0, own=1.0)  # only our own work: no load of others
    assert load.read() == 0.0
    assert load.read() is None  # no time has passed


def test_the_host_busy_time_leaves_out_idle_iowait_and_the_guest_time_counted_in_user(monkeypatch):
    linux = namedtuple("scputimes", "user nice system idle iowait irq softirq steal guest guest_nice")
    monkeypatch.setattr(cpu.psutil, "cpu_times", lambda: linux(10.0, 1.0, 5.0, 100.0, 7.0, 2.0, 3.0, 4.0, 6.0, 1.0))
    assert cpu._host_busy_seconds() == 25.0
    macos = namedtuple("scputimes", "user nice system idle")  # no iowait, no guests
    monkeypatch.setattr(cpu.psutil, "cpu_times", lambda: macos(10.0, 1.0, 5.0, 100.0))
    assert cpu._host_busy_seconds() == 16.0


def test_a_host_without_counters_gives_no_reading():
    load = cpu.OthersLoad(host_busy=lambda: None)
    assert load.read() is None


def test_the_host_counters_are_read_for_real_and_count_a_busy_process():
    load = cpu.OthersLoad()
    with Spinner():
        time.sleep(1.0)
        spun = load.read()
    # A busy machine only adds to what others use; our own sleep adds nothing.
    assert spun >= 0.5


def test_the_policy_drops_a_thread_beside_a_busy_process_and_takes_it_back(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    counters, counts = Counters(), []
    policy = cpu.ThreadPolicy(counts.append, limit=2, interval=0.0, load=counters.load())
    counters.advance(1.0, host=2.0, own=1.0)  # another process keeps one core busy
    assert policy.adjust() == 1
    counters.advance(1.0, host=1.0, own=1.0)  # it has gone
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
    training.train_epoch(state, (shard.features.T.contiguous(), shard.label), config, policy)
    assert policy.calls == 10
