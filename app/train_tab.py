"""The Train tab: a recipe, its main fields, the equivalent command, Start/Stop, live progress and plots."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from lora_dpo import LOSSES
from lora_dpo.config import load_recipe
from lora_dpo.errors import UserError
from lora_dpo.run import series

from .jobs import JobManager, Progress, train_command
from .workspace import Workspace

# (recipe key, label): the fields the tab shows; everything else comes from the recipe file unchanged.
FIELDS = [
    ("model.name", "model (Hub id, local folder, or toy)"),
    ("data.train", "dataset (Hub id, file in the data folder, or toy)"),
    ("loss.name", "loss"),
    ("loss.beta", "beta"),
    ("train.lr", "learning rate"),
    ("train.epochs", "epochs"),
    ("train.batch_size", "batch size (pairs)"),
    ("train.grad_accum", "gradient accumulation"),
    ("data.max_length", "max length (tokens)"),
    ("lora.r", "LoRA rank"),
    ("lora.alpha", "LoRA alpha"),
    ("output_dir", "output folder (inside runs/)"),
    ("overwrite", "replace a finished run in the output folder"),
    ("resume", "resume from its last checkpoint"),
]
PLOTS = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
         ("kl", "KL (nats per token)")]


def _get(recipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _component(key: str, label: str):
    if key == "loss.name":
        return gr.Dropdown(choices=list(LOSSES), label=label)  # the registry's losses, in its order
    if key in ("overwrite", "resume"):
        return gr.Checkbox(label=label)
    if key in ("train.batch_size", "train.grad_accum", "data.max_length", "lora.r", "lora.alpha"):
        return gr.Number(label=label, precision=0)  # ranges are checked by the recipe loader, naming the key
    if key in ("loss.beta", "train.lr", "train.epochs"):
        return gr.Number(label=label)
    return gr.Textbox(label=label)


def _format(value) -> str:
    """A field's value as a KEY=VALUE override the recipe parser reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


BUILT_IN_CODE = "lora_dpo."  # scorers the package ships (e.g. lora_dpo.toy:positive_share) run without --allow-code


class TrainTab:
    def __init__(self, ws: Workspace, jobs: JobManager, allow_code: bool = False):
        self.ws, self.jobs, self.allow_code = ws, jobs, allow_code

    # ------------------------------------------------------------------ pure functions the events call
    def load_fields(self, recipe_path: str) -> list:
        """The recipe's values for FIELDS."""
        if not recipe_path:
            return [None] * len(FIELDS)
        try:
            recipe = load_recipe(self.ws.resolve(recipe_path, "recipes", what="recipe"))
        except UserError as exc:
            raise gr.Error(f"{recipe_path}: {exc}", print_exception=False) from None
        return [bool(recipe.resume) if key == "resume" else _get(recipe, key) for key, _ in FIELDS]

    def overrides(self, recipe_path: str, values: list) -> list[str]:
        """KEY=VALUE for each field that differs from the recipe file."""
        original = self.load_fields(recipe_path)
        out = []
        for (key, _), new, old in zip(FIELDS, values, original):
            if key in ("train.batch_size", "train.grad_accum", "data.max_length", "lora.r", "lora.alpha") and new is not None:
                new = int(new)
            if isinstance(new, str):
                new = new.strip()
            if new is None or new == "" or new == old or (isinstance(old, float) and new == old):
                continue
            out.append(f"{key}={_format(new)}")
        return out

    def command(self, recipe_path: str, values: list) -> list[str]:
        """The `lora-dpo train` argument list for these fields, checked: a bad value raises UserError before
        anything starts, and paths must lie inside the app's folders."""
        path = self.ws.resolve(recipe_path, "recipes", what="recipe")
        overrides = self.overrides(recipe_path, values)
        recipe = load_recipe(path, overrides)
        self.ws.resolve(recipe.output_dir, "runs", what="output_dir", inside=True)
        if isinstance(recipe.resume, str):  # a checkpoint path: it is unpickled, so only from runs/
            self.ws.resolve(recipe.resume, "runs", what="resume")
        if not self.allow_code:  # a recipe can name code to run; the app runs only the package's own
            if recipe.model.trust_remote_code:
                raise UserError("model.trust_remote_code: the app does not run a model's own code unless it "
                                "was started with --allow-code")
            if recipe.eval.scorer and not recipe.eval.scorer.startswith(BUILT_IN_CODE):
                raise UserError(f"eval.scorer: {recipe.eval.scorer} is code outside lora_dpo; the app runs it "
                                "only when started with --allow-code")
        self.ws.check_name_or_path(recipe.model.name, "data", "runs", "exports", what="model.name")
        self.ws.check_name_or_path(recipe.data.train, "data", what="data.train")
        if recipe.data.eval:
            self.ws.check_name_or_path(recipe.data.eval, "data", what="data.eval")
        return ["lora-dpo", "train", self.ws.show(path), *overrides]

    def preview(self, recipe_path: str, *values) -> str:
        try:
            return shlex.join(self.command(recipe_path, list(values)))
        except UserError as exc:
            return f"# not valid yet: {exc}"

    def start(self, recipe_path: str, *values) -> str:
        try:
            cmd = self.command(recipe_path, list(values))
            recipe = load_recipe(self.ws.resolve(recipe_path, "recipes", what="recipe"), cmd[3:])
            run_dir = self.ws.resolve(recipe.output_dir, "runs", what="output_dir")
            # cmd[2] is the recipe relative to the workspace root, the job's working folder
            job = self.jobs.start(train_command(cmd[2], cmd[3:]), run_dir, self.ws.root)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return f"started: {shlex.join(cmd)} (pid {job.proc.pid})"

    def stop(self) -> str:
        return self.jobs.stop()

    def upload(self, file) -> tuple:
        """Copy an uploaded recipe into recipes/uploads/ (checked first) and select it."""
        if file is None:
            return gr.update(), ""
        src = Path(file if isinstance(file, str) else file.name)
        try:
            load_recipe(src)
        except UserError as exc:
            raise gr.Error(f"{src.name}: {exc}", print_exception=False) from None
        dest = self.ws.recipes / "uploads" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return gr.update(choices=self.ws.recipe_files(), value=self.ws.show(dest)), f"uploaded {self.ws.show(dest)}"

    def poll(self, shown) -> list:
        """Progress, plots, log and outcome for the page's timer. `shown` (per browser session) is what the
        plots last drew: unchanged rows leave them alone, so they do not redraw (and flicker) every second."""
        job = self.jobs.job
        if job is None:
            return [_progress_html(None), *[gr.skip()] * len(PLOTS), "", "", shown]
        p = job.progress()
        drawn = (job.proc.pid, len(p.rows))
        plots = [gr.skip()] * len(PLOTS) if drawn == shown else [_frame(p.rows, key) for key, _ in PLOTS]
        return [_progress_html(p), *plots, p.log_tail, _outcome(p), drawn]

    # ------------------------------------------------------------------ layout
    def build(self) -> None:
        recipes = self.ws.recipe_files()
        default = next((r for r in recipes if r.endswith("toy.yaml")), recipes[0] if recipes else None)
        with gr.Row():
            recipe = gr.Dropdown(choices=recipes, value=default, label="recipe (from recipes/)", scale=3,
                                 elem_id="recipe")
            upload = gr.File(label="or upload a recipe (.yaml)", file_types=[".yaml", ".yml"], scale=1)
        fields = []
        with gr.Row():
            for key, label in FIELDS[:6]:
                fields.append(_component(key, label))
        with gr.Row():
            for key, label in FIELDS[6:]:
                fields.append(_component(key, label))
        command = gr.Code(label="equivalent command", language="shell", interactive=False, elem_id="command")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="start")
            stop = gr.Button("Stop (keeps a checkpoint)", variant="stop", elem_id="stop")
        message = gr.Markdown(elem_id="message")
        progress = gr.HTML(_progress_html(None), elem_id="progress")
        with gr.Row():
            plots = [gr.LinePlot(None, x="step", y="value", title=f"{title} (train)", height=220,
                                 elem_id=f"plot-{key.split('/')[-1]}") for key, title in PLOTS]
        outcome = gr.Markdown(elem_id="outcome")
        log = gr.Textbox(label="log (last lines)", lines=10, max_lines=10, autoscroll=True, elem_id="log")
        timer = gr.Timer(1.0)
        shown = gr.State(None)

        recipe.change(self.load_fields, recipe, fields, api_name="load_recipe")
        for i, c in enumerate([recipe, *fields]):
            c.change(self.preview, [recipe, *fields], command, show_progress="hidden",
                     **(dict(api_name="preview") if i == 0 else dict(api_visibility="private")))
        upload.upload(self.upload, upload, [recipe, message], api_visibility="private")
        start.click(self.start, [recipe, *fields], message, api_name="start")
        stop.click(self.stop, None, message, api_name="stop")
        timer.tick(self.poll, shown, [progress, *plots, log, outcome, shown], api_name="status",
                   show_progress="hidden")
        self.recipe, self.fields = recipe, fields


def _frame(rows: list[dict], key: str) -> pd.DataFrame | None:
    # The training rows only. gradio 6's LinePlot fixes its colour domain at the first drawn value, so an eval
    # series that starts later would never be drawn; the held-out figures are in the final table and in the
    # run's plots/ (PNG), which draw both.
    steps, values = series(rows, "train", key)
    if not steps:
        return None  # an empty plot: gradio 6 draws no line in a plot whose first value was an empty frame
    # explicit dtypes: `object` columns would be drawn as categories, not lines
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "value": pd.Series(values, dtype="float64")})


def _clock(seconds) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _progress_html(p: Progress | None) -> str:
    if p is None:
        return "<div id='job-state' data-state='idle'>no training job yet</div>"
    total = p.total or 0
    bar = f"<progress max='{total}' value='{p.step}' style='width:100%'></progress>" if total else ""
    steps = f"step {p.step} of {total}" if total else "preparing (data, model, reference log-probs)"
    return (f"<div id='job-state' data-state='{p.state}' data-step='{p.step}'>{bar}"
            f"<b>{p.state}</b> · {steps} · elapsed {_clock(p.elapsed_s)} · remaining {_clock(p.remaining_s)}</div>")


def _outcome(p: Progress) -> str:
    if p.state == "finished" and p.final:
        keys = ["loss", "rewards/accuracies", "rewards/margins", "kl", "behaviour"]
        rows = ["| metric | reference | tuned |", "|---|---|---|"]
        for k in keys:
            before, after = (p.final.get("baseline") or {}).get(k), p.final.get(k)
            if after is not None:
                rows.append(f"| {k} | {'' if before is None else f'{before:.4g}'} | {after:.4g} |")
        return "**finished** (held-out evaluation)\n\n" + "\n".join(rows)
    if p.state == "stopped" and p.checkpoint:
        return f"**stopped**: checkpoint `{p.checkpoint}` saved; tick *resume* and start again to continue"
    if p.state == "stopped":
        return "**stopped** before the first checkpoint: nothing to resume; start again"
    if p.state == "failed":
        return f"**failed**: {p.error}"
    return ""
