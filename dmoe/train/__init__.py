"""The training plane: ``dmoe train`` and what it trains.

* ``cli``      flags (derived from ``dmoe.config.train``), start-up check of the swarm, wiring.
* ``trainer``  the loop: batches, skipped steps, evaluation, checkpoints, metrics, signals.
* ``model``    a byte-level Transformer whose feed-forward sublayers are MoE layers.
* ``data``     the corpus (default: this Python's standard library sources; no downloads).
* ``collab``   several trainers, one model (hivemind's optimizer) and their final agreement.

Imports ``dmoe.client`` (and what it builds on).
"""
