"""Plain pipeline code (data, model, training, scoring, storage) and the Prefect tasks that wrap it."""
