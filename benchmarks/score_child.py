"""Score one feature file with the pipeline's streamed path in a process of its own; print seconds as JSON.

The parent reads this process's peak memory from the kernel when it exits (wait4), so the
figure covers everything the process ever held: interpreter, torch, pyarrow and the batches.
"""

import argparse
import json
import time
from pathlib import Path

from benchmarks import pipeline_calls
from benchmarks.measure import peak_rss_mib


def main() -> None:
    """Score --input with --model into --output, or with --idle only load what scoring loads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--idle", action="store_true", help="load the checkpoint, score nothing")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.idle:
        from tasks import storage

        storage.load_checkpoint(args.model)
        rows, accuracy = 0, None
    else:
        summary = pipeline_calls.score_parquet(args.model, args.input, args.output)
        rows, accuracy = summary.rows, summary.accuracy
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "accuracy": accuracy, "vm_hwm_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
