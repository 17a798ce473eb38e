"""Study configs for ``python -m spear_jax.study --study=configs/studies/<name>.py``."""
