"""Generated token ids -> streamed text deltas for one completion.

Two problems sit between the sampler and the client:

* A byte-level token can hold part of a multi-byte character (an emoji is four
  bytes and may arrive as four tokens). Decoding such a prefix ends in U+FFFD,
  so those tokens are held back until the character is complete.
* Stop strings can span token boundaries. Text that could still turn into a
  stop string is held back, so a client never sees a stop string's beginning
  that later turns out to be a stop.

    token ids ──> IncrementalDetokenizer ──> StopMatcher ──> deltas
                  (whole characters only)    (no stop text)
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Decodes token ids one at a time into text deltas, never splitting a character.

    Only a short window of tokens is decoded each step:

        ids:  ... | already emitted | last delta's tokens | pending tokens |
                                    ^ prefix_offset       ^ read_offset

    `decode(ids[prefix:read])` is the text already emitted for that window and
    `decode(ids[prefix:])` is the window with the pending tokens added; the new
    delta is the part after the former. Decoding with one token of context
    before the new ones (rather than the new tokens alone) keeps tokenizers
    that strip a leading space from the first token (SentencePiece) right.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ("" if none yet)."""
        self.token_ids.append(int(token_id))
        emitted_text, window_text = self._decode_window()
        # A trailing U+FFFD is (usually) a character whose remaining bytes are
        # still to come; an empty growth is a skipped special token. Wait in both cases.
        if len(window_text) <= len(emitted_text) or window_text.endswith(REPLACEMENT_CHARACTER):
            return ""
        return self._advance(emitted_text, window_text)

    def flush(self) -> str:
        """At the end of generation: whatever is held back, U+FFFD included if truly invalid."""
        emitted_text, window_text = self._decode_window()
        if len(window_text) <= len(emitted_text):
            return ""
        return self._advance(emitted_text, window_text)

    def _decode_window(self) -> tuple[str, str]:
        window = self.token_ids[self.prefix_offset :]
        emitted_count = self.read_offset - self.prefix_offset
        emitted_text = self._decode(window[:emitted_count])
        window_text = self._decode(window)
        return emitted_text, window_text

    def _advance(self, emitted_text: str, window_text: str) -> str:
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return window_text[len(emitted_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)


class StopMatcher:
    """Finds stop strings in streamed text; holds back text that may be the start of one.

    The stop that completes first wins; among stops completing at the same
    character, the one starting earliest (the longest) wins. This makes the
    result depend only on the text, not on how it was split into deltas: it is
    what a character-by-character stream would give.
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        stops = list(stops)
        for stop in stops:
            if not isinstance(stop, str):
                raise TypeError(f"stop strings must be str, got {type(stop).__name__}")
            if not stop:
                raise ValueError("stop strings must be non-empty; got an empty string")
        self.stops = stops
        self.stopped = False
        # Text received but not yet emitted: always shorter than the longest
        # stop, except inside one push.
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Adds a delta; returns (text now safe to emit, stopped?)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        stop_start = self._first_stop_start(text)
        if stop_start is not None:
            self.stopped = True
            self._held = ""
            return text[:stop_start], True
        held_count = self._longest_stop_prefix_at_end(text)
        self._held = text[len(text) - held_count :]
        return text[: len(text) - held_count], False

    def flush(self) -> str:
        """At the end (no stop hit): releases the held-back text."""
        released, self._held = self._held, ""
        return "" if self.stopped else released

    def _first_stop_start(self, text: str) -> int | None:
        # Text emitted earlier cannot contain a stop's start (it was held back
        # otherwise), so searching only `text` finds every candidate.
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        return None if best is None else best[1]

    def _longest_stop_prefix_at_end(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class CompletionText:
    """Detokenizer + stop matcher for one completion: push token ids, get (delta, stopped)."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), *, skip_special_tokens: bool = True):
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=skip_special_tokens
        )
        self.stop_matcher = StopMatcher(stops)
        self._deltas: list[str] = []
        self._finished = False

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; later tokens are ignored."""
        return self.stop_matcher.stopped

    def push(self, token_id: int) -> tuple[str, bool]:
        """Adds one generated token; returns (text delta for the client, stopped?)."""
        if self.stopped or self._finished:
            return "", self.stopped
        delta, stopped = self.stop_matcher.push(self.detokenizer.push(token_id))
        if delta:
            self._deltas.append(delta)
        return delta, stopped

    def finish(self) -> str:
        """Final delta when generation ended for another reason (EOS, length)."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        delta, stopped = self.stop_matcher.push(self.detokenizer.flush())
        if not stopped:
            delta += self.stop_matcher.flush()
        if delta:
            self._deltas.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far (the sum of deltas)."""
        return "".join(self._deltas)
