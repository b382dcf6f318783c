"""Fuzzing of the sans-IO protocol core: targets, mutation strategies and a seed corpus.

``harness`` owns the targets (server engine, client engine, syntax parsers,
reply parsing, PROXY header parsing), the invariants each must hold and the
Hypothesis strategies that mutate the seeds in ``corpus/<target>/*.bin``.
``tests/test_fuzz.py`` runs them briefly in the normal suite;
``scripts/fuzz.py`` runs them for minutes and adds failing inputs to the corpus.
"""
