"""Every file the pipeline touches: paths, atomic writes, fingerprints, manifests and Parquet schemas.

The package's rooms, whose public names are all importable from here (`storage.write_parquet`):

- `locations`: local paths and `s3://` URIs, and the name of every output;
- `keys`: the code version and the specification key that name what an output is made from;
- `files`: whole files written atomically, read, changed, listed, removed, identified and hashed (`fingerprint`);
- `locks`: the lock that lets one local process at a time produce a file;
- `manifests`: the record beside each finished output (which run wrote it, what it holds);
- `parquet`: the schemas of feature and prediction files, their streamed writes and checked reads.
"""

# Callers name these two through the package as well: `storage.Path`, `storage.InputError`.
from pathlib import Path

from featuresum.tasks.errors import InputError
from featuresum.tasks.storage.files import (
    LEFTOVER_AGE_SECONDS,
    LEFTOVER_NAME,
    Written,
    atomic_path,
    exists,
    fingerprint,
    identity,
    list_files,
    read_bytes,
    remove,
    remove_empty_folder,
    remove_tree,
    sweep_leftovers,
    temporary_name,
    update,
    write_bytes,
    write_json,
)
from featuresum.tasks.storage.keys import code_version, source_files, spec_key
from featuresum.tasks.storage.locations import (
    Location,
    at,
    is_remote,
    join,
    name_of,
    output_path,
    parent,
    part_path,
    partial_checkpoint_path,
    partition_path,
    parts_dir,
    resolve,
    sibling,
)
from featuresum.tasks.storage.locks import local_lock, lock_path
from featuresum.tasks.storage.manifests import (
    is_intact,
    manifest_of,
    manifest_path,
    read_manifest,
    write_manifest,
)
from featuresum.tasks.storage.parquet import (
    DATASET_SCHEMA,
    FEATURE_COLUMNS,
    INTEGER_COLUMNS,
    PARQUET_OPTIONS,
    PREDICTIONS_SCHEMA,
    check_column_types,
    iter_feature_batches,
    iter_labelled_batches,
    iter_parquet_batches,
    open_features,
    open_input,
    read_dataset,
    row_group_shards,
    rows_of,
    shard_to_batch,
    values,
    write_parquet,
)

__all__ = [
    "DATASET_SCHEMA",
    "FEATURE_COLUMNS",
    "INTEGER_COLUMNS",
    "LEFTOVER_AGE_SECONDS",
    "LEFTOVER_NAME",
    "PARQUET_OPTIONS",
    "PREDICTIONS_SCHEMA",
    "InputError",
    "Location",
    "Path",
    "Written",
    "at",
    "atomic_path",
    "check_column_types",
    "code_version",
    "exists",
    "fingerprint",
    "identity",
    "is_intact",
    "is_remote",
    "iter_feature_batches",
    "iter_labelled_batches",
    "iter_parquet_batches",
    "join",
    "list_files",
    "local_lock",
    "lock_path",
    "manifest_of",
    "manifest_path",
    "name_of",
    "open_features",
    "open_input",
    "output_path",
    "parent",
    "part_path",
    "partial_checkpoint_path",
    "partition_path",
    "parts_dir",
    "read_bytes",
    "read_dataset",
    "rows_of",
    "read_manifest",
    "remove",
    "remove_empty_folder",
    "remove_tree",
    "resolve",
    "row_group_shards",
    "shard_to_batch",
    "sibling",
    "source_files",
    "spec_key",
    "sweep_leftovers",
    "temporary_name",
    "update",
    "values",
    "write_bytes",
    "write_json",
    "write_manifest",
    "write_parquet",
]
