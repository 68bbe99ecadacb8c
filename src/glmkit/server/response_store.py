"""Stored responses of the Responses API: a bounded in-memory LRU, so `previous_response_id`, GET, DELETE and
`item_reference` work within one server process (nothing survives a restart).

Each entry keeps the response object, its own input items, and its conversation: the previous response's
conversation + its input items + its output items (the instructions are never part of it, as OpenAI does not
carry them over). Items are shared between entries, not copied. Knows nothing of HTTP or the engine.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_CAPACITY = 1000


@dataclass
class StoredResponse:
    response: dict
    input_items: list[dict]
    conversation: list[dict]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._items: dict[str, dict] = {}          # item id -> item, for `item_reference`

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: StoredResponse) -> None:
        rid = entry.response["id"]
        if rid in self._entries:
            self.delete(rid)
        self._entries[rid] = entry
        for item in self._own_items(entry):
            self._items[item["id"]] = item
        while len(self._entries) > self.capacity:
            self.delete(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        for item in self._own_items(entry):
            if self._items.get(item["id"]) is item:
                del self._items[item["id"]]
        return True

    def item(self, item_id: str) -> dict | None:
        return self._items.get(item_id)

    @staticmethod
    def _own_items(entry: StoredResponse) -> list[dict]:
        return [i for i in entry.input_items + entry.response["output"] if i.get("id")]
