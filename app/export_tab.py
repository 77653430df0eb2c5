"""The Export tab: a finished run's adapter, or the adapter merged into a 16-bit base, into exports/; then,
optionally, a push to the Hub. The work is lora_dpo.export's and lora_dpo.hub's, as in `lora-dpo export`.

A token typed here is used for this one upload and forgotten: it is not written to disk, to a log, to the
run directory, and the field is emptied when the export is submitted.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lora_dpo.errors import UserError, first_line
from lora_dpo.export import DTYPES, check_repo_id, export, push, scrub

from .runs import refreshed, run_dropdown
from .workspace import Workspace


class ExportTab:
    def __init__(self, ws: Workspace, allow_code: bool = False):
        self.ws, self.allow_code = ws, allow_code

    def export(self, run: str, out: str, overwrite: bool, merge: bool, dtype: str, to_hub: bool, repo_id: str,
               private: bool, token: str, dry_run: bool = False):
        """-> (result markdown, token field emptied)."""
        lines: list[str] = []
        try:
            source = self.ws.resolve(run, "runs", what="run")
            target = self.ws.resolve(out or f"exports/{Path(run).name}", "exports", what="output folder",
                                     inside=True)
            repo = check_repo_id(repo_id.strip()) if to_hub else None
            result = export(source, target, merge=merge, dtype=dtype, overwrite=overwrite, repo_id=repo,
                            trust_remote_code=None if self.allow_code else False, log=lines.append)
            text = [f"**exported** to `{self.ws.show(result.out)}`", "```", result.summary(), "```"]
            if repo:
                pushed = push(result.out, repo, private=private, token=(token or "").strip() or None, dry_run=dry_run)
                text += ["**dry run**: nothing uploaded" if dry_run else "**pushed**", "```", pushed.listing(), "```"]
        except Exception as exc:  # said on the page (not as a pop-up) so that the token field is emptied too,
            # whatever failed; the message is scrubbed of the token (a Hub error may echo a header)
            text = str(exc) if isinstance(exc, UserError) else first_line(exc)
            return f"**error**: {scrub(text, (token or '').strip() or None)}", ""
        if lines:
            text += ["notes:", *[f"- {line}" for line in lines]]
        return "\n".join(text), ""

    def refresh(self, current: str | None):
        return refreshed(self.ws, current)

    def build(self) -> None:
        with gr.Row():
            run = run_dropdown(self.ws, "finished run (or a run folder inside runs/)", "export-run")
            out = gr.Textbox(label="output folder (inside exports/)", placeholder="exports/<run name>",
                             elem_id="export-out")
            overwrite = gr.Checkbox(label="replace the output folder if it exists")
            refresh = gr.Button("refresh runs", scale=0)
        with gr.Row():
            merge = gr.Checkbox(label="merge into a 16-bit copy of the base (else: the adapter alone)")
            dtype = gr.Dropdown(choices=list(DTYPES), value="bf16", label="merged dtype")
        with gr.Row():
            to_hub = gr.Checkbox(label="push to the Hugging Face Hub")
            repo_id = gr.Textbox(label="repository (owner/name)")
            private = gr.Checkbox(label="private", value=True)
            token = gr.Textbox(label="token (else HF_TOKEN or `hf auth login`; never stored)", type="password",
                               elem_id="token")
            dry_run = gr.Checkbox(label="dry run: list what would be uploaded, upload nothing", elem_id="dry-run")
        go = gr.Button("Export", variant="primary", elem_id="export")
        result = gr.Markdown(elem_id="export-result")
        go.click(self.export, [run, out, overwrite, merge, dtype, to_hub, repo_id, private, token, dry_run],
                 [result, token], api_name="export")
        run.change(lambda r: f"exports/{Path(r).name}" if r else "", run, out, api_visibility="private")
        refresh.click(self.refresh, run, run, api_visibility="private")
        self.run = run
