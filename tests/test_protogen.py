"""The generated gRPC code in dmoe/wire/proto/ must match what protoc makes from proto/ now."""

from __future__ import annotations

from dmoe.wire.protogen import stale_files


def test_generated_code_is_up_to_date():
    stale = stale_files()
    assert not stale, f"dmoe/wire/proto is out of date with proto/: {stale}; run `python -m dmoe.wire.protogen`"
