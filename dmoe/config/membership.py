"""Membership of a closed swarm (``dmoe.membership``): the key and token a trainer or a node proves it with."""

from __future__ import annotations

from dataclasses import dataclass

from dmoe.config.flags import option


@dataclass(frozen=True)
class MembershipOptions:
    """membership"""

    member_key: str | None = option(None, metavar="FILE")
    """closed swarm: this process's member key (created if missing; `dmoe member key` prints its id for the
    operator's members list); a trainer signs every expert call with it, a node proves with it that clients may
    use its experts"""
    token: str | None = option(None)
    """closed swarm: a membership token for --member-key (from `dmoe member issue`)"""
    token_url: str | None = option(None, metavar="HOST:PORT")
    """closed swarm: the coordinator's HTTP address to get tokens from (and renew them at half-life)"""
