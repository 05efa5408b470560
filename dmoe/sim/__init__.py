"""The simulation plane: swarms under churn and home links, as real processes or containers.

* ``scenario``      what a simulated swarm is and what happens to it (TOML, validated up front).
* ``churn``         scenario + seed -> a timeline of link draws and events (a pure function).
* ``links``         ``LinkModel`` and the shaping TCP proxy that emulates a home line.
* ``swarm_layout``  a scenario's swarm as processes: each node's experts, each role's flags.
* ``launcher``      ``DmoeProcess``: dmoe subcommands as OS processes, driven by real signals.
* ``simulate``, ``cli``        ``dmoe simulate``: the run on this machine and its command.
* ``chaos``, ``chaos_cli``, ``docker_api``: ``dmoe chaos``, the same timeline against containers.
* ``report``        tables and ``report.png`` from what a run left on disk.
* ``demo.toml``     the built-in scenario of ``dmoe simulate`` / ``make demo``.

Sits on top of everything: it launches nodes, coordinators and trainers as processes.
"""
