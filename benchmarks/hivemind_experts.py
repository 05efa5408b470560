"""Registers dmoe's ``ffn`` expert in hivemind's server under the name ``dmoe_ffn``.

Loaded by hivemind's ``Server.create(custom_module_path=...)`` in benchmarks/serving.py, so both
servers run the very same torch module and the benchmark compares serving, not models.
"""

import torch
from hivemind.moe.server.layers.custom_experts import register_expert_class

from dmoe.experts import FeedForwardExpert

register_expert_class("dmoe_ffn", lambda batch_size, hidden_dim: torch.empty((batch_size, hidden_dim)))(
    FeedForwardExpert
)
