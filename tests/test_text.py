"""Token ids -> text deltas: whole characters only, stop strings cut, nothing leaked early."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from foresight_lab import tokenizer as ours
from foresight_lab.engine.text import CompletionText, IncrementalDetokenizer, StopMatcher

TRAINING_SENTENCES = [
    "héllo wörld — 日本語 🙂",
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello again; stop here. END of story",
    "naïve café déjà vu — 東京 👋🏽",
]
MULTI_BYTE_TEXTS = [
    "héllo wörld — 日本語 🙂",
    "🙂🙂 déjà vu 東京 👋🏽!",
    "plain ascii, then 語",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE: few merges, so most non-ASCII characters span several tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|end|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_SENTENCES * 3, trainer)
    return ours.Tokenizer(bpe, {"eos_token": "<|end|>"})


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """Llama-style: '▁' marks a space, unknown characters fall back to byte tokens, and
    decoding strips the first token's leading space."""
    pieces = [("<unk>", 0.0), ("</s>", 0.0), ("▁", -2.0), ("▁hello", -1.0), ("▁world", -1.0)]
    pieces += [(letter, -3.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(f"<0x{byte:02X}>", -10.0) for byte in range(256)]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return ours.Tokenizer(unigram, {"eos_token": "</s>", "unk_token": "<unk>"})


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: the worst split a byte-level model can produce."""
    to_byte_symbols = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = "".join(piece for piece, _ in to_byte_symbols.pre_tokenize_str(text))
    return tokenizer.convert_tokens_to_ids(list(symbols))


def stream(tokenizer, token_ids, stops=()) -> tuple[list[str], CompletionText, bool]:
    completion = CompletionText(tokenizer, stops)
    deltas, stopped = [], False
    for token_id in token_ids:
        delta, stopped = completion.push(token_id)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(completion.finish())
    return deltas, completion, stopped


def cut_at_first_stop(text: str, stops) -> str:
    """Reference: the stop that completes first (then the longest such) ends the text."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[: min(starts)]
    return text


# --- IncrementalDetokenizer -----------------------------------------------------------


def test_fixture_splits_characters_across_tokens(tokenizer):
    # Guards the other tests: they only mean something if characters really are split.
    ids = tokenizer.encode("日本語 🙂")
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)


@pytest.mark.parametrize("text", MULTI_BYTE_TEXTS)
def test_deltas_join_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", MULTI_BYTE_TEXTS)
def test_no_delta_contains_half_a_character(tokenizer, text):
    for ids in (tokenizer.encode(text), byte_token_ids(tokenizer, text)):
        detokenizer = IncrementalDetokenizer(tokenizer)
        deltas = [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]
        assert not any("\ufffd" in delta for delta in deltas)
        assert "".join(deltas) == text


def test_emoji_sent_byte_by_byte_arrives_whole_on_its_last_byte(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in byte_token_ids(tokenizer, "🙂")]
    assert deltas == ["", "", "", "🙂"]


def test_spaces_between_words_survive_a_tokenizer_that_strips_a_leading_space(
    sentencepiece_tokenizer,
):
    ids = sentencepiece_tokenizer.encode("hello world 日本 🙂 and")
    # Decoding each token on its own would lose every space: "helloworld日本🙂and".
    assert sentencepiece_tokenizer.decode(ids[1:2]) == "world"
    detokenizer = IncrementalDetokenizer(sentencepiece_tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(deltas) == "hello world 日本 🙂 and"
    assert not any("\ufffd" in delta for delta in deltas)


def test_truly_invalid_bytes_are_released_at_flush(tokenizer):
    lead_byte_only = byte_token_ids(tokenizer, "🙂")[:1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(lead_byte_only[0]) == ""
    assert detokenizer.flush() == "\ufffd"


def test_special_tokens_are_skipped_by_default(tokenizer):
    ids = tokenizer.encode("hello") + [tokenizer.eos_token_id]
    _, completion, _ = stream(tokenizer, ids)
    assert completion.text == "hello"


def test_special_tokens_kept_when_asked(tokenizer):
    ids = tokenizer.encode("hello") + [tokenizer.eos_token_id]
    completion = CompletionText(tokenizer, skip_special_tokens=False)
    for token_id in ids:
        completion.push(token_id)
    completion.finish()
    assert completion.text == "hello<|end|>"


# --- StopMatcher ----------------------------------------------------------------------


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


def test_partial_stop_is_held_back_then_released_when_it_does_not_complete():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("O") == ("", False)
    assert matcher.push("P") == ("", True)

    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("OW") == ("STOW", False)


def test_partial_stop_at_the_end_is_released_by_flush():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go STO") == ("go ", False)
    assert matcher.flush() == "STO"


def test_nothing_after_a_stop_is_emitted():
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("a\n\nb") == ("a", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


@given(
    text=st.text(alphabet="abé日🙂 ", max_size=30),
    stops=st.lists(st.text(alphabet="abé日🙂 ", min_size=1, max_size=3), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=10),
)
def test_result_does_not_depend_on_how_text_is_split(text, stops, cuts):
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    matcher = StopMatcher(stops)
    emitted, stopped = "", False
    for start, end in zip(bounds, bounds[1:], strict=False):
        safe, stopped = matcher.push(text[start:end])
        emitted += safe
        if stopped:
            break
    emitted += matcher.flush()
    assert emitted == cut_at_first_stop(text, stops)


# --- CompletionText -------------------------------------------------------------------


def test_stop_split_across_two_tokens_is_cut(tokenizer):
    ids = tokenizer.encode("hello wor") + tokenizer.encode("ld. END") + tokenizer.encode(" more")
    deltas, completion, stopped = stream(tokenizer, ids, stops=["world"])
    assert stopped
    assert completion.text == "".join(deltas) == "hello "


def test_stop_split_across_three_tokens_is_cut_and_text_before_it_emitted(tokenizer):
    ids = tokenizer.encode("the fox") + [tokenizer.convert_tokens_to_ids(c) for c in "END"]
    ids += tokenizer.encode(" of story")
    deltas, completion, stopped = stream(tokenizer, ids, stops=["END"])
    assert stopped
    assert completion.text == "the fox"
    assert "E" not in "".join(deltas)


def test_multi_byte_stop_split_across_byte_tokens_is_cut(tokenizer):
    ids = tokenizer.encode("héllo ") + byte_token_ids(tokenizer, "🙂") + tokenizer.encode(" x")
    deltas, completion, stopped = stream(tokenizer, ids, stops=["🙂"])
    assert stopped
    assert completion.text == "héllo "
    assert not any("\ufffd" in delta for delta in deltas)


def test_earliest_stop_in_the_text_wins_not_the_first_listed(tokenizer):
    ids = tokenizer.encode("hello world, hello again")
    _, completion, stopped = stream(tokenizer, ids, stops=["again", "world"])
    assert stopped
    assert completion.text == "hello "


def test_stop_at_the_very_start_gives_empty_text(tokenizer):
    deltas, completion, stopped = stream(tokenizer, tokenizer.encode("hello world"), ["hello"])
    assert stopped
    assert completion.text == "" and all(delta == "" for delta in deltas)


def test_prefix_of_stop_that_never_completes_is_released_at_finish(tokenizer):
    ids = tokenizer.encode("hello wor")
    completion = CompletionText(tokenizer, ["world"])
    streamed = "".join(completion.push(token_id)[0] for token_id in ids)
    assert streamed == "hello "
    assert completion.finish() == "wor"
    assert completion.text == "hello wor"


def test_tokens_after_stop_or_finish_are_ignored(tokenizer):
    completion = CompletionText(tokenizer, ["hello"])
    for token_id in tokenizer.encode("hello"):
        completion.push(token_id)
    assert completion.push(tokenizer.encode("x")[0]) == ("", True)
    assert completion.finish() == ""
    assert completion.text == ""


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab é日🙂—", max_size=25),
    stops=st.lists(st.text(alphabet="ab é日🙂", min_size=1, max_size=3), max_size=4),
    byte_by_byte=st.booleans(),
)
def test_final_text_is_full_text_cut_at_first_stop(tokenizer, text, stops, byte_by_byte):
    ids = byte_token_ids(tokenizer, text) if byte_by_byte else tokenizer.encode(text)
    deltas, completion, _ = stream(tokenizer, ids, stops)
    assert completion.text == "".join(deltas) == cut_at_first_stop(tokenizer.decode(ids), stops)
    assert not any("\ufffd" in delta for delta in deltas)
