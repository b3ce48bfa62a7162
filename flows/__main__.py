"""`python -m flows` is the `featuresum` command."""

from flows.cli import main

main()
