"""fedge coordinator: the aiohttp service that runs federated tasks.

Owns, by module:

* ``app`` (HTTP routes, body limits, JSON errors) over ``service`` (what each route does);
* ``store`` (persistence behind one interface; SQLite via sqlite-utils, migrations) and
  ``blobs`` (the content-addressed, fsync'ed blob directory beside the database), and
  ``retention`` (what is deleted so that both stay the size of recent history);
* ``rounds`` (task modes: ``sync`` rounds, ``async`` buffered aggregation), ``pacing`` (pace
  steering), ``eligibility``, ``plan`` (a task's plan), ``aggregation`` (running sums, server
  optimizers), ``versions`` (model versions, crash recovery of running sums), ``bundles``;
* for operators: ``dashboard`` (the page at ``/dashboard`` and its admin JSON endpoints),
  ``metrics`` (Prometheus at ``/metrics``, request metrics middleware) and ``readiness``
  (``/v1/ready``, a load balancer's check);
* for other programs: ``embedded.EmbeddedCoordinator`` (a service in a thread or a child
  process) and ``admin.AdminClient`` (the operator API, standard library only).

Imports the protocol, frame, codecs and conditions from ``edge_sdk``; must not import torch
or ``model_export`` (bundles arrive already exported).
"""
