"""Prefect flows, the local Prefect server they record runs in, and the `featuresum` command line."""
