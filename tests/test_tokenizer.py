"""Our Tokenizer gives what the transformers tokenizer it comes from gives: the same ids,
text, special tokens and chat prompts, whether wrapped in memory or loaded from its saved
files without transformers."""

import jinja2
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from foresight_lab.tokenizer import Tokenizer
from tests.tiny import CHATML, tiny_hf_tokenizer

TEXTS = [
    "the quick brown fox",
    " naïve café — 東京 🙂\n\tend",
    "<|im_start|>user\nhello<|im_end|>",
    "",
]


def sentencepiece_hf_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Llama-style pieces whose tokenizer adds BOS (set through transformers' config)."""
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0), ("▁hello", -1.0)]
    pieces += [(letter, -3.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(f"<0x{byte:02X}>", -10.0) for byte in range(256)]
    unigram = RustTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=unigram,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def pair(request, tmp_path_factory):
    """(transformers tokenizer, ours wrapped in memory, ours loaded from its saved files)."""
    reference = tiny_hf_tokenizer() if request.param == "bpe" else sentencepiece_hf_tokenizer()
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(str(directory))
    return reference, Tokenizer.from_transformers(reference), Tokenizer.from_directory(directory)


def test_ids_text_and_special_tokens_are_transformers(pair):
    reference, *ours = pair
    for tokenizer in ours:
        for text in TEXTS:
            for special in (True, False):
                ids = reference.encode(text, add_special_tokens=special)
                assert tokenizer.encode(text, add_special_tokens=special) == ids
            ids = reference.encode(text)
            for skip in (True, False):
                assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
                    ids, skip_special_tokens=skip
                )
            assert tokenizer.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        assert tokenizer.all_special_ids == reference.all_special_ids
        assert tokenizer.all_special_tokens == reference.all_special_tokens
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            assert getattr(tokenizer, name) == getattr(reference, name)
            assert getattr(tokenizer, f"{name}_id") == getattr(reference, f"{name}_id")
        assert tokenizer.convert_tokens_to_ids("not-a-token") == reference.convert_tokens_to_ids(
            "not-a-token"
        )
        assert len(tokenizer) == len(reference)


def test_a_sentencepiece_tokenizer_that_adds_bos_still_does_from_its_saved_files(tmp_path):
    reference = sentencepiece_hf_tokenizer()
    reference.save_pretrained(str(tmp_path))
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.encode("hello")[0] == reference.bos_token_id
    assert loaded.encode("hello", add_special_tokens=False)[0] != reference.bos_token_id


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_encodes_and_decodes_as_transformers_does(text):
    reference = _BPE_REFERENCE
    ids = reference.encode(text)
    assert _BPE_OURS.encode(text) == ids
    assert _BPE_OURS.decode(ids) == reference.decode(ids)


_BPE_REFERENCE = tiny_hf_tokenizer()
_BPE_OURS = Tokenizer.from_transformers(_BPE_REFERENCE)

# Templates that use what transformers' environment adds to jinja2's: trimmed blocks,
# loop controls, raise_exception, its tojson, namespace, the generation block, and the
# special tokens as variables.
TEMPLATES = {
    "chatml": CHATML,
    "trimmed blocks": (
        "{{ bos_token }}\n{% for m in messages %}\n"
        "  {% if m['role'] == 'system' %}\n[{{ m['content'] }}]\n"
        "  {% else %}\n{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n  {% endif %}\n"
        "{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}"
    ),
    "loop controls and namespace": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{{ ns.n }}. {{ m['content'] }}\n{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}"
    ),
    "tojson and missing keys": (
        "{% for m in messages %}{{ m | tojson }}"
        "{% if m['name'] is defined %} from {{ m['name'] }}{% endif %}\n{% endfor %}"
    ),
    "generation block": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    ),
}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": '<b>Héllo</b> & "quotes" 🙂', "name": None},
    {"role": "assistant", "content": "Hi.", "tool_calls": None},
    {"role": "user", "content": "And 2+2?", "name": "ada"},
]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_prompts_are_the_ones_transformers_renders(name, add_generation_prompt):
    reference = tiny_hf_tokenizer()
    reference.chat_template = TEMPLATES[name]
    ours = Tokenizer.from_transformers(reference)
    for messages in (MESSAGES, MESSAGES[1:2]):
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
        ids = ours.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt
        )
        assert ids == reference.encode(expected, add_special_tokens=False)


def test_a_templates_own_refusal_and_the_sandbox_stay_errors():
    refuses = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    )
    ours = Tokenizer(_BPE_OURS.backend_tokenizer, {}, refuses)
    with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])
    escapes = "{% set ns = namespace() %}{% set ns._secret = 1 %}{{ ns }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(_BPE_OURS.backend_tokenizer, {}, escapes).apply_chat_template([])
    reads = "{{ messages.__class__ }}|{{ messages.pop }}"  # unsafe: undefined, so empty
    assert Tokenizer(_BPE_OURS.backend_tokenizer, {}, reads).apply_chat_template([]) == "|"


def test_a_tokenizer_without_a_template_says_so():
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(_BPE_OURS.backend_tokenizer, {}).apply_chat_template(MESSAGES)
