"""The playground: an ipywidgets app to sample from a model and look inside its choices.

    lab.playground()

A prompt (or a chat message), sliders for every sampling parameter, a button that
streams the answer in as it is produced (one box per choice), and a bar chart of the
next-token probabilities at a chosen position of the first choice: the model's own
and what the sampler draws from under the current settings.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import ipywidgets as widgets

from foresight_lab.engine.request import InvalidRequestError, SamplingOptions

if TYPE_CHECKING:
    from foresight_lab.lab import Lab

CHART_TOKENS = 10


class Playground:
    """Build with `lab.playground()`; display it as the last expression of a cell."""

    def __init__(self, lab: Lab, prompt: str = "The capital of France is"):
        self.lab = lab
        slider = dict(continuous_update=False, style={"description_width": "90px"})
        self.prompt = widgets.Textarea(value=prompt, description="Prompt", rows=3)
        self.chat = widgets.Checkbox(
            value=False,
            description="Chat: send as a user message through the model's template",
            disabled=not lab.model.chat_template,
        )
        self.temperature = widgets.FloatSlider(
            0.6, min=0, max=2, step=0.05, description="temperature", **slider
        )
        self.top_p = widgets.FloatSlider(
            1.0, min=0.01, max=1, step=0.01, description="top_p", **slider
        )
        self.top_k = widgets.IntSlider(0, min=0, max=200, description="top_k", **slider)
        self.min_p = widgets.FloatSlider(
            0.0, min=0, max=1, step=0.01, description="min_p", **slider
        )
        self.max_tokens = widgets.IntSlider(32, min=1, max=512, description="max_tokens", **slider)
        self.seed = widgets.IntText(0, description="seed", style=slider["style"])
        self.n = widgets.IntSlider(
            1, min=1, max=lab.engine.config.max_slots, description="n", **slider
        )
        self.run_button = widgets.Button(description="Generate", button_style="primary")
        self.status = widgets.HTML()
        self.answers = widgets.VBox()
        self.position = widgets.IntSlider(0, min=0, max=0, description="position", **slider)
        self.chart = widgets.HTML()
        self._prompt_ids: list[int] = []
        self._token_ids: list[int] = []

        self.run_button.on_click(self.run)
        self.position.observe(lambda _: self.show_distribution(), names="value")
        for control in (self.temperature, self.top_p, self.top_k, self.min_p):
            control.observe(lambda _: self.show_distribution(), names="value")

        sampling = widgets.VBox(
            [
                self.temperature,
                self.top_p,
                self.top_k,
                self.min_p,
                self.max_tokens,
                self.seed,
                self.n,
            ]
        )
        inspect = widgets.VBox(
            [
                widgets.HTML("<b>Next-token probabilities</b> (first choice)"),
                self.position,
                self.chart,
            ]
        )
        self.widget = widgets.VBox(
            [self.prompt, self.chat, sampling, self.run_button, self.status, self.answers, inspect]
        )

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    @property
    def sampling(self) -> dict:
        return dict(
            temperature=self.temperature.value,
            top_p=self.top_p.value,
            top_k=self.top_k.value,
            min_p=self.min_p.value,
        )

    def run(self, _button=None) -> None:
        """Generates with the current settings, streaming the text into the answer boxes."""
        boxes = [widgets.Textarea(rows=4, layout={"width": "95%"}) for _ in range(self.n.value)]
        self.answers.children = boxes
        self.status.value = "generating..."
        message = [{"role": "user", "content": self.prompt.value}]
        token_ids: list[list[int]] = [[] for _ in boxes]
        try:
            options = SamplingOptions(
                **self.sampling,
                max_tokens=self.max_tokens.value,
                seed=self.seed.value,
                n=self.n.value,
            )
            if self.chat.value:
                rendered = self.lab.render_chat(message)
                self._prompt_ids = self.lab.tokenize(rendered, add_special_tokens=False)
            else:
                self._prompt_ids = self.lab.tokenize(self.prompt.value)
            for delta in self.lab.engine.submit(self._prompt_ids, options):
                boxes[delta.index].value += delta.text
                token_ids[delta.index].extend(delta.token_ids)
        except InvalidRequestError as error:
            self.status.value = f"<span style='color: #b00'>{html.escape(str(error))}</span>"
            return
        self._token_ids = token_ids[0]
        self.status.value = f"{len(self._token_ids)} tokens in the first choice"
        self.position.max = len(self._token_ids)
        self.show_distribution()

    def show_distribution(self) -> None:
        """Draws the top next-token probabilities after `position` generated tokens."""
        if not self._prompt_ids:
            return
        context = self._prompt_ids + self._token_ids[: self.position.value]
        dist = self.lab.next_token_distribution(context, **self.sampling)
        chosen = (
            self._token_ids[self.position.value]
            if self.position.value < len(self._token_ids)
            else None
        )
        rows = []
        for text, token_id, model, sampling in dist.top(CHART_TOKENS):
            mark = " ◀ chosen" if token_id == chosen else ""
            rows.append(
                "<tr>"
                f"<td style='font-family: monospace'>{html.escape(repr(text))}</td>"
                f"<td>{_bar(model, '#1f77b4')} {model:.3f}</td>"
                f"<td>{_bar(sampling, '#ff7f0e')} {sampling:.3f}{mark}</td>"
                "</tr>"
            )
        self.chart.value = (
            f"<table><tr><th>token</th><th>model</th><th>sampling (kept: {dist.kept})</th></tr>"
            + "".join(rows)
            + "</table>"
        )


def _bar(probability: float, colour: str) -> str:
    width = max(1, round(200 * probability))
    return f"<span style='display:inline-block;width:{width}px;height:10px;background:{colour}'></span>"
