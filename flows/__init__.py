"""Prefect flows, the local Prefect runtime and the `featuresum` command line."""
