"""Relays for nodes that cannot be dialed (home routers, NAT, firewalls), and the reachability check.

=================  =================================================================================
``protocol``       the relay's line protocol, node names derived from keys, the attach challenge
``server``         ``RelayServer``: the relay (in ``dmoe coordinator`` by default, ``dmoe node --relay``)
``tunnel``         the node side: ``RelayAttachment`` per relay, ``RelayLink`` with failover
``reachability``   "can anyone dial me?": the dial-back check
``directory``      relays announced in, and found through, the DHT
``splice``         byte copying and the fair bandwidth share
``metrics``        ``dmoe_relay_*``
=================  =================================================================================

Clients need none of this: a relayed endpoint (``name@relay``, ``dmoe.wire.endpoints``) is dialed
through gRPC's own HTTP CONNECT proxy support.
"""
