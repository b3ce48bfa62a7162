"""`python -m benchmarks.rerun_probe ARGS`: run `featuresum ARGS` and report what it imported and asked the API.

Writes one JSON line to stderr at exit: every HTTP request to the Prefect API (method and path,
ids replaced by `{id}`), and whether torch and pandas were imported. Figure 5 uses it to show
where a cached rerun's time goes.
"""

import atexit
import json
import re
import sys

import httpx

REQUESTS: list[str] = []
ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _counting(send):
    def counted(self, request, *args, **kwargs):
        REQUESTS.append(f"{request.method} {ID.sub('{id}', request.url.path)}")
        return send(self, request, *args, **kwargs)

    return counted


def _report() -> None:
    modules = {name: name in sys.modules for name in ("torch", "pandas")}
    print("PROBE " + json.dumps({"requests": REQUESTS, "imported": modules}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    httpx.Client.send = _counting(httpx.Client.send)
    httpx.AsyncClient.send = _counting(httpx.AsyncClient.send)
    atexit.register(_report)
    from featuresum.flows.cli import main

    sys.argv = ["featuresum", *sys.argv[1:]]
    main()
