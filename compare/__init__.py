"""compare: times and cross-checks the ftattn backends (``python -m compare.run``).

Importing this package imports no framework; each backend is imported only
where it is run.
"""
