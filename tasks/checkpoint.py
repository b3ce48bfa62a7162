"""The checkpoint format: one self-describing dict, written atomically, loaded without running code.

A checkpoint holds `format`, `model` (state dict), `model_config`, `class_boundaries`,
`train_config`, `optimizer`, `scheduler`, `rng_state`, `epoch`, `history` and provenance such as
`metrics`, `data_fingerprint` and `holdout_fingerprint`. It loads with `torch.load(weights_only=True)`.

A checkpoint's own fingerprint is the SHA-256 of its bytes. `holdout_fingerprint` is the held-out
file's fingerprint (its content hash, or for a generated file the key of its specification: see
storage.manifests); `data_fingerprint` is one key over the training partitions' fingerprints, which
identifies the training rows without being any one file's hash.
"""

import hashlib
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from featuresum.tasks import storage
from featuresum.tasks.errors import EnvironmentFailure, InputError
from featuresum.tasks.model import FeatureSumMLP, ModelConfig

CHECKPOINT_FORMAT = "featuresum-checkpoint/1"
# torch.save writes a zip archive; anything else (legacy pickles included) is refused unread.
ZIP_MAGIC = b"PK\x03\x04"


def save_checkpoint(path: storage.Location, checkpoint: dict[str, Any]) -> storage.Written:
    """Write a checkpoint atomically (on object storage: in one PUT); returns what was written."""
    # Serialised in memory first: torch reports a failed file write as a RuntimeError without its errno.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return storage.write_bytes(path, buffer.getvalue())


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device) -> FeatureSumMLP:
    """Rebuild the model from a checkpoint alone, in eval mode."""
    model = FeatureSumMLP(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_weights_only(source: Path | io.BytesIO, path: storage.Location, what: str, refused: str) -> Any:
    """torch.load without running any code stored in `source`; InputError naming `path` when it cannot or will not.

    `what` names the kind of file in the message for unreadable bytes ("checkpoint"); `refused` says
    why a file that holds more than tensors and plain types is not loaded.
    """
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing a file; our error says it better.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: refused: {refused}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a readable PyTorch {what} ({_first_line(error)})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or _first_line(error)})") from None


def load_checkpoint(path: storage.Location, fingerprint: str | None = None) -> dict[str, Any]:
    """Load and validate a featuresum checkpoint without running any code stored in it.

    Whatever bytes `path` holds (nothing, text, random bytes, another zip, a directory), the
    outcome is the checkpoint or an InputError naming the file and the problem. With `fingerprint`
    (a registered version's, or the one a task was keyed by), bytes that no longer hash to it are
    an EnvironmentFailure: those are another model's weights.
    """
    path = storage.at(path)
    if isinstance(path, Path) and path.is_dir():
        raise InputError(f"{path}: is a directory, not a checkpoint")
    try:
        content = storage.read_bytes(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    if fingerprint is not None and hashlib.sha256(content).hexdigest() != fingerprint:
        raise EnvironmentFailure(
            f"{path}: the checkpoint no longer holds the weights it was recorded with (fingerprint"
            f" {fingerprint[:12]}): restore the file, or use another version (`featuresum models promote`)"
        )
    if content[: len(ZIP_MAGIC)] != ZIP_MAGIC:
        raise InputError(f"{path}: refused: not a featuresum checkpoint (not a PyTorch archive; nothing was loaded)")
    refused = "not a weights-only checkpoint (loading it could run code)"
    checkpoint = load_weights_only(io.BytesIO(content), path, "checkpoint", refused)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a featuresum checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    try:
        model_from_checkpoint(checkpoint, torch.device("cpu"))
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: the weights do not fit the model ({_first_line(error)})") from None
    return checkpoint
