"""Whatever bytes a user hands over as a checkpoint, the outcome is the checkpoint or one clear error."""

import os
import pickle
import zipfile

import pytest
import torch

from featuresum.tasks.checkpoint import load_checkpoint, save_checkpoint
from featuresum.tasks.errors import InputError


class Exploit:
    """Unpickling this would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_bad(path, kind):
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "a zip, but not a torch archive")
    elif kind == "zip_like_torch":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", "garbage")
    elif kind == "truncated":
        path.write_bytes(path.with_name("good.pt").read_bytes()[:3000])
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps(Exploit(path.with_name("pwned")), protocol=2))
    elif kind == "torch_pickle":
        torch.save(Exploit(path.with_name("pwned")), path)
    elif kind == "other_tensors":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)


KINDS = [
    "directory", "empty", "text", "random", "zip", "zip_like_torch", "truncated",
    "raw_pickle", "torch_pickle", "other_tensors", "list",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_anything_but_a_checkpoint_is_one_clear_error(checkpoint, tmp_path, kind):
    (tmp_path / "good.pt").write_bytes(checkpoint.read_bytes())
    path = tmp_path / f"{kind}.pt"
    write_bad(path, kind)
    with pytest.raises(InputError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_a_checkpoint_round_trips(checkpoint, tmp_path):
    loaded = load_checkpoint(checkpoint)
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, loaded)
    assert load_checkpoint(copy)["epoch"] == loaded["epoch"]
