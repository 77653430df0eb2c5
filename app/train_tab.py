"""The Train tab: a recipe, its main fields, the equivalent command, Start/Stop, live progress and plots."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from lora_dpo import LOSSES, preview_data
from lora_dpo.config import load_recipe, save_recipe
from lora_dpo.errors import UserError
from lora_dpo.run import RunDir, read_phases, series
from lora_dpo.training.resume import RESUMABLE_CHANGES

from .jobs import JobManager, Progress, train_command
from .phases import phases_html
from .workspace import Workspace

# (recipe key, label): the fields the tab shows; everything else comes from the recipe file unchanged.
FIELDS = [
    ("model.name", "model (Hub id, local folder, or toy)"),
    ("data.train", "dataset (Hub id, file in the data folder, or toy)"),
    ("loss.name", "loss"),
    ("loss.beta", "beta"),
    ("train.lr", "learning rate"),
    ("train.epochs", "epochs"),
    ("train.max_steps", "max steps (overrides epochs)"),
    ("train.warmup_ratio", "warmup (share of steps)"),
    ("train.batch_size", "batch size (pairs)"),
    ("train.grad_accum", "gradient accumulation"),
    ("data.max_length", "max length (tokens)"),
    ("lora.r", "LoRA rank"),
    ("lora.alpha", "LoRA alpha"),
    ("train.save_every", "save every (steps)"),
    ("train.eval_every", "evaluate every (steps)"),
    ("output_dir", "output folder (inside runs/)"),
    ("overwrite", "replace a finished run in the output folder"),
    ("resume", "resume from its last checkpoint"),
]
KEYS = [key for key, _ in FIELDS]
INTS = {"train.batch_size", "train.grad_accum", "data.max_length", "lora.r", "lora.alpha", "train.max_steps",
        "train.save_every", "train.eval_every"}
FLOATS = {"loss.beta", "train.lr", "train.epochs", "train.warmup_ratio"}
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
        return gr.Checkbox(label=label, elem_id=f"field-{key}")
    elem_id = "field-" + key.replace(".", "-").replace("_", "-")
    if key in INTS:  # ranges are checked by the recipe loader, naming the key
        return gr.Number(label=label, precision=0, elem_id=elem_id)
    if key in FLOATS:
        return gr.Number(label=label, elem_id=elem_id)
    return gr.Textbox(label=label, elem_id=elem_id)


def _format(value) -> str:
    """A field's value as a KEY=VALUE override the recipe parser reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


PREVIEW_ROWS = 5  # dataset rows the preview shows
BUILT_IN_CODE = "lora_dpo."  # scorers the package ships (e.g. lora_dpo.toy:positive_share) run without --allow-code


class TrainTab:
    def __init__(self, ws: Workspace, jobs: JobManager, allow_code: bool = False):
        self.ws, self.jobs, self.allow_code = ws, jobs, allow_code

    # ------------------------------------------------------------------ pure functions the events call
    def _values(self, path: Path, overrides: list[str] = ()) -> list:
        recipe = load_recipe(path, list(overrides))
        return [bool(recipe.resume) if key == "resume" else _get(recipe, key) for key in KEYS]

    def _job_values(self, recipe_path: str) -> list | None:
        """The running job's fields, when it was started from `recipe_path`: after a reload the page shows what
        trains, not the recipe file."""
        job = self.jobs.job
        if job is None or not job.running() or job.recipe != recipe_path:
            return None
        try:
            return self._values(self.ws.root / job.recipe, job.overrides)
        except UserError:
            return None

    def load_fields(self, recipe_path: str) -> list:
        """The recipe's values for FIELDS (the running job's, when it trains this recipe)."""
        if not recipe_path:
            return [None] * len(FIELDS)
        if (running := self._job_values(recipe_path)) is not None:
            return running
        try:
            return self._values(self.ws.resolve(recipe_path, "recipes", what="recipe"))
        except UserError as exc:
            raise gr.Error(f"{recipe_path}: {exc}", print_exception=False) from None

    def load_page(self, recipe_path: str) -> list:
        """On page load: the running job's recipe and fields if one trains, else the chosen recipe's."""
        job = self.jobs.job
        if job is not None and job.running():
            try:
                values = self._values(self.ws.root / job.recipe, job.overrides)
            except UserError:
                values = None
            if values is not None:
                shown = job.recipe if job.recipe in self.ws.recipe_files() else recipe_path
                return [shown, *values]
        return [recipe_path, *self.load_fields(recipe_path)]

    def _run_of(self, output_dir) -> RunDir | None:
        try:
            return RunDir(self.ws.resolve(str(output_dir or ""), "runs", what="output_dir", inside=True))
        except UserError:
            return None

    def source(self, recipe_path: str, values: list) -> Path:
        """The recipe the fields start from: the recipe file, or, to resume, the run's own config.yaml (a resumed
        run must train as it started, whatever the recipe file now says)."""
        given = dict(zip(KEYS, values))
        run = self._run_of(given.get("output_dir")) if given.get("resume") is True else None
        if run is not None and run.config.is_file():
            return run.config
        return self.ws.resolve(recipe_path, "recipes", what="recipe")

    def overrides(self, recipe_path: str, values: list) -> list[str]:
        """KEY=VALUE for each field that differs from the recipe the fields start from (see `source`)."""
        original = self._values(self.source(recipe_path, values))
        out = []
        for key, new, old in zip(KEYS, values, original):
            if key in INTS and new is not None:
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
        path = self.source(recipe_path, values)
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

    def resume_changed(self, recipe_path: str, *values) -> list:
        """Ticking resume fills the form from the run's own config.yaml and locks what a resume may not change
        (the trainer's own list, training/resume.py); unticking returns to the recipe file, every field open."""
        given = dict(zip(KEYS, values))
        if given["resume"] is not True:
            fields = self.load_fields(recipe_path) if recipe_path else [gr.skip()] * len(FIELDS)
            return [*[gr.update(value=v, interactive=True) for v in fields], self.run_note(recipe_path, *values)]
        run = self._run_of(given["output_dir"])
        checkpoints = run.complete_checkpoints() if run is not None and run.config.is_file() else []
        if not checkpoints:
            where = given["output_dir"] or "the output folder"
            gr.Warning(f"{where} holds no run with a checkpoint to resume; choose its folder in 'output folder' "
                       "first (inside runs/)")
            return [*[gr.skip()] * (len(FIELDS) - 1), gr.update(value=False), self.run_note(recipe_path, *values)]
        fields = self._values(run.config, ["resume=true"])
        updates = [gr.update(value=v, interactive=key in RESUMABLE_CHANGES and key not in ("output_dir", "overwrite"))
                   for key, v in zip(KEYS, fields)]
        updates[KEYS.index("resume")] = gr.update(value=True, interactive=True)
        return [*updates, self.run_note(recipe_path, *fields)]

    def run_note(self, recipe_path: str, *values) -> str:
        """What Start will do to the output folder: resume it (from which checkpoint, what may change), or replace
        it (what is deleted)."""
        given = dict(zip(KEYS, values))
        run = self._run_of(given.get("output_dir"))
        if run is None or not run.path.exists():
            return ""
        if given.get("resume") is True and run.config.is_file():
            checkpoints = run.complete_checkpoints()
            last = checkpoints[-1].name if checkpoints else "no checkpoint"
            labels = dict(FIELDS)
            may = [labels[k] for k in KEYS if k in RESUMABLE_CHANGES and k not in ("output_dir", "overwrite", "resume")]
            return (f"**resume** `{self.ws.show(run.path)}` from `{last}` with the run's own settings (its "
                    f"config.yaml). May change: {', '.join(may)}; the other fields are locked: a resumed run must "
                    "train as it started.")
        if given.get("overwrite") is True:
            outputs = run.existing_outputs()
            if outputs:
                checkpoints = len(run.complete_checkpoints())
                return (f"**replace**: Start deletes {', '.join(outputs)} in `{self.ws.show(run.path)}`"
                        + (f" ({checkpoints} checkpoint(s))" if checkpoints else "") + "; nothing else there is touched.")
        elif run.existing_outputs():
            return (f"`{self.ws.show(run.path)}` already holds a run: tick *replace* to start it again, or *resume* "
                    "to continue it, or choose another output folder.")
        return ""

    def save(self, name: str, recipe_path: str, *values) -> tuple:
        """The form as a recipe file in recipes/ (the whole resolved recipe, resume and replace off), selected."""
        try:
            name = (name or "").strip()
            if not name:
                raise UserError("save as: give the new recipe a name, e.g. my-run")
            dest = self.ws.resolve(f"recipes/{name}" + ("" if name.endswith((".yaml", ".yml")) else ".yaml"),
                                   "recipes", what="save as", inside=True)
            if dest.exists():
                raise UserError(f"save as: {self.ws.show(dest)} exists; choose another name")
            cmd = self.command(recipe_path, list(values))
            recipe = load_recipe(self.ws.root / cmd[2], [*cmd[3:], "resume=false", "overwrite=false"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, dest)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        shown = self.ws.show(dest)
        return gr.update(choices=self.ws.recipe_files(), value=shown), f"saved the form as `{shown}`"

    def data_preview(self, recipe_path: str, *values) -> tuple:
        """The first rows of the dataset as the trainer reads them (format detected, chat template applied)."""
        try:
            cmd = self.command(recipe_path, list(values))
            rows, report = preview_data(load_recipe(self.ws.root / cmd[2], cmd[3:]), PREVIEW_ROWS)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return pd.DataFrame(rows), f"```\n{report}\n```"

    def start(self, recipe_path: str, *values) -> str:
        try:
            cmd = self.command(recipe_path, list(values))
            recipe = load_recipe(self.ws.root / cmd[2], cmd[3:])
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
        return [_progress_html(p) + _phases(job), *plots, p.log_tail, _outcome(p), drawn]

    # ------------------------------------------------------------------ layout
    def build(self) -> None:
        recipes = self.ws.recipe_files()
        default = next((r for r in recipes if r.endswith("toy.yaml")), recipes[0] if recipes else None)
        with gr.Row():
            recipe = gr.Dropdown(choices=recipes, value=default, label="recipe (from recipes/)", scale=3,
                                 elem_id="recipe")
            upload = gr.File(label="or upload a recipe (.yaml)", file_types=[".yaml", ".yml"], scale=1)
        if skipped := self.ws.not_recipes():
            gr.Markdown("Not offered (not recipes): " + "; ".join(f"`{f}` ({why})" for f, why in skipped),
                        elem_id="not-recipes")
        fields = []
        for row in (FIELDS[:6], FIELDS[6:12], FIELDS[12:]):
            with gr.Row():
                for key, label in row:
                    fields.append(_component(key, label))
        run_note = gr.Markdown(elem_id="run-note")
        command = gr.Code(label="equivalent command", language="shell", interactive=False, elem_id="command")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="start")
            stop = gr.Button("Stop (keeps a checkpoint)", variant="stop", elem_id="stop")
            save_name = gr.Textbox(label="save the form as recipes/…", placeholder="my-run", scale=2,
                                   elem_id="save-name")
            save = gr.Button("Save as recipe", elem_id="save", scale=0)
            show_data = gr.Button("Preview data", elem_id="preview-data", scale=0)
        message = gr.Markdown(elem_id="message")
        with gr.Accordion("data preview (the first rows as the trainer reads them)", open=False) as preview_box:
            preview_rows = gr.Dataframe(elem_id="data-rows", wrap=True)
            preview_report = gr.Markdown(elem_id="data-report")
        progress = gr.HTML(_progress_html(None), elem_id="progress")
        with gr.Row():
            plots = [gr.LinePlot(None, x="step", y="value", title=f"{title} (train)", height=220,
                                 elem_id=f"plot-{key.split('/')[-1]}") for key, title in PLOTS]
        outcome = gr.Markdown(elem_id="outcome")
        log = gr.Textbox(label="log (last lines)", lines=10, max_lines=10, autoscroll=True, elem_id="log")
        timer = gr.Timer(1.0)
        shown = gr.State(None)

        recipe.change(self.load_fields, recipe, fields, api_name="load_recipe")
        # another recipe is another start: every field open again (resume had locked some)
        recipe.change(lambda: [gr.update(interactive=True)] * len(fields), None, fields, api_visibility="private")
        for i, c in enumerate([recipe, *fields]):
            c.change(self.preview, [recipe, *fields], command, show_progress="hidden",
                     **(dict(api_name="preview") if i == 0 else dict(api_visibility="private")))
        resume, overwrite, output_dir = (fields[KEYS.index(k)] for k in ("resume", "overwrite", "output_dir"))
        resume.input(self.resume_changed, [recipe, *fields], [*fields, run_note], api_name="resume_changed")
        for c in (overwrite, output_dir):
            c.change(self.run_note, [recipe, *fields], run_note, show_progress="hidden", api_visibility="private")
        upload.upload(self.upload, upload, [recipe, message], api_visibility="private")
        start.click(self.start, [recipe, *fields], message, api_name="start")
        stop.click(self.stop, None, message, api_name="stop")
        save.click(self.save, [save_name, recipe, *fields], [recipe, message], api_name="save_recipe")
        show_data.click(self.data_preview, [recipe, *fields], [preview_rows, preview_report],
                        api_name="preview_data").then(lambda: gr.update(open=True), None, preview_box)
        timer.tick(self.poll, shown, [progress, *plots, log, outcome, shown], api_name="status",
                   show_progress="hidden")
        self.recipe, self.fields = recipe, fields


def _phases(job) -> str:
    """The job's phases from the first second (toy world, tokenising, model, reference pass, evaluations, steps,
    saves), from the progress.json its trainer writes; an older run's file is not this job's."""
    record = RunDir(job.run_dir).progress
    fresh = record.is_file() and record.stat().st_mtime >= job.started - 1
    return phases_html(read_phases(job.run_dir) if fresh else [], time.time(), live=job.running())


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
    stopping = ""
    if p.stop_kind and p.state in ("starting", "running"):  # a Stop sent, the trainer not ended yet
        then = {"safe": "stopped at once", "at once": "killed"}.get(p.stop_kind)
        stopping = (f" · <b>stopping {'safely' if p.stop_kind == 'safe' else p.stop_kind}</b>"
                    + (f" ({then} in {p.next_stop_in_s:.0f} s)" if then and p.next_stop_in_s is not None else ""))
    return (f"<div id='job-state' data-state='{p.state}' data-step='{p.step}' data-stop='{p.stop_kind or ''}'>{bar}"
            f"<b>{p.state}</b> · {steps} · elapsed {_clock(p.elapsed_s)} · remaining {_clock(p.remaining_s)}"
            f"{stopping}</div>")


def _outcome(p: Progress) -> str:
    if p.state == "finished" and p.final:
        keys = ["loss", "rewards/accuracies", "rewards/margins", "kl", "behaviour"]
        rows = ["| metric | reference | tuned |", "|---|---|---|"]
        for k in keys:
            before, after = (p.final.get("baseline") or {}).get(k), p.final.get(k)
            if after is not None:
                rows.append(f"| {k} | {'' if before is None else f'{before:.4g}'} | {after:.4g} |")
        return "**finished** (held-out evaluation)\n\n" + "\n".join(rows)
    if p.state == "stopped":
        newest = (f"the newest is `{p.newest_checkpoint}`: tick *resume* and start again to continue from it"
                  if p.newest_checkpoint else "there is none to resume from: start again")
        if p.stop_kind == "killed":
            why = (f"the trainer did not answer Stop within {p.stop_grace_s:g} s of the stop at once"
                   if p.stop_by == "grace" else "Stop clicked a third time")
            return f"**killed**: {why}; no checkpoint of this step ({newest})"
        if p.stop_kind == "at once":
            when = f"after the grace period ({p.stop_grace_s:g} s)" if p.stop_by == "grace" else "on a second Stop"
            return f"**stopped at once** {when}: no checkpoint of this step ({newest})"
        if p.checkpoint:
            return f"**stopped safely**: checkpoint `{p.checkpoint}` saved; tick *resume* and start again to continue"
        if p.newest_checkpoint:  # a resumed run stopped while it prepared: its checkpoints are still there
            return (f"**stopped** before training began: nothing more was trained; {newest}")
        return "**stopped** before training began: nothing was trained, no checkpoint written; start again to train"
    if p.state == "failed":
        return f"**failed**: {p.error}"
    return ""
