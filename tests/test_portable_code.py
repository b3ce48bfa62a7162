"""The product code runs on Linux and macOS: it asks psutil about processes and never reads /proc by hand."""

from pathlib import Path

ROOT = Path(__file__).parents[1]
# Whether an NVIDIA driver is loaded is a question only Linux asks; elsewhere the file is just absent.
ALLOWED = {("tasks/settings.py", "/proc/driver/nvidia/version")}


def product_sources() -> dict[str, str]:
    """Every Python file of the installed package (the root __init__.py, flows/ and tasks/): {name: text}."""
    paths = [ROOT / "__init__.py", *(ROOT / "flows").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in paths}


def proc_reads(name: str, text: str) -> list[str]:
    """The lines of source file `name` that mention /proc, but for the allowed ones."""
    return [
        f"{name}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), start=1)
        if "/proc" in line and not any(name == allowed and path in line for allowed, path in ALLOWED)
    ]


def test_no_product_source_reads_proc():
    sources = product_sources()
    assert {"__init__.py", "flows/local_server.py", "flows/cli/server.py", "tasks/cpu.py", "tasks/settings.py"} <= set(
        sources
    )
    found = [line for name, text in sources.items() for line in proc_reads(name, text)]
    assert found == [], "ask psutil, not /proc:\n" + "\n".join(found)


def test_only_the_gpu_driver_probe_may_name_proc():
    probe = 'GPU_DRIVERS = ("/proc/driver/nvidia/version", "/dev/kfd")\n'
    assert proc_reads("tasks/settings.py", probe) == []
    assert proc_reads("tasks/cpu.py", probe) != []
    assert proc_reads("tasks/settings.py", probe + 'STAT = "/proc/stat"\n') == [
        'tasks/settings.py:2: STAT = "/proc/stat"'
    ]
