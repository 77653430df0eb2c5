"""The finished runs as the tabs offer them (Compare, Chat, Export): a dropdown of the runs under runs/ with a final
adapter, the newest chosen, a path typed in allowed (checked when used), and its refresh when the tab is opened."""

from __future__ import annotations

import gradio as gr

from .workspace import Workspace


def run_dropdown(ws: Workspace, label: str, elem_id: str) -> gr.Dropdown:
    runs = ws.finished_runs()
    return gr.Dropdown(choices=runs, value=runs[-1] if runs else None, allow_custom_value=True, label=label,
                       elem_id=elem_id)


def refreshed(ws: Workspace, current: str | None):
    """The dropdown's update: the finished runs now (one that finished since the page loaded appears); the current
    choice kept, else the newest run."""
    runs = ws.finished_runs()
    return gr.update(choices=runs, value=current or (runs[-1] if runs else None))
