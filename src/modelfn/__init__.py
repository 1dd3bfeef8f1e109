"""modelfn: models as a service on AWS Lambda.

This top-level package must stay torch-free and cheap to import: the Lambda
runtime layer ships ``modelfn`` (errors, store, runtime) without the training
and export sub-packages.
"""

__version__ = "0.1.0"
