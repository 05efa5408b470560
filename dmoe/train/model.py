"""The trainer's model: a byte-level Transformer language model whose feed-forward sublayers are MoE layers.

Everything but the experts is local: byte and position embeddings, causal self-attention, layer
norms, the gates and the output head (tied to the byte embedding). Each block's feed-forward
sublayer is a mixture of experts over a grid (``grid_size``), one uid prefix per block
(``layer0.ffn``, ``layer1.ffn``, ...), built by a factory so the same model runs

* through ``RemoteMixtureOfExperts`` (experts on ``dmoe node`` processes), or
* through ``LocalMixtureOfExperts`` (the same expert modules in-process: the no-network baseline).

The ``ffn`` expert already contains its pre-LayerNorm and residual connection
(``x + W2 gelu(W1 LN(x))``) and the gate's weights sum to one over the experts that answered, so
a block is ``x = x + attn(ln(x)); x = moe(x)`` — adding ``x`` again would count the residual twice.

Every MoE layer exposes ``aux_loss`` (the last forward's load-balancing loss); ``GPT.aux_loss()``
averages them for the trainer to add with its weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.client.gating import LocalMixtureOfExperts
from dmoe.config.node import OptimizerOptions
from dmoe.config.train import ModelConfig
from dmoe.dht.uids import make_uid
from dmoe.experts import create_expert

_NODE_OPTIMIZER = OptimizerOptions()  # in-process experts train like a node's

# A factory builds the feed-forward MoE sublayer of block ``layer``: (layer, uid_prefix) -> module
MoEFactory = Callable[[int, str], nn.Module]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: nn.Module) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.moe = moe  # [B, T, C] -> [B, T, C], residual inside the experts
        self.moe.is_moe_layer = True  # GPT's init leaves it alone: the gate and experts init themselves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln(x))  # (B, T, C)
        return self.moe(x)  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, moe_factory: MoEFactory) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, moe_factory(i, config.prefix(i))) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying
        self._init_local(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight"):  # GPT-2 scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _init_local(self, fn: Callable[[nn.Module], None]) -> None:
        """Like ``nn.Module.apply``, but skips MoE layers (their gates and experts own their init)."""

        def visit(module: nn.Module) -> None:
            if getattr(module, "is_moe_layer", False):
                return
            for child in module.children():
                visit(child)
            fn(module)

        visit(self)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} bytes is longer than the context ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def moe_layers(self) -> list[nn.Module]:
        return [block.moe for block in self.blocks]

    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss of the last forward over every MoE layer."""
        losses = [m.aux_loss for m in self.moe_layers() if getattr(m, "aux_loss", None) is not None]
        if not losses:
            return torch.zeros(())
        return torch.stack([torch.as_tensor(v) for v in losses]).mean()

    def local_parameters(self) -> list[nn.Parameter]:
        """Parameters the trainer itself optimizes (everything except in-process experts)."""
        expert_ids = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert_ids]

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of in-process experts (LocalMixtureOfExperts); empty when experts are remote."""
        params: list[nn.Parameter] = []
        for moe in self.moe_layers():
            if isinstance(moe, LocalMixtureOfExperts):
                params.extend(moe.experts.parameters())
        return params


def local_moe_factory(config: ModelConfig, *, seed: int = 0) -> MoEFactory:
    """In-process experts (``dmoe.client.gating.LocalMixtureOfExperts``), built from the same ``(seed, uid)``
    as a node started with ``--seed SEED``, so both runs begin from identical expert weights."""

    def build(layer: int, prefix: str) -> nn.Module:
        experts = {
            uid: create_expert(config.expert_cls, hidden_dim=config.n_embd, seed=seed, uid=uid)
            for uid in (make_uid(prefix, coords) for coords in grid_coords(config.grid_size))
        }
        return LocalMixtureOfExperts(
            in_features=config.n_embd, grid_size=config.grid_size, uid_prefix=prefix, experts=experts,
            k_best=config.k_best,
        )

    return build


def grid_coords(grid_size: tuple[int, ...]) -> list[tuple[int, ...]]:
    coords: list[tuple[int, ...]] = [()]
    for size in grid_size:
        coords = [(*c, i) for c in coords for i in range(size)]
    return coords


class ExpertOptimizer:
    """Optimizes in-process experts the way a node does (``dmoe.node.backend``): one Adam step per expert
    per backward with per-expert gradient clipping, only for experts that received a gradient (a node
    only steps the experts it got a Backward call for)."""

    def __init__(self, model: GPT, *, lr: float = _NODE_OPTIMIZER.lr,
                 clip_grad_norm: float = _NODE_OPTIMIZER.clip_grad_norm) -> None:
        self.clip_grad_norm = clip_grad_norm
        self.groups: list[tuple[list[nn.Parameter], torch.optim.Optimizer]] = []
        for moe in model.moe_layers():
            if not isinstance(moe, LocalMixtureOfExperts):
                continue
            for expert in moe.experts:
                params = [p for p in expert.parameters() if p.requires_grad]
                self.groups.append((params, torch.optim.Adam(params, lr=lr)))

    def step(self) -> None:
        for params, opt in self.groups:
            if all(p.grad is None for p in params):
                continue
            if self.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        for _, opt in self.groups:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for _, opt in self.groups]

    def load_state_dict(self, states: list[dict]) -> None:
        for (_, opt), state in zip(self.groups, states, strict=True):
            opt.load_state_dict(state)
