"""Score one feature file in a process of its own, with the pipeline's streamed path or a bare baseline.

Prints a JSON report. Its peak RSS (VmHWM) covers everything the process ever held: interpreter,
torch, pyarrow, the checkpoint and the batches. A bare baseline imports no pipeline code beyond
the model class and the data rule's constants.
"""

import argparse
import json
import time

from benchmarks import bare
from benchmarks.measure import peak_rss_mib


def main() -> None:
    """Score --input with --model into --output (pipeline path, --bare or --bare-stream), or time a part of it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Paths or s3:// URIs: strings, since a Path would fold the URI's "//".
    parser.add_argument("--model", required=True)
    parser.add_argument("--input")
    parser.add_argument("--output")
    scorer = parser.add_mutually_exclusive_group()
    scorer.add_argument("--idle", action="store_true", help="load the checkpoint, score nothing")
    scorer.add_argument("--bare", action="store_true", help="score with the bare baseline (whole file in memory)")
    scorer.add_argument(
        "--bare-stream", action="store_true", help="score with the bare streaming baseline (iter_batches)"
    )
    scorer.add_argument("--decode", action="store_true", help="only decode --input's feature columns")
    scorer.add_argument("--matmul", type=int, metavar="ROWS", help="only the forward pass over ROWS in-memory rows")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.idle:
        from featuresum.tasks import checkpoint

        checkpoint.load_checkpoint(args.model)
        rows, accuracy = 0, None
    elif args.bare:
        rows, accuracy = bare.score_parquet(bare.load_model(str(args.model)), str(args.input), str(args.output)), None
    elif args.decode:
        rows, accuracy = bare.decode_parquet(str(args.input)), None
    elif args.matmul:
        model = bare.load_model(str(args.model))
        start = time.perf_counter()  # the checkpoint's load is not part of the products
        rows, accuracy = bare.matrix_products(model, args.matmul), None
    elif args.bare_stream:
        model = bare.load_model(str(args.model))
        rows, accuracy = bare.stream_score_parquet(model, str(args.input), str(args.output)), None
    else:
        from benchmarks import pipeline_calls

        summary = pipeline_calls.score_parquet(args.model, args.input, args.output)
        rows, accuracy = summary.rows, summary.accuracy
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "accuracy": accuracy, "vm_hwm_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
