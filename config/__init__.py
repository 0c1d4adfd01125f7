"""`driverd.data`: the repo's config/ directory, installed as package data (pyproject.toml maps it).

Code finds these files only through driverd/resources.py, never by a path into a checkout.
"""
