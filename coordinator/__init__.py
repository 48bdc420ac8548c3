"""fedge coordinator: the aiohttp service that runs federated tasks.

Owns: the HTTP API (``app``), persistence behind one interface (``store``) with SQLite and
the content-addressed blob directory, round life cycles (sync and async), pace steering,
streaming aggregation with server optimizers, and model versions.

Imports the protocol, frame and codecs from ``edge_sdk``; must not import torch or
``model_export`` (bundles arrive already exported).
"""
