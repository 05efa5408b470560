"""Membership of a closed swarm: tokens an authority signs for members' keys, and calls members sign.

A swarm is *closed* when its nodes name an authority (``dmoe node --authority PEER_ID``, the
coordinator's peer id from its ``dmoe-ready`` line). Only members may then train the experts
(``Backward``; also ``Forward`` with ``--members-only-forward``):

* **Member key**: an Ed25519 key per trainer (``dmoe member key``), fast enough to sign every call.
* **Token**: the authority signs ``{member public key, issued, expires}`` with the RSA key of its
  libp2p identity (the coordinator's ``--identity`` file) and embeds its public key; a node checks
  that this key hashes to the configured peer id, so nodes need nothing but the peer id. Tokens are
  short-lived (``--token-ttl``); a trainer renews its own from the coordinator (``/token``, for
  keys on the coordinator's members list) or is handed one (``dmoe member issue``).
* **Call signature**: every call carries the token, a timestamp and the member's signature over
  ``method, expert uid, timestamp, SHA-256 of the request's tensor bytes``. A node accepts it
  within ``MAX_CLOCK_SKEW`` of its own clock and only once (a replayed signature is refused).

What a node answers (before it touches any expert): no token or signature -> ``UNAUTHENTICATED``;
a token not signed by the authority, expired, or for another key than the one that signed the
call, a stale or replayed call -> ``PERMISSION_DENIED``; each with a message saying which.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from dmoe.config.membership import MembershipOptions
from dmoe.errors import ConfigError, DmoeError

TOKEN_KEY = "dmoe-member-token"  # gRPC metadata keys of a member's call
SIGNATURE_KEY = "dmoe-member-sig"
TIME_KEY = "dmoe-member-time"
MAX_CLOCK_SKEW = 60.0  # seconds a call's timestamp may differ from the node's clock
_CALL_CONTEXT = b"dmoe-member-call:"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class MembershipError(DmoeError):
    """A call's membership proof is missing (``unauthenticated``) or not acceptable; the message says why."""

    kind = "membership"

    def __init__(self, message: str, *, unauthenticated: bool = False) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---- keys ----


def load_or_create_member_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey:
    """The member key in ``path`` (raw 32-byte seed, mode 0600), created on first use."""
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        if len(data) != 32:
            raise MembershipError(f"member key {path} is not a 32-byte Ed25519 key ({len(data)} bytes)")
        return ed25519.Ed25519PrivateKey.from_private_bytes(data)
    key = ed25519.Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption()))
    return key


def member_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A member's public key as text (what the coordinator's members list holds)."""
    return _b64(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def parse_member_id(text: str) -> ed25519.Ed25519PublicKey:
    try:
        raw = _unb64(text.strip())
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        raise MembershipError(f"{text[:60]!r} is not a member public key") from None


def authority_key_from_identity(data: bytes) -> rsa.RSAPrivateKey:
    """The RSA key inside a libp2p identity file (what ``dmoe coordinator --identity`` holds)."""
    from hivemind.proto import crypto_pb2

    key = serialization.load_der_private_key(crypto_pb2.PrivateKey.FromString(data).data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise MembershipError("the identity file does not hold an RSA key")
    return key


def peer_id_of(public_key: rsa.RSAPublicKey) -> str:
    """The libp2p peer id (base58) of an RSA public key: how nodes recognise the authority."""
    import multihash
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


# ---- tokens ----


@dataclass(frozen=True)
class Token:
    member: str  # member_id of the key the token is for
    issued: float
    expires: float
    authority: str  # peer id of the key that signed it
    text: str  # the token as it travels

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires - (time.time() if now is None else now)


def issue_token(authority: rsa.RSAPrivateKey, member: str, *, ttl: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    parse_member_id(member)
    der = authority.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"v": 1, "member": member, "iat": round(now, 3), "exp": round(now + ttl, 3),
                       "authority": _b64(der)}, separators=(",", ":")).encode()
    return _b64(body) + "." + _b64(authority.sign(body, _PSS, hashes.SHA256()))


def read_token(text: str, *, authority: str) -> Token:
    """Decode and check a token's signature and issuer (not its expiry); MembershipError says what is wrong."""
    try:
        body_text, _, signature_text = text.partition(".")
        body, signature = _unb64(body_text), _unb64(signature_text)
        fields = json.loads(body)
        der = _unb64(fields["authority"])
        key = serialization.load_der_public_key(der)
        token = Token(member=str(fields["member"]), issued=float(fields["iat"]), expires=float(fields["exp"]),
                      authority=peer_id_of(key), text=text)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise MembershipError("the membership token is malformed") from None
    if not isinstance(key, rsa.RSAPublicKey) or token.authority != authority:
        raise MembershipError(f"the membership token was issued by {token.authority[:16]}..., not by this swarm's "
                              f"authority {authority[:16]}...")
    try:
        key.verify(signature, body, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise MembershipError("the membership token's signature is not the authority's") from None
    return token


# ---- signed calls ----


def payload_digest(chunks: Iterable[bytes]) -> bytes:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


def _call_payload(method: str, uid: str, timestamp: str, digest: bytes) -> bytes:
    return b"\n".join((_CALL_CONTEXT + method.encode(), uid.encode(), timestamp.encode(), digest))


@dataclass
class Member:
    """What a trainer holds: its key and a current token. ``metadata`` signs one call."""

    key: ed25519.Ed25519PrivateKey
    token: str

    @property
    def id(self) -> str:
        return member_id(self.key.public_key())

    def metadata(self, method: str, uid: str, digest: bytes) -> tuple[tuple[str, str], ...]:
        timestamp = f"{time.time():.3f}"
        signature = self.key.sign(_call_payload(method, uid, timestamp, digest))
        return ((TOKEN_KEY, self.token), (TIME_KEY, timestamp), (SIGNATURE_KEY, _b64(signature)))


class MembershipCheck:
    """A node's check of members' calls against one authority; verified tokens and seen signatures are cached."""

    def __init__(self, authority: str, *, max_cached: int = 4096) -> None:
        self.authority = authority
        self._tokens: OrderedDict[str, Token] = OrderedDict()
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # signature -> when it stops mattering
        self.max_cached = max_cached

    def _token(self, text: str) -> Token:
        token = self._tokens.get(text)
        if token is None:
            token = read_token(text, authority=self.authority)
            self._tokens[text] = token
            while len(self._tokens) > self.max_cached:
                self._tokens.popitem(last=False)
        return token

    def check(self, metadata: Iterable[tuple[str, str | bytes]], *, method: str, uid: str, digest: bytes,
              now: float | None = None) -> Token:
        now = time.time() if now is None else now
        fields = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in metadata if k.startswith("dmoe-member")}
        if TOKEN_KEY not in fields or SIGNATURE_KEY not in fields or TIME_KEY not in fields:
            raise MembershipError(f"{method} needs membership of this closed swarm: no membership token or signature "
                                  f"(the trainer needs --member-key and a token)", unauthenticated=True)
        token = self._token(fields[TOKEN_KEY][:8192])
        if token.seconds_left(now) <= 0:
            raise MembershipError(f"the membership token expired {now - token.expires:.0f}s ago; get a new one")
        try:
            timestamp = float(fields[TIME_KEY])
            signature = _unb64(fields[SIGNATURE_KEY][:256])
        except (ValueError, binascii.Error):
            raise MembershipError("malformed call signature") from None
        if abs(now - timestamp) > MAX_CLOCK_SKEW:
            raise MembershipError(f"the call was signed {now - timestamp:+.0f}s from this node's clock (allowed: "
                                  f"{MAX_CLOCK_SKEW:.0f}s); check the clocks")
        try:
            parse_member_id(token.member).verify(signature, _call_payload(method, uid, fields[TIME_KEY], digest))
        except InvalidSignature:
            raise MembershipError("the call is not signed by the key its membership token is for") from None
        self._forget(now)
        if signature in self._seen:
            raise MembershipError("this signed call was already received once (replayed)")
        self._seen[signature] = timestamp + MAX_CLOCK_SKEW
        return token

    def _forget(self, now: float) -> None:
        while self._seen:
            signature, until = next(iter(self._seen.items()))
            if until > now and len(self._seen) < 100_000:
                return
            del self._seen[signature]


# ---- getting a token from the coordinator ----

_TOKEN_REQUEST_CONTEXT = b"dmoe-token-request:"


def token_request(key: ed25519.Ed25519PrivateKey, now: float | None = None) -> dict[str, str]:
    """Query of ``GET /token``: the member id, a timestamp and a signature over both (proves the key is held)."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    member = member_id(key.public_key())
    signature = key.sign(_TOKEN_REQUEST_CONTEXT + member.encode() + b"|" + timestamp.encode())
    return {"member": member, "time": timestamp, "sig": _b64(signature)}


def check_token_request(query: dict[str, str], members: set[str], now: float | None = None) -> str:
    """The member id of a valid ``/token`` request from a listed member; MembershipError otherwise."""
    now = time.time() if now is None else now
    member, timestamp, signature = query.get("member", ""), query.get("time", ""), query.get("sig", "")
    try:
        key = parse_member_id(member)
        if abs(now - float(timestamp)) > MAX_CLOCK_SKEW:
            raise MembershipError(f"the request was signed {now - float(timestamp):+.0f}s from the coordinator's "
                                  "clock; check the clocks")
        key.verify(_unb64(signature[:256]), _TOKEN_REQUEST_CONTEXT + member.encode() + b"|" + timestamp.encode())
    except (ValueError, binascii.Error, InvalidSignature):
        raise MembershipError("malformed or unsigned token request", unauthenticated=True) from None
    if member not in members:
        raise MembershipError(f"member key {member[:12]}... is not on this swarm's members list; send it to the swarm "
                              "operator")
    return member


def read_members(path: str | os.PathLike[str]) -> set[str]:
    """Member ids in a members file: one per line, ``#`` comments and blank lines ignored; each checked."""
    members = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            parse_member_id(text)
        except MembershipError:
            raise MembershipError(f"{path}:{number}: {text[:60]!r} is not a member public key") from None
        members.add(text)
    return members


def fetch_token(url: str, key: ed25519.Ed25519PrivateKey, *, timeout: float = 10.0) -> str:
    """A fresh token from a coordinator's ``/token`` (``url`` = its HTTP address); MembershipError says why not."""
    import urllib.error
    import urllib.parse
    import urllib.request

    base = url if "://" in url else f"http://{url}"
    target = base.rstrip("/") + "/token?" + urllib.parse.urlencode(token_request(key))
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - the operator's coordinator
            return response.read().decode().strip()
    except urllib.error.HTTPError as e:
        raise MembershipError(f"{base} refused a token: {e.code} {e.read().decode(errors='replace').strip()[:200]}",
                              unauthenticated=e.code == 401) from None
    except (urllib.error.URLError, OSError) as e:
        raise MembershipError(f"cannot reach {base} for a membership token: {e}") from None


def _token_expiry(text: str) -> float | None:
    """A token's expiry time, read without checking anything (for scheduling renewals only)."""
    try:
        return float(json.loads(_unb64(text.partition(".")[0]))["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return None


def read_token_unchecked(text: str) -> Token:
    """A token's fields without checking its signature (to learn which authority issued one we hold)."""
    try:
        fields = json.loads(_unb64(text.partition(".")[0]))
        key = serialization.load_der_public_key(_unb64(fields["authority"]))
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("not an RSA key")
        return Token(member=str(fields["member"]), issued=float(fields["iat"]), expires=float(fields["exp"]),
                     authority=peer_id_of(key), text=text)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise MembershipError("the membership token is malformed") from None


def member_from_options(options: MembershipOptions) -> Member | None:
    """The member a process joins a closed swarm as (--member-key with --token-url or --token); None without a key."""
    if not options.member_key:
        if options.token or options.token_url:
            raise ConfigError("--token and --token-url need --member-key (the key the token is for)")
        return None
    key = load_or_create_member_key(options.member_key)
    if options.token_url:
        token = fetch_token(options.token_url, key)
    elif options.token:
        token = options.token
    else:
        raise ConfigError(f"--member-key needs a token: --token-url COORDINATOR_HTTP, or --token from `dmoe member "
                          f"issue --member {member_id(key.public_key())}`")
    return Member(key, token)


# ---- nodes as members: clients of a closed swarm use only their experts ----

_NODE_CONTEXT = b"dmoe-member-node:"


def node_membership(member: Member, owner_fingerprint: str) -> dict[str, str]:
    """What a member node publishes next to its records (``dmoe.dht.registry``): its token, and its member key's
    signature over the key that signs its records, so the token cannot be copied into someone else's records."""
    return {"token": member.token, "proof": _b64(member.key.sign(_NODE_CONTEXT + owner_fingerprint.encode()))}


def check_node_membership(published: object, owner_fingerprint: str, *, authority: str,
                          now: float | None = None) -> float | None:
    """Until when the owner of ``owner_fingerprint`` is a member (its token's expiry), or None if it is not."""
    if not isinstance(published, dict):
        return None
    try:
        token = read_token(str(published["token"]), authority=authority)
        parse_member_id(token.member).verify(_unb64(str(published["proof"])[:256]),
                                             _NODE_CONTEXT + owner_fingerprint.encode())
    except (MembershipError, KeyError, InvalidSignature, ValueError, binascii.Error):
        return None
    return token.expires if token.seconds_left(now) > 0 else None


class TokenRenewer:
    """Keeps ``member.token`` fresh from a coordinator's ``/token``: renews at half-life, retries on failure."""

    def __init__(self, member: Member, url: str, *, retry: float = 15.0) -> None:
        import threading

        self.member = member
        self.url = url
        self.retry = retry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmoe-token-renewer", daemon=True)

    def start(self) -> TokenRenewer:
        self._thread.start()
        return self

    def _run(self) -> None:
        import logging

        log = logging.getLogger(__name__)
        while not self._stop.is_set():
            expires = _token_expiry(self.member.token) or 0.0
            issued_for = max(1.0, expires - time.time())
            if self._stop.wait(max(1.0, issued_for / 2)):
                return
            try:
                self.member.token = fetch_token(self.url, self.member.key)
                valid = (_token_expiry(self.member.token) or 0.0) - time.time()
                log.info("membership token renewed (valid %.0fs)", valid)
            except MembershipError as e:
                log.warning("membership token renewal failed: %s; retrying in %.0fs", e, self.retry)
                self._stop.wait(self.retry)

    def stop(self) -> None:
        self._stop.set()
