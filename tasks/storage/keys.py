"""Keys of outputs: the code version and the specification key that name what an output is made from.

A key hashes what shapes an output (its specification and the code), never a file's content; the
content hash of a file is its fingerprint (files.fingerprint).
"""

import hashlib
import json
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa

# The modules that shape an output: every one under tasks/.
SOURCE_ROOT = Path(__file__).parent.parent


def source_files(root: Path = SOURCE_ROOT) -> list[tuple[str, Path]]:
    """Every Python module under `root`, subpackages included, as (path relative to `root`, path), in that order."""
    found = [(source.relative_to(root).as_posix(), source) for source in root.rglob("*.py")]
    return sorted(found)


@cache
def code_version() -> str:
    """Hash of the source of every module that shapes an output, so a code change misses the cache."""
    digest = hashlib.sha256()
    for name, source in source_files():
        digest.update(name.encode() + source.read_bytes())
    digest.update(version("torch").encode() + pa.__version__.encode())
    return digest.hexdigest()


def spec_key(spec: dict[str, Any]) -> str:
    """Key of an output's specification: a hash of the specification and the code version, not of any content."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(f"{code_version()}\n{text}".encode()).hexdigest()
