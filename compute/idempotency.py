"""The answers kept for Idempotency-Keys, held by a replica (jobs/serve.py) and, with several
replicas, by the application's claims actor (actors/idempotency.py).

    RecentAnswers(keep)
      get(key)              -> (status code, body), or None
      put(key, answer)      the first answer of a key stays; past `keep` keys the oldest is dropped
                            (keep 0: none is kept, the audit tables answer)

Keys are request offsets (compute/online.py request_offset), so no key text is held. Plain Python.
"""

from __future__ import annotations

from collections import OrderedDict


class RecentAnswers:
    def __init__(self, keep: int):
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, not {keep}")
        self.keep = keep
        self._answers: OrderedDict[int, tuple[int, dict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def items(self) -> list[tuple[int, tuple[int, dict]]]:
        """(key, answer), oldest first."""
        return list(self._answers.items())

    def get(self, key: int) -> tuple[int, dict] | None:
        return self._answers.get(key)

    def put(self, key: int, answer: tuple[int, dict]) -> None:
        if key in self._answers:
            return  # the first answer is the answer
        self._answers[key] = answer
        while len(self._answers) > self.keep:
            self._answers.popitem(last=False)
