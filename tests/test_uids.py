"""Expert uid patterns and the DHT prefix keys derived from uids."""

from __future__ import annotations

import pytest

from dmoe.dht.uids import make_uid, parse_expert_pattern, split_uid, uid_prefixes
from dmoe.errors import ConfigError


def test_grid_patterns_expand_in_grid_order():
    assert len(parse_expert_pattern("ffn.[0:4].[0:8]")) == 32
    assert parse_expert_pattern("ffn.[0:2].5,ffn.3.1") == ["ffn.0.5", "ffn.1.5", "ffn.3.1"]
    assert parse_expert_pattern("e.[8:12]")[:3] == ["e.8", "e.9", "e.10"], "numeric, not lexicographic order"
    assert parse_expert_pattern("a.1, a.1 ,a.[0:2]") == ["a.0", "a.1"], "de-duplicated"
    assert parse_expert_pattern("layer0.ffn.[0:2].[1:3].0") == [
        "layer0.ffn.0.1.0", "layer0.ffn.0.2.0", "layer0.ffn.1.1.0", "layer0.ffn.1.2.0"]


@pytest.mark.parametrize("bad", ["", " , ", "ffn.[3:3]", "ffn.[4:2]", "ffn.[a:b]", "ffn.[1:2", "ffn", "3.4",
                                 "ffn.x", "f f.1", "ffn.[0:2].[1:0]"])
def test_bad_patterns_raise_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_expert_pattern(bad)


def test_split_make_and_prefixes():
    assert split_uid("layer0.ffn.3.5") == ("layer0.ffn", (3, 5))
    assert make_uid("layer0.ffn", (3, 5)) == "layer0.ffn.3.5"
    assert uid_prefixes("ffn.3.5") == ["ffn.", "ffn.3."]
    assert uid_prefixes("ffn.7") == ["ffn."]
    with pytest.raises(ConfigError, match="PREFIX"):
        split_uid("ffn.")
