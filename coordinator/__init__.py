"""The dmoe coordinator (installed as ``dmoe.coordinator``): the swarm's control plane.

* ``cli``            ``dmoe coordinator`` flags (``dmoe.config.CoordinatorOptions``) and start-up order.
* ``bootstrap``      a DHT peer with a persistent identity: a bootstrap address that survives restarts.
* ``view``           the swarm as the DHT shows it (nodes, experts, replicas, recent losses).
* ``http``, ``page`` ``/``, ``/status`` and ``/metrics`` on one small asyncio HTTP server.
* ``swarm_metrics``  the ``dmoe_swarm_*`` Prometheus series, built from the latest view.

Imports ``dmoe.dht`` and ``dmoe.wire``; simulation lives in ``dmoe.sim``, not here.
"""
