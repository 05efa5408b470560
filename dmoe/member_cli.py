"""``dmoe member``: keys and tokens of a closed swarm (``dmoe.membership``).

    dmoe member key --key member.key                   # create (or show) a trainer's member key: prints its id
    dmoe member issue --identity coordinator.key --member ID [--ttl 86400]   # sign a token offline

Closed swarm in three steps: the operator lists member ids in a file and starts ``dmoe coordinator
--members FILE``; volunteers start ``dmoe node --authority COORDINATOR_PEER_ID``; researchers start
``dmoe train --member-key member.key --token-url COORDINATOR_HTTP`` (tokens renewed automatically),
or with a token from ``dmoe member issue`` (``--token``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmoe.config.flags import positive_float
from dmoe.membership import (
    MembershipError,
    authority_key_from_identity,
    issue_token,
    load_or_create_member_key,
    member_id,
    peer_id_of,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmoe member", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    key = sub.add_parser("key", help="create or show a member key; prints the member id for the members list")
    key.add_argument("--key", required=True, help="member key file (created, mode 0600, if missing)")
    issue = sub.add_parser("issue", help="sign a membership token with the coordinator's identity")
    issue.add_argument("--identity", required=True, help="the coordinator's --identity file (the authority's key)")
    issue.add_argument("--member", required=True, help="member id (from `dmoe member key`)")
    issue.add_argument("--ttl", type=positive_float, default=86400.0,
                       help="seconds the token is valid (default: 1 day)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "key":
            existed = Path(args.key).exists()
            key = load_or_create_member_key(args.key)
            print(member_id(key.public_key()))
            print(f"{'read' if existed else 'created'} {args.key}; add the line above to the coordinator's --members "
                  "file", file=sys.stderr)
        else:
            try:
                authority = authority_key_from_identity(Path(args.identity).read_bytes())
            except OSError as e:
                raise MembershipError(f"cannot read {args.identity}: {e.strerror or e}") from None
            print(issue_token(authority, args.member, ttl=args.ttl))
            print(f"token for {args.member[:12]}... valid {args.ttl:.0f}s, authority "
                  f"{peer_id_of(authority.public_key())}", file=sys.stderr)
    except MembershipError as e:
        print(f"dmoe member: {e}", file=sys.stderr)
        return 2
    return 0
