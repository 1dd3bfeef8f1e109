"""The benchmarks, one module each, run from the repository root as
``.venv/bin/python -m bench.NAME`` (``make bench`` is ``bench.serving``). What they
share is in :mod:`bench.common`; results go to bench/results/.

bench/cold_child.py (run by path in a fresh, bare interpreter) and
bench/peer/bentoml_service.py (loaded by BentoML in its own environment) are not
imported from here and import nothing from it."""
