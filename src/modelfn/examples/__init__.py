"""The models modelfn ships, as package resources: ``models.toml`` (their build
configuration) and ``data/`` (the data sets they train and are gated on; see its
README). Read through :mod:`modelfn.project`, never through paths into a checkout."""
