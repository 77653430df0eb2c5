"""The Compare tab: the reference and a tuned adapter (or adapters A and B) answer the same prompts with the
same sampling settings, side by side, each answer with its implicit reward. The work is lora_dpo.compare's,
the same code as `lora-dpo compare`. Under the panes: how far each adapter moved the model by its run's final
evaluation (KL, reward margin), and on request where the two answers of every prompt part, word by word."""

from __future__ import annotations

import difflib
import html
import threading

import gradio as gr
import pandas as pd

from lora_dpo.compare import Comparer, Row, Sampling
from lora_dpo.compare.comparer import DEFAULT_BETA
from lora_dpo.errors import UserError
from lora_dpo.run import resolve_source

from .runs import refreshed
from .workspace import Workspace

NONE = "(none)"
# an adapter has hardly moved the model when its held-out reward margin is under MARGIN_STILL nats of log-ratio
# (margin / beta: how much more the tuned model prefers the chosen answer than the reference does) and its KL is
# under KL_STILL nats per token. Calibrated on the toy run, greedy decoding: identical answers up to 10 steps
# (0.096 nats), different ones from 15 (0.16). The KL alone says little: eval.json's `kl` is the signed mean
# log-ratio over chosen and rejected answers, which cancel (0.0002 after 30 steps, when every answer differs).
MARGIN_STILL = 0.1
KL_STILL = 0.01
BARELY_MOVED = ("the adapter barely moved the model: identical answers are expected; train longer or with a higher "
                "learning rate")
DEL = '<del style="background:#fbd3d3">'  # words only in the left pane (struck through without the colour too)
INS = '<ins style="background:#cdf5cd">'  # words only in the right pane (underlined)


class CompareTab:
    def __init__(self, ws: Workspace, allow_code: bool = False):
        self.ws, self.allow_code = ws, allow_code
        # one comparison or chat reply at a time: they share one model in memory (the Chat tab takes it too)
        self.lock = threading.Lock()
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
            with self.lock:
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

    def details(self, a: str, b: str, rows: list[dict], show: bool):
        """-> (the adapters' final KL and margin, with a note for one that barely moved; the differences view)."""
        try:
            chosen = [(n, self.ws.resolve(p, "runs", "exports", what=f"adapter {n}"))
                      for n, p in (("A", a), ("B", b)) if p and p != NONE]
            lines = [movement("tuned" if len(chosen) == 1 else n, self.ws.show(path), resolve_source(path).final)
                     for n, path in chosen]
        except UserError:  # the comparison itself said what is wrong
            lines = []
        return "\n\n".join(lines), self.differences(rows, show)

    def differences(self, rows: list[dict], show: bool):
        return gr.update(value=differences_html(rows) if show and rows else "", visible=bool(show))

    def refresh(self, current: str | None):
        """The finished runs as choices (a run that finished since the page loaded appears); A defaults to
        the newest."""
        return refreshed(self.ws, current), gr.update(choices=[NONE, *self.ws.finished_runs()])

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
        summary = gr.Markdown(elem_id="compare-summary")
        show_diff = gr.Checkbox(False, label="show differences (word by word, every prompt)", elem_id="show-diff")
        diff = gr.HTML(visible=False, elem_id="diff")
        table = gr.Dataframe(headers=["prompt", "reference", "reward", "tuned", "reward"], wrap=True,
                             column_widths=["18%", "32%", "9%", "32%", "9%"],
                             interactive=False, label="all prompts (click a row to show it above)", elem_id="table")
        rows = gr.State([])

        # /compare's outputs stay as they were: the summary and differences follow as a private step
        run.click(self.compare, [a, b, prompts, temperature, top_p, max_new, seed, score_with],
                  [table, left, right, note, rows], api_name="compare").success(
            self.details, [a, b, rows, show_diff], [summary, diff], api_visibility="private")
        show_diff.change(self.differences, [rows, show_diff], diff, api_visibility="private")
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


def barely_moved(final: dict) -> bool:
    """Whether a run's final evaluation (eval.json) says its adapter hardly changed the model: a reward margin
    under MARGIN_STILL nats of log-ratio and a KL under KL_STILL nats per token (see MARGIN_STILL). False when
    eval.json has no reward margin (SFT): nothing to tell."""
    margin, kl, beta = final.get("rewards/margins"), final.get("kl"), final.get("beta")
    if not isinstance(margin, (int, float)):
        return False
    beta = beta if isinstance(beta, (int, float)) and beta > 0 else DEFAULT_BETA
    return abs(margin) / beta < MARGIN_STILL and (not isinstance(kl, (int, float)) or abs(kl) < KL_STILL)


def movement(label: str, where: str, final: dict | None) -> str:
    """Markdown: the run's final KL and reward margin (the reference's beside them), and BARELY_MOVED when they
    say so; `final` is the run's eval.json (None for an adapter folder or a checkpoint, which have none)."""
    if not final:
        return f"**{label}** (`{where}`): no eval.json beside this adapter, so its final KL and margin are unknown"
    baseline = final.get("baseline") or {}
    parts = []
    for key, name, unit in (("kl", "KL to the reference", " nats/token"), ("rewards/margins", "reward margin", "")):
        if isinstance(final.get(key), (int, float)):
            ref = baseline.get(key)
            ref = f" (reference {ref:.4f})" if isinstance(ref, (int, float)) else ""
            parts.append(f"{name} **{final[key]:.4f}**{unit}{ref}")
    line = (f"**{label}** (`{where}`), held out after {final.get('step', '?')} steps: "
            + ("; ".join(parts) or "eval.json has no KL or reward margin"))
    return line + (f"  \n⚠ {BARELY_MOVED}" if barely_moved(final) else "")


def word_diff_html(left: str, right: str) -> str:
    """`left` and `right` compared word by word (difflib): the words only in `left` in <del>, those only in
    `right` in <ins>, the rest as they are; all of it HTML-escaped. Whitespace becomes single spaces."""
    a, b = left.split(), right.split()
    words = lambda seq: html.escape(" ".join(seq))  # noqa: E731
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(words(a[i1:i2]))
        if op in ("delete", "replace"):
            out.append(f"{DEL}{words(a[i1:i2])}</del>")
        if op in ("insert", "replace"):
            out.append(f"{INS}{words(b[j1:j2])}</ins>")
    return " ".join(out)


def differences_html(rows: list[dict]) -> str:
    """HTML: for each compared prompt (rows as `rows_state` keeps them), where its two answers part."""
    left, right = list(rows[0]["answers"])
    parts = [f"<p>{DEL}struck</del>: only in <b>{html.escape(left)}</b>; {INS}underlined</ins>: only in "
             f"<b>{html.escape(right)}</b></p>"]
    for row in rows:
        a, b = (row["answers"][k] for k in (left, right))
        body = f"<i>identical answers:</i> {html.escape(a)}" if a.split() == b.split() else word_diff_html(a, b)
        parts.append(f'<div class="diff-row"><p><b>{html.escape(row["prompt"])}</b></p><p>{body}</p></div>')
    return "\n".join(parts)
