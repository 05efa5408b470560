"""The client plane: how a trainer finds alive experts and calls them with deadlines.

* ``swarm``         ``Swarm``: one event loop thread owning the DHT access, channels, peer health.
* ``prefix_table``  the cache of DHT grid records shared by every search.
* ``beam_search``   each token's best alive experts over the grid, with lookups bounded by beam x dims.
* ``candidates``    what the search hands the dispatcher (``FoundExpert``).
* ``remote_call``   one Forward/Backward call to one endpoint, mapped onto ``dmoe.errors``.
* ``peer_health``   per-endpoint latency and bans.
* ``dispatch``      all calls of one MoE forward or backward: the k_min rule, stuck calls, rerouting.
* ``gating``        the grid gate, output mixing and load-balancing loss (shared with in-process MoE).
* ``moe``           ``RemoteMixtureOfExperts``: the layer, as a ``torch.nn.Module``.
* ``remote_expert`` ``RemoteExpert``: one known expert as a module.
* ``metrics``       the client's Prometheus series.

Imports ``dmoe.wire`` and ``dmoe.dht``; never the node or the coordinator.
"""
