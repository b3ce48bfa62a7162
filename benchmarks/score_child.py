"""Score one feature file with the pipeline's streamed path in a process of its own; print a JSON report.

The report's peak RSS (VmHWM) covers everything the process ever held: interpreter, torch,
pyarrow, the checkpoint and the batches.
"""

import argparse
import json
import time
from pathlib import Path

from benchmarks import bare, pipeline_calls
from benchmarks.measure import peak_rss_mib


def main() -> None:
    """Score --input with --model into --output (pipeline path, or --bare), or --idle: only load the model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--idle", action="store_true", help="load the checkpoint, score nothing")
    parser.add_argument("--bare", action="store_true", help="score with the bare baseline (whole file in memory)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.idle:
        from featuresum.tasks import storage

        storage.load_checkpoint(args.model)
        rows, accuracy = 0, None
    elif args.bare:
        rows, accuracy = bare.score_parquet(bare.load_model(str(args.model)), str(args.input), str(args.output)), None
    else:
        summary = pipeline_calls.score_parquet(args.model, args.input, args.output)
        rows, accuracy = summary.rows, summary.accuracy
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "accuracy": accuracy, "vm_hwm_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
