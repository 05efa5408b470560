"""The dmoe expert node (installed as ``dmoe.node``), one module per job.

* ``cli``        ``dmoe node`` flags (derived from ``dmoe.config.NodeConfig``); runs the node in one uvloop
                 loop until SIGTERM.
* ``runtime``    ``ExpertNode``: builds experts and wires everything below together; start/shutdown order.
* ``server``     grpc.aio servicer of ``proto/expert.proto``; every refusal becomes a status with a message.
* ``validation`` request checks against an expert's schema (``RpcFailure``).
* ``batching``   per-expert queues, fair oldest-first batching, admission limits, deadline drops, worker threads.
* ``backend``    one expert + its optimizer: forward, backward with recompute, clip, step; snapshots.
* ``announcer``  joins hivemind's DHT and keeps the node's signed records fresh (``dmoe.dht.registry`` layout).
* ``checkpoint`` crash-safe checkpoint files (write, fsync, rename, fsync dir; keep the newest few).
* ``metrics``    Prometheus counters and histograms, served on ``--metrics-port``.

Imports ``dmoe.wire`` and ``dmoe.dht`` (and the shared base: config, errors, experts).
"""
