"""The dmoe expert node (installed as ``dmoe.node``), one module per job.

* ``cli``        ``dmoe node`` flags (derived from ``dmoe.config.NodeConfig``); runs the node in one uvloop
                 loop until SIGTERM.
* ``runtime``    ``ExpertNode``: builds experts and wires everything below together; start/shutdown order.
* ``server``     grpc.aio servicer of ``proto/expert.proto``; every refusal becomes a status with a message.
* ``validation`` request checks against an expert's schema (``RpcFailure``).
* ``batching``   per-expert queues, fair oldest-first batching, admission limits, deadline drops, worker threads.
* ``backend``    one expert + its optimizer: forward, backward (kept graph or recompute), clip, step; snapshots.
* ``activations`` forward graphs kept for their backward (bounded memory, expiry), so a backward recomputes nothing.
* ``guards``     open-swarm limits: Backward rate per peer, gradient-norm band.
* ``reachability`` how peers reach this node: direct, or through a relay (dial-back check).
* ``state``      an expert's state between replicas: pack, check, average, apply.
* ``peers``      this node as a client of other nodes: state downloads, adoption requests.
* ``replicas``   replica sync: wall-clock rounds of snapshot, pull, weighted average.
* ``keeper``     which experts this node holds: state transfer at start, adoption, hand-off, ``--experts auto``.
* ``announcer``  joins hivemind's DHT and keeps the node's signed records fresh (``dmoe.dht.registry`` layout).
* ``checkpoint`` crash-safe checkpoint files (write, fsync, rename, fsync dir; keep the newest few).
* ``metrics``    Prometheus counters and histograms, served on ``--metrics-port``.

Imports ``dmoe.wire``, ``dmoe.dht`` and ``dmoe.relay`` (and the shared base: config, errors, experts, membership).
"""
