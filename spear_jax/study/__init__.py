"""Seeded studies: methods x seeds of ``spear_jax.main`` runs from shared warm starts, and their report.

    python -m spear_jax.study --study=configs/studies/twx_methods.py --workdir=studies/twx --parallel=2
    python -m spear_jax.study --report=results/twx_methods

``spec`` reads a study config into runs, ``warm_data`` records each seed's warm-start data,
``scheduler`` runs (and resumes) the runs, ``report`` writes ``results/<study>/`` and ``stats``
holds the statistics. docs/experiments.md, Studies.
"""
