"""featuresum: a PyTorch training and scoring pipeline on Prefect 3; in a notebook, its models and registry.

    from featuresum import load_model, registry
    model = load_model("champion")          # or a version number, or a checkpoint path
    predictions = model.predict(features)   # a DataFrame with columns f000..f783
    registry()                              # every registered version, as a DataFrame

The names are imported on first use, so `import featuresum.flows.cli` (the command line) stays free of
torch and pandas.
"""

from typing import Any

__all__ = ["Model", "load_model", "registry"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from featuresum.tasks import notebook

    value = getattr(notebook, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
