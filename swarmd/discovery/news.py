"""News: what this daemon passes on in gossip, and how much of it fits one message.

A piece of news is a record this daemon believes, a beat that lifts a suspicion, or a
suspicion this daemon's own contact confirmed (membership.py decides which is news). Here is
decided how each is named (its tag: callers send the tags they hold, and get only what those
lack), that a node's newer record or beat replaces its older one, how long news is passed on
(the table's `hot_rounds()`, given by the caller), how many pieces are held at once (MAX_NEWS),
and which go into a reply of `max_bytes`: suspicions, then beats, then records, the nodes the
caller has no news of first.

A record heard as news of a node this daemon has not reached yet is held back here until the
node answers (`hold`, `release`): news is only what this daemon believes."""

from __future__ import annotations

import json
import random
import threading

from swarmd.discovery.table import TAG_CHARS

MAX_NEWS = 512  # tags in one request (and news items a daemon passes on at once)
NODE_CHARS = 6  # of a node id, at the start of a news tag


def news_tag(kind: str, wire: object) -> str:
    """Names one piece of news: prefixes of the node's id and of the signature of its record or
    beat; for a suspicion, the node and the beat suspected."""
    if kind == "suspect":
        assert isinstance(wire, list)
        return f"s{wire[0][:NODE_CHARS - 1]}.{wire[1]}.{wire[2]}"
    assert isinstance(wire, dict)
    node_id = wire["id"] if kind == "beat" else json.loads(wire["body"])["node_id"]
    return node_id[:NODE_CHARS] + str(wire["sig"])[:TAG_CHARS - NODE_CHARS]


class News:
    """The news this daemon passes on, by tag, and the records it holds back until it has
    reached their nodes."""

    def __init__(self) -> None:
        # tag -> (last round, kind, wire, its size as JSON); kind: record, beat, suspect. The size
        # is measured once here: every gossip request packs a reply by it
        self._hot: dict[str, tuple[int, str, object, int]] = {}
        self._lock = threading.Lock()  # requests are answered on the serving thread
        self._held: dict[str, int] = {}  # node id -> round its record came as news, not yet reached

    def add(self, kind: str, wire: object, round_: int) -> None:
        """`wire` is news from `round_` on; the oldest news makes room past MAX_NEWS."""
        tag = news_tag(kind, wire)
        with self._lock:
            if kind != "suspect":  # a newer version replaces the node's older news
                for old in [t for t in self._hot if t[:NODE_CHARS] == tag[:NODE_CHARS] and self._hot[t][1] == kind]:
                    del self._hot[old]
            self._hot[tag] = (round_, kind, wire, len(json.dumps(wire)))
            if len(self._hot) > MAX_NEWS:
                oldest = min(self._hot, key=lambda t: self._hot[t][0])
                del self._hot[oldest]

    def expire(self, round_: int, keep_rounds: int) -> None:
        """Forget news, and held-back records, `keep_rounds` old at `round_`."""
        with self._lock:
            for tag in [t for t, (r, *_) in self._hot.items() if round_ - r >= keep_rounds]:
                del self._hot[tag]
        for node_id in [n for n, r in self._held.items() if round_ - r >= keep_rounds]:
            del self._held[node_id]

    def clear(self) -> None:
        with self._lock:
            self._hot.clear()

    def pick(self, known: set[str] | frozenset[str], max_bytes: int) -> dict[str, list]:
        """The news that `known` (a caller's tags) lacks, within `max_bytes`: suspicions first,
        then beats, then records, each in random order."""
        with self._lock:
            items = [(tag, kind, wire, size) for tag, (_, kind, wire, size) in self._hot.items() if tag not in known]
        random.shuffle(items)
        nodes = {t[:NODE_CHARS] for t in known}
        items.sort(key=lambda item: item[0][:NODE_CHARS] in nodes)  # nodes the caller has no news of first
        out: dict[str, list] = {"suspects": [], "beats": [], "records": []}
        left = max_bytes
        for kind in ("suspect", "beat", "record"):
            for _, k, wire, size in items:
                if k == kind and size + 8 <= left:
                    out[kind + "s"].append(wire)
                    left -= size + 8
        return out

    def tags(self) -> list[str]:
        """The tags of the news held, newest first, at most MAX_NEWS (what a request says it holds)."""
        with self._lock:
            return sorted(self._hot, key=lambda t: -self._hot[t][0])[:MAX_NEWS]

    def hold(self, node_id: str, round_: int) -> None:
        """A record of `node_id` came as news in `round_`, before this daemon reached the node."""
        self._held[node_id] = round_

    def is_held(self, node_id: str) -> bool:
        return node_id in self._held

    def release(self, node_id: str) -> bool:
        """`node_id` answered: True when a record of it was held back (it is news now)."""
        return self._held.pop(node_id, None) is not None
