"""The bundled end-to-end demo: sample data, a tiny GLM model, and the job that trains it."""
