"""The discovery plane: everything dmoe keeps in, or knows about, hivemind's Kademlia DHT.

* ``uids``       the uid grammar (``PREFIX.i.j``), ``--experts`` patterns, grid cell keys.
* ``registry``   the record layout (one dictionary record per grid cell, one signed subkey per
                 owner), announcing, withdrawing, looking up, and the one full walk of a grid.
* ``access``     one async interface over an in-loop ``DHTNode`` and a ``hivemind.DHT``.
* ``placement``  the one rule for which node serves which expert.
* ``patches``    every change dmoe makes to hivemind, each naming the flaw it works around.

Imports ``dmoe.wire`` and hivemind; the client, node and coordinator build on it.
"""
