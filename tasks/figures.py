"""How a figure reads as text, the same in logs, reports and the command line; imports nothing heavy."""


def format_figure(value: object, missing: str = "-") -> str:
    """A float to four decimals, `missing` for None, anything else (a count, a name) as str() gives it."""
    if value is None:
        return missing
    return f"{value:.4f}" if isinstance(value, float) else str(value)
