"""Where Prefect keeps the task results of a run whose artifacts are on object storage: beside the artifacts."""

from prefect.filesystems import WritableFileSystem

from featuresum.tasks import storage

# Where, under an artifacts prefix on object storage, Prefect's task results are kept.
RESULTS_PREFIX = ".prefect-results"


class ObjectStoreResults(WritableFileSystem):
    """Prefect's result storage under an `s3://` prefix: a task cached on one machine is cached on every other."""

    _block_type_name = "featuresum object store results"
    basepath: str

    def _resolve_path(self, path: str) -> str:
        return path if storage.is_remote(path) else str(storage.join(self.basepath, path)) if path else self.basepath

    # Prefect calls these with `_sync=True` from its synchronous engine, and the `a`-methods from its async one.
    def read_path(self, path: str, _sync: bool = True) -> bytes:
        """The stored result record under `path`."""
        return storage.read_bytes(self._resolve_path(path))

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> str:
        """Store a result record under `path`, whole or not at all."""
        storage.write_bytes(self._resolve_path(path), content)
        return path

    async def aread_path(self, path: str) -> bytes:
        """read_path, for Prefect's async engine."""
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """write_path, for Prefect's async engine."""
        return self.write_path(path, content)


def result_storage(artifacts_dir: str) -> ObjectStoreResults | None:
    """Where the tasks of a run whose artifacts are on object storage keep their results: beside the artifacts.

    Prefect takes only result storage saved as a block on the server. The block holds the prefix
    alone; every machine reads its credentials from its own environment.
    """
    if not storage.is_remote(artifacts_dir):
        return None  # Prefect's local result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH)
    basepath = str(storage.join(storage.resolve(artifacts_dir), RESULTS_PREFIX))
    results = ObjectStoreResults(basepath=basepath)
    results.save(f"featuresum-results-{storage.spec_key({'results': basepath})[:16]}", overwrite=True)
    return results
