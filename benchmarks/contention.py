"""Figure 12: training throughput when another process takes a core, under OpenMP threading policies.

A scheduled run shares its machine with the Prefect server and the serve process. PyTorch's CPU
kernels run on OpenMP threads (GNU libgomp in the CPU wheels) that spin while they wait for each
other; when another process holds a core, a spinning thread can hold up the others for a whole
time slice. Each policy is measured in a fresh child process (OpenMP reads its settings once, when
torch is imported), idle and beside one busy competitor, interleaved.

`python -m benchmarks.contention --child ROWS BATCH` is the child: it prints one JSON line.
"""

import json
import os
import subprocess
import sys
import time

from benchmarks.measure import HostLoad, Spread
from benchmarks.report import Check, Figure, table
from benchmarks.sizes import Sizes

# Settings a user could make before starting featuresum, featuresum's own opt-in policy among them
# (threads that follow the load of other processes, `tasks/cpu.py`), measured through the same call.
POLICIES = {
    "fixed threads (torch default)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "FEATURESUM_THREADS=auto: threads follow the load": {"FEATURESUM_THREADS": "auto"},
}
DEFAULT = "fixed threads (torch default)"
BATCH = 256
REPS = 7
# A policy may lose at most this much of the default's idle throughput.
IDLE_TOLERANCE = 0.05


def _child(rows: int, batch: int) -> None:
    import torch

    from featuresum.tasks import cpu, data, training

    # As the training task does: created before the data is made, adjusted before training starts.
    threads = cpu.ThreadPolicy.for_torch()
    shard = data.generate_shard(0, "train", 0, rows)
    x, y = shard.features.T.contiguous(), shard.label
    config = training.TrainConfig(epochs=1, batch_size=batch, schedule="constant")
    state = training.new_training_state(config, -(-rows // batch), torch.device("cpu"))
    training.train_epoch(state, (x[: batch * 8], y[: batch * 8]), config)  # warm-up: allocations, thread pool
    if threads is not None:
        threads.adjust()
    start = time.perf_counter()
    training.train_epoch(state, (x, y), config, threads)
    seconds = time.perf_counter() - start
    changes = len(threads.changes) if threads else 0
    print(json.dumps({"samples_per_s": rows / seconds, "threads": torch.get_num_threads(), "changes": changes}))


def _competitor() -> subprocess.Popen:
    """One process that keeps a core busy, as a busy Prefect server or a second job would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _measure(policy: dict[str, str], contended: bool, rows: int) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OMP_", "GOMP_", "FEATURESUM_"))}
    env.update(policy)
    competitor = _competitor() if contended else None
    try:
        if competitor:
            time.sleep(0.5)
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.contention", "--child", str(rows), str(BATCH)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    return json.loads(result.stdout.strip().splitlines()[-1])


def contention(sizes: Sizes) -> Figure:
    """Samples/s of `train_epoch`, idle and beside a busy process, for each policy; the policy featuresum applies."""
    rows, reps = 2 * sizes.training_rows, max(sizes.reps, REPS) if sizes.reps > 1 else 1
    rates: dict[tuple[str, bool], list[float]] = {}
    threads: dict[tuple[str, bool], set[int]] = {}
    idle_changes = 0
    with HostLoad() as load:
        for _ in range(reps):
            for name, policy in POLICIES.items():
                for contended in (False, True):
                    measured = _measure(policy, contended, rows)
                    rates.setdefault((name, contended), []).append(measured["samples_per_s"])
                    threads.setdefault((name, contended), set()).add(measured["threads"])
                    idle_changes += measured["changes"] if not contended else 0
    median = {key: Spread.of(values).median for key, values in rates.items()}
    idle_floor = (1 - IDLE_TOLERANCE) * median[(DEFAULT, False)]
    eligible = [name for name in POLICIES if median[(name, False)] >= idle_floor]
    chosen = max(eligible, key=lambda name: median[(name, True)])
    rows_table = [
        [
            name,
            " / ".join(" or ".join(map(str, sorted(threads[(name, busy)]))) for busy in (False, True)),
            f"{Spread.of(rates[(name, False)]).format(',.0f')}",
            f"{Spread.of(rates[(name, True)]).format(',.0f')}",
            f"{median[(name, True)] / median[(name, False)]:.2f}",
            f"{median[(name, False)] / median[(DEFAULT, False)]:.2f}",
        ]
        for name in POLICIES
    ]
    body = [
        f"`training.train_epoch` on {rows:,} rows, batch {BATCH}, in a fresh child process per measurement "
        f"(warmed up on 8 batches), {reps} repetitions interleaved; samples/s min / **median** / max. "
        "Contended: one other process (`python -c 'while True: pass'`) spins on a core meanwhile.",
        "",
        *table(
            [
                "policy",
                "threads at the end, idle / contended",
                "idle samples/s",
                "contended samples/s",
                "contended ÷ idle",
                "idle ÷ default idle",
            ],
            rows_table,
        ),  # fmt: skip
        "",
        f"Chosen: **{chosen}**, the best median when contended among the policies that keep at least "
        f"{1 - IDLE_TOLERANCE:.0%} of the default's idle throughput. In the idle runs, featuresum's policy changed "
        f"the thread count {idle_changes} times in all.",
    ]
    checks = [
        Check(f"contended samples/s, {DEFAULT}", f"{median[(DEFAULT, True)]:,.0f}"),
        Check(f"contended samples/s, {chosen}", f"{median[(chosen, True)]:,.0f}"),
        Check(
            f"idle samples/s, {chosen} ÷ {DEFAULT}",
            f"{median[(chosen, False)] / median[(DEFAULT, False)]:.2f}",
            f">= {1 - IDLE_TOLERANCE:.2f}",
            True,
        ),
    ]
    return Figure("12. Training beside a busy process", checks, body, foreign_cores=load.foreign_cores)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(int(sys.argv[2]), int(sys.argv[3]))
