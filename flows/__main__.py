"""`python -m featuresum.flows` is the `featuresum` command."""

from featuresum.flows.cli import entry_point

entry_point()
