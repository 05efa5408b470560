"""A fix for hivemind's dictionary records losing a subkey when an older copy of it is merged in.

hivemind's ``TimedStorage.store`` (1.1.x) indexes a key under the new expiration *before* it
decides whether the value is newer. Storing an older copy of a subkey that is already held with a
later expiration is rejected, yet the key is now indexed under the older time; once that time
passes the subkey is evicted although its newest copy is still valid.

Older copies arrive all the time: a ``get`` merges the dictionary copies of every peer it visits
(``_SearchState.add_candidate``), and a peer that missed the owner's last refresh answers with an
older copy; peers also receive merged results as cache entries (``cache_nearest``). When the
search then outlives that older expiration -- typically because one peer (frozen, overloaded)
answers only after hivemind's ``wait_timeout`` -- the merged record comes back without the
subkey: a healthy node's experts vanish from a lookup (seen in tests/test_moe_faults.py: a 4x4
grid's root record came back as ``[2, 3]`` while every answering peer listed ``0..3``).

``TimedStorage.store`` (the base of both a peer's storage and ``DictionaryDHTValue``) is wrapped
to reject an older or equal copy before hivemind touches its index, so plain records (which
hivemind's averager uses) keep their newest copy too. Importing ``dmoe.dht.access`` applies it
(every dmoe process that talks to the DHT); a ``hivemind.DHT`` started afterwards is a forked
child and inherits it.
"""

from __future__ import annotations

from typing import Any

from hivemind.utils.timed_storage import TimedStorage


def apply() -> None:
    """Idempotent: wrap ``TimedStorage.store`` once per process."""
    original = TimedStorage.store
    if getattr(original, "_dmoe_keeps_newest", False):
        return

    def store(self: TimedStorage, key: Any, value: Any, expiration_time: float) -> bool:
        held = self.data.get(key)
        if held is not None and held.expiration_time >= expiration_time:
            return False  # what hivemind answers too, minus re-indexing the key under the older time
        return original(self, key, value, expiration_time)

    store._dmoe_keeps_newest = True  # type: ignore[attr-defined]
    TimedStorage.store = store  # type: ignore[method-assign]

apply()
