"""The command journal: a page of shared memory the executor writes and its supervisor reads.

Before the executor runs a command it writes down which one (`begin`); once the
command is answered, that it is done (`done`). The supervisor reads the page
without asking the executor anything, so it knows, even after the executor died
or while it is stuck inside torch:

- which command is in hand and since when: past the worker's `command_timeout`
  the supervisor stops the executor, and after a crash it names the command
  that caused it (the poison, never to run again);
- which commands ran to the end: a new executor skips them when the broker
  delivers them again (their acknowledgement, batched, may have been lost with
  the old executor), so nothing runs twice;
- which of those were not answered yet: the commands of a batch are answered
  together once the last has run (`ran`, then `answered`). A new executor
  answers them when they come again — with the plain "done" they would have
  had, or, for one whose answer carried more, an error saying it ran and its
  answer was lost — rather than leave their sender waiting out its timeout.

The page is a memfd (no name to leak); both processes map it. Layout, little
endian:

    header (64 bytes)
       0  u64 seq        a seqlock: odd while the executor writes the header
       8  u64 number     the command in hand (or the last one), counting from 1
      16  i64 started    CLOCK_MONOTONIC ns when it began; 0 when none is in hand
    RING slots of SLOT bytes, command n in slot n % RING
       0  u64 number
       8  u8  state      1 running, 2 done, 3 ran (answer: plain ok), 4 ran (other)
      10  u16 key length
      16  key            sender NUL correlation id (UTF-8, at most SLOT - 16 bytes)

No torch here: the supervisor imports this module.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Final

__all__ = ["DONE", "RAN_OK", "RAN_OTHER", "Journal", "command_key", "create_journal"]

HEADER: Final = 64
SLOT: Final = 256
RING: Final = 4096
"""More than a prefetch window and an acknowledgement batch: all a restart can see again."""
SIZE: Final = HEADER + SLOT * RING
KEY_MAX: Final = SLOT - 16

RUNNING: Final = 1
DONE: Final = 2
RAN_OK: Final = 3
"""Ran; its answer, not sent yet, is the plain `{"ok": None}`."""
RAN_OTHER: Final = 4
"""Ran; its answer, not sent yet, carries a value or an error."""

_SEQ = struct.Struct("<Q")
_NOW = struct.Struct("<Qq")  # number, started (at offset 8)
_READ = struct.Struct("<QQq")  # seq, number, started (at offset 0)
_SLOT_HEAD = struct.Struct("<QBxH")  # number, state, key length
_STATE = struct.Struct("<B")


def command_key(sender: str, correlation_id: str) -> bytes:
    """How the journal names a command: who sent it, and its correlation id."""
    return f"{sender}\0{correlation_id}".encode()[:KEY_MAX]


def create_journal() -> int:
    """A new, empty journal file: a memfd, gone once nobody holds it."""
    fd = os.memfd_create("torchrelay-journal", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return fd


class Journal:
    """The journal in the memfd `fd` (both sides use this class)."""

    __slots__ = ("_map", "_number", "_slot")

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._number = self.in_hand()[0]  # a new executor goes on counting
        self._slot = 0

    # -- the executor's side: two calls per command -------------------------------------

    def begin(self, key: bytes) -> None:
        """Command `key` is in hand, from now."""
        page = self._map
        number = self._number = self._number + 1
        started = time.monotonic_ns()
        slot = self._slot = HEADER + (number % RING) * SLOT
        _SLOT_HEAD.pack_into(page, slot, number, RUNNING, len(key))
        page[slot + 16 : slot + 16 + len(key)] = key
        self._write_header(number, started)

    def done(self) -> None:
        """The command in hand ran to the end and was answered."""
        _STATE.pack_into(self._map, self._slot + 8, DONE)
        self._write_header(self._number, 0)

    def ran(self, *, plain_ok: bool) -> tuple[int, int]:
        """The command in hand ran to the end; its answer goes later (with its batch's).
        A token for `answered`."""
        _STATE.pack_into(self._map, self._slot + 8, RAN_OK if plain_ok else RAN_OTHER)
        self._write_header(self._number, 0)
        return self._number, self._slot

    def answered(self, tokens: list[tuple[int, int]]) -> None:
        """The answers of the commands `ran` gave these tokens for went out."""
        page = self._map
        for number, slot in tokens:
            if _SLOT_HEAD.unpack_from(page, slot)[0] == number:  # (not reused since)
                _STATE.pack_into(page, slot + 8, DONE)

    def _write_header(self, number: int, started: int) -> None:
        # A seqlock: the reader retries while the count is odd or changed under it, so it
        # never takes a new number with an old start time (and a healthy command for an
        # overdue one). x86 keeps stores in order; that is what this relies on.
        page = self._map
        seq = _SEQ.unpack_from(page, 0)[0]
        _SEQ.pack_into(page, 0, seq + 1)
        _NOW.pack_into(page, 8, number, started)
        _SEQ.pack_into(page, 0, seq + 2)

    # -- the supervisor's side ------------------------------------------------------------

    def in_hand(self) -> tuple[int, int]:
        """(number, started ns) of the command in hand; started is 0 when none is."""
        page = self._map
        while True:
            seq, number, started = _READ.unpack_from(page, 0)
            if not seq & 1 and _SEQ.unpack_from(page, 0)[0] == seq:
                return number, started

    def seconds_in_hand(self) -> float:
        """How long the command in hand has run (0.0 when none is)."""
        started = self.in_hand()[1]
        return (time.monotonic_ns() - started) / 1e9 if started else 0.0

    def poison(self) -> bytes | None:
        """The key of the command in hand when the executor died, if one was."""
        number, started = self.in_hand()
        if not started:
            return None
        slot_number, state, key = self._read_slot(number)
        return key if slot_number == number and state == RUNNING else None

    def finished(self) -> list[tuple[bytes, int]]:
        """The keys of the commands that ran to the end, oldest first (at most `RING`), each
        with its state: `DONE`, or `RAN_OK` / `RAN_OTHER` if its answer never went out."""
        number = self.in_hand()[0]
        keys = []
        for n in range(max(1, number - RING + 1), number + 1):
            slot_number, state, key = self._read_slot(n)
            if slot_number == n and state in (DONE, RAN_OK, RAN_OTHER):
                keys.append((key, state))
        return keys

    def clear_in_hand(self) -> None:
        """After the executor died: nothing is in hand any more (its slot still names the
        poison). Else its successor would be judged by the dead one's clock."""
        self._write_header(self.in_hand()[0], 0)

    def _read_slot(self, number: int) -> tuple[int, int, bytes]:
        slot = HEADER + (number % RING) * SLOT
        slot_number, state, length = _SLOT_HEAD.unpack_from(self._map, slot)
        return slot_number, state, bytes(self._map[slot + 16 : slot + 16 + min(length, KEY_MAX)])

    def close(self) -> None:
        self._map.close()
