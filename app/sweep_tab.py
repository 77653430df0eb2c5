"""The Sweep tab: a recipe, its changes, a grid (one `KEY=V1,V2,...` per line: beta, and the loss, the learning
rate or any key), started as `lora-dpo sweep` in its own process through the app's one job slot; the frontier (the
reward each run reaches against its KL to the reference) drawn live from the sweep folder's sweep.json and
frontier.png as points finish. The work is lora_dpo.sweep's, the same as the command line's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import gradio as gr
import pandas as pd

from lora_dpo.config import load_recipe
from lora_dpo.errors import UserError
from lora_dpo.sweep import parse_grid
from lora_dpo.sweep.runner import FRONTIER_PNG, read_sweep, sweep_folder

from .jobs import JobManager
from .workspace import Workspace

COLUMNS = ["point", "step", "reward", "KL", "accuracy", "margin", "frontier"]


def _round(value):
    return None if value is None else round(float(value), 4)


class SweepTab:
    def __init__(self, ws: Workspace, jobs: JobManager):
        self.ws, self.jobs = ws, jobs
        self.folder: Path | None = None  # the sweep the tab last started or showed

    def command(self, recipe_path: str, changes: str, grid: str, out: str) -> tuple[list[str], Path]:
        """The `lora-dpo sweep` arguments for the form, checked (every point's recipe loads), and its folder."""
        path = self.ws.resolve(recipe_path, "recipes", what="recipe")
        overrides = [line.strip() for line in (changes or "").splitlines() if line.strip()]
        specs = [line.strip() for line in (grid or "").splitlines() if line.strip()]
        parsed = parse_grid(specs)
        recipe = load_recipe(path, overrides)
        folder = self.ws.resolve(out.strip() if out and out.strip() else str(sweep_folder(recipe)), "runs",
                                 what="sweep folder", inside=True)
        for _, point in parsed.points():
            load_recipe(path, [*overrides, *point])  # a bad value is said now, naming the key
        args = ["lora-dpo", "sweep", self.ws.show(path), *overrides]
        for spec in specs:
            args += ["--grid", spec]
        return [*args, "--out", self.ws.show(folder)], folder

    def preview(self, recipe_path: str, changes: str, grid: str, out: str) -> str:
        try:
            return shlex.join(self.command(recipe_path, changes, grid, out)[0])
        except UserError as exc:
            return f"# not valid yet: {exc}"

    def start(self, recipe_path: str, changes: str, grid: str, out: str) -> str:
        try:
            args, folder = self.command(recipe_path, changes, grid, out)
            job = self.jobs.start([sys.executable, "-m", "lora_dpo", *args[1:]], folder, self.ws.root)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        self.folder = folder
        return f"started: {shlex.join(args)} (pid {job.proc.pid}); a stopped sweep continues when started again"

    def poll(self) -> list:
        """The frontier so far (table, picture, the recommendation) and the job's log tail."""
        job = self.jobs.job
        folder = self.folder
        if folder is None:
            return [None, None, "no sweep started from this page yet", ""]
        record = read_sweep(folder) or {}
        front = record.get("frontier") or {}
        rows = [[p["name"], p["step"], *map(_round, (p["reward"], p["kl"], p["accuracy"], p["margin"])),
                 "*" if p["pareto"] else ""]
                for p in sorted(front.get("finals", []), key=lambda p: (p["kl"] is None, p["kl"] or 0))]
        rows = [["reference", 0, _round(front.get("reference_reward")), 0.0, None, None, ""]] + rows if rows else []
        png = folder / FRONTIER_PNG
        state = "running" if job is not None and job.running() and job.run_dir == folder else "idle"
        done = len(front.get("finals", []))
        pending = len(front.get("pending", []))
        text = (f"<span id='sweep-state' data-state='{state}' data-done='{done}'>{state}: {done} point(s) finished"
                f"{f', {pending} to go' if pending else ''}</span>")
        if front.get("why"):
            text += f"<br><b>recommended</b>: {front['why']}"
        if front:
            text += f"<br>reward: {front.get('reward_label')}; KL: {front.get('kl_label')}"
        log = job.progress().log_tail if job is not None and job.run_dir == folder else ""
        return [pd.DataFrame(rows, columns=COLUMNS) if rows else None, str(png) if png.is_file() else None, text,
                log]

    def build(self) -> None:
        recipes = self.ws.recipe_files()
        default = next((r for r in recipes if r.endswith("toy.yaml")), recipes[0] if recipes else None)
        with gr.Row():
            recipe = gr.Dropdown(choices=recipes, value=default, label="recipe (from recipes/)", elem_id="sweep-recipe")
            out = gr.Textbox(label="sweep folder (inside runs/; default: the recipe's output_dir + -sweep)",
                             elem_id="sweep-out")
        with gr.Row():
            grid = gr.Textbox(label="grid: one KEY=V1,V2,... per line (every combination runs)", lines=3,
                              value="loss.beta=0.03,0.1,0.3,1.0", elem_id="sweep-grid")
            changes = gr.Textbox(label="changes to the recipe: one KEY=VALUE per line", lines=3,
                                 placeholder="train.max_steps=100", elem_id="sweep-changes")
        command = gr.Code(label="equivalent command", language="shell", interactive=False, elem_id="sweep-command")
        with gr.Row():
            start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start")
            stop = gr.Button("Stop (the running point keeps a checkpoint)", variant="stop", elem_id="sweep-stop")
        message = gr.Markdown(elem_id="sweep-message")
        state = gr.HTML(elem_id="sweep-status")
        with gr.Row():
            picture = gr.Image(label="frontier", type="filepath", elem_id="sweep-frontier", height=420)
            table = gr.Dataframe(headers=COLUMNS, elem_id="sweep-table")
        log = gr.Textbox(label="log (last lines)", lines=8, max_lines=8, autoscroll=True, elem_id="sweep-log")
        timer = gr.Timer(2.0)
        inputs = [recipe, changes, grid, out]
        for c in inputs:
            c.change(self.preview, inputs, command, show_progress="hidden", api_visibility="private")
        start.click(self.start, inputs, message, api_name="sweep_start")
        stop.click(lambda: self.jobs.stop(), None, message, api_name="sweep_stop")
        timer.tick(self.poll, None, [table, picture, state, log], api_name="sweep_status", show_progress="hidden")
        self.inputs, self.command_box = inputs, command
