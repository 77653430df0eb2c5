"""The Compare tab: the reference and a tuned adapter (or adapters A and B) answer the same prompts with the
same sampling settings, side by side, each answer with its implicit reward. The work is lora_dpo.compare's,
the same code as `lora-dpo compare`."""

from __future__ import annotations

import threading

import gradio as gr
import pandas as pd

from lora_dpo.compare import Comparer, Row, Sampling
from lora_dpo.errors import UserError
from lora_dpo.run import resolve_source

from .workspace import Workspace

NONE = "(none)"


class CompareTab:
    def __init__(self, ws: Workspace, allow_code: bool = False):
        self.ws, self.allow_code = ws, allow_code
        self._lock = threading.Lock()  # one comparison at a time: they share one model in memory
        self._loaded: tuple[tuple, Comparer] | None = None  # the last (adapters, model): reloading takes time

    def comparer(self, a: str, b: str) -> Comparer:
        paths = [str(self.ws.resolve(p, "runs", "exports", what=f"adapter {n}"))
                 for n, p in (("A", a), ("B", b)) if p and p != NONE]
        if not paths:
            raise UserError("adapter A: choose a finished run or type an adapter folder")
        if not self.allow_code and any(resolve_source(p).trust_remote_code for p in paths):
            raise UserError("model.trust_remote_code: this run's base runs its own code; the app loads it only "
                            "when started with --allow-code (or use `lora-dpo compare`)")
        # a run retrained in place (overwrite=true) has a new adapter file: reload, do not show the old one
        key = tuple((p, _mtime(p)) for p in paths)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous model before loading the next
            self._loaded = (key, Comparer.load(paths))
        return self._loaded[1]

    def compare(self, a, b, prompts, temperature, top_p, max_new_tokens, seed, score_with):
        """-> table rows, left pane, right pane, note."""
        try:
            with self._lock:
                comparer = self.comparer(a, b)
                lines = [line for line in (prompts or "").splitlines() if line.strip()]
                sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens), int(seed))
                if score_with == "adapter B" and (not b or b == NONE):
                    raise UserError("rewards under adapter B: choose an adapter B first")
                score = "B" if score_with == "adapter B" else None
                rows = comparer.compare(lines, sampling, score)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        left, right = comparer.panes
        headers = ["prompt", left, f"reward ({left})", right, f"reward ({right})"]
        table = [[r.prompt, r.answers[left], round(r.rewards[left], 3), r.answers[right], round(r.rewards[right], 3)]
                 for r in rows]
        scorer = next(x for x in comparer.adapters if x.label == rows[0].score_with)
        note = (f"base **{comparer.base}** on {comparer.device}; rewards are β·log(π/π_ref) of each answer under "
                f"**{scorer.label}** ({self.ws.show(scorer.run or scorer.path)}, β={scorer.beta:g}); the "
                f"reference is the same model with the adapter disabled")
        return (pd.DataFrame(table, columns=headers), *_panes(rows[0], left, right), note, rows_state(rows))

    def refresh(self, current: str | None):
        """The finished runs as choices (a run that finished since the page loaded appears); A defaults to
        the newest."""
        runs = self.ws.finished_runs()
        return gr.update(choices=runs, value=current or (runs[-1] if runs else None)), gr.update(choices=[NONE, *runs])

    def select(self, rows: list[dict], evt: gr.SelectData):
        if not rows:
            return gr.update(), gr.update()
        row = rows[evt.index[0]] if isinstance(evt.index, (list, tuple)) else rows[evt.index]
        left, right = list(row["answers"])
        return _panes(Row(**row), left, right)

    def build(self) -> None:
        runs = self.ws.finished_runs()
        with gr.Row():
            a = gr.Dropdown(choices=runs, value=runs[-1] if runs else None, allow_custom_value=True,
                            label="adapter A: a finished run, or an adapter folder", elem_id="adapter-a")
            b = gr.Dropdown(choices=[NONE, *runs], value=NONE, allow_custom_value=True,
                            label="adapter B (optional): compare A with B instead of the reference with A",
                            elem_id="adapter-b")
            refresh = gr.Button("refresh runs", scale=0)
        prompts = gr.Textbox(label="prompts, one per line", lines=4, elem_id="prompts",
                             placeholder="write a review of the night river .")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=Sampling.temperature, step=0.05, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1, value=Sampling.top_p, step=0.05, label="top-p")
            max_new = gr.Slider(1, 1024, value=Sampling.max_new_tokens, step=1, label="max new tokens")
            seed = gr.Number(value=Sampling.seed, precision=0, label="seed (the same for both panes)")
            score_with = gr.Radio(["first adapter", "adapter B"], value="first adapter", label="rewards under")
        run = gr.Button("Compare", variant="primary", elem_id="compare")
        note = gr.Markdown()
        with gr.Row():
            left = gr.Textbox(label="reference", lines=6, elem_id="pane-left", interactive=False)
            right = gr.Textbox(label="tuned", lines=6, elem_id="pane-right", interactive=False)
        table = gr.Dataframe(headers=["prompt", "reference", "reward", "tuned", "reward"], wrap=True,
                             column_widths=["18%", "32%", "9%", "32%", "9%"],
                             interactive=False, label="all prompts (click a row to show it above)", elem_id="table")
        rows = gr.State([])

        run.click(self.compare, [a, b, prompts, temperature, top_p, max_new, seed, score_with],
                  [table, left, right, note, rows], api_name="compare")
        table.select(self.select, rows, [left, right], api_visibility="private")
        refresh.click(self.refresh, a, [a, b], api_visibility="private")
        self.adapters = [a, b]


def _mtime(source: str) -> int:
    adapter = resolve_source(source).adapter_dir / "adapter_model.safetensors"
    return adapter.stat().st_mtime_ns if adapter.exists() else 0


def _panes(row: Row, left: str, right: str):
    return (gr.update(value=row.answers[left], label=f"{left} · reward {row.rewards[left]:+.3f}"),
            gr.update(value=row.answers[right], label=f"{right} · reward {row.rewards[right]:+.3f}"))


def rows_state(rows: list[Row]) -> list[dict]:
    return [dict(prompt=r.prompt, answers=r.answers, rewards=r.rewards, score_with=r.score_with) for r in rows]
