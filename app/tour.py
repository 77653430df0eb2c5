"""A tour of the app in a real headless Chromium (Playwright): click Start in the Train tab, watch the plots
and phases fill, compare answers, chat, export, run a small sweep. The browser test and the README's screenshots both take this tour.

    python -m lora_dpo_app.tour --out docs/     screenshots of each tab on the toy world (a few minutes on a CPU)

Needs `playwright` (the dev extra) and a Chromium: Debian's `chromium` package, or `playwright install
chromium`; set CHROMIUM=/path/to/chrome to choose one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .main import PRIVATE, build_app
from .workspace import Workspace

TOY_PROMPTS = "write a review of the night river .\nwrite a review of the silver harbour .\nwrite a review of the last garden ."


def chromium_path() -> str | None:
    """The Chromium to drive: $CHROMIUM, else one on PATH (Debian's), else None (Playwright's own, if any)."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ws):
    """The app for workspace `ws` on a free localhost port, in this process; returns (demo, url)."""
    demo = build_app(ws)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_port=free_port(), **PRIVATE)
    return demo, url


def browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-gpu"])


def persistent_context(playwright, profile: Path):
    """A Chromium with a profile on disk, as a user's browser keeps one (to search it for what the page stored)."""
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=chromium_path(),
                                                         headless=True, args=["--no-sandbox", "--disable-gpu"],
                                                         viewport={"width": 1360, "height": 1400})


def dropdown_options(page, elem_id: str) -> list[str]:
    """The choices a gradio Dropdown offers, as the page received them (its config)."""
    choices = page.evaluate("id => window.gradio_config.components.find(c => c.props.elem_id === id).props.choices",
                            elem_id)
    return [value for _, value in choices]


def set_number(page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input")
    box.fill(value)
    box.press("Tab")  # gradio's Number sends its change on blur


def number(page, selector: str) -> str:
    return page.locator(f"{selector} input").input_value()


def train(page, timeout_ms: int = 900_000) -> dict:
    """Click Start; wait until the loss plot draws a line (the page's timer reads metrics.jsonl each second),
    then until the job ends. Returns the step shown when the line first appeared, and the final state."""
    # the page is live once its load event has filled the fields (the command preview follows them)
    page.wait_for_selector("#command:has-text('lora-dpo train')", timeout=60_000)
    page.locator("#start").click()
    page.wait_for_selector("#message:has-text('started')", timeout=30_000)
    # a drawn line: a path through at least two points, with a colour
    page.wait_for_selector("#plot-loss .mark-line path[stroke^='#'][d*='L']", timeout=timeout_ms)
    first_plot_step = int(page.locator("#job-state").get_attribute("data-step") or 0)
    page.wait_for_selector("#job-state[data-state='finished'], #job-state[data-state='failed']", timeout=timeout_ms)
    page.wait_for_timeout(1500)  # one more tick of the timer: the plots show the last rows
    return {"first_plot_step": first_plot_step, "state": page.locator("#job-state").get_attribute("data-state"),
            "loss_lines": page.locator("#plot-loss .mark-line path[stroke^='#']").count()}


def compare(page, prompts: str = TOY_PROMPTS, timeout_ms: int = 300_000) -> tuple[str, str]:
    """Open Compare, type the prompts, click Compare; return the two panes' text once both are filled."""
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_function("document.querySelector('#adapter-a input') && "
                           "document.querySelector('#adapter-a input').value.length > 0", timeout=30_000)
    page.locator("#prompts textarea").fill(prompts)
    page.locator("#compare").click()
    page.wait_for_function("['#pane-left', '#pane-right'].every(id => "
                           "document.querySelector(id + ' textarea').value.trim().length > 0)", timeout=timeout_ms)
    return (page.locator("#pane-left textarea").input_value(), page.locator("#pane-right textarea").input_value())


def export(page, timeout_ms: int = 300_000) -> str:
    page.get_by_role("tab", name="Export").click()
    page.wait_for_function("document.querySelector('#export-run input').value.length > 0", timeout=30_000)
    page.locator("#export").click()
    page.wait_for_selector("#export-result:has-text('exported')", timeout=timeout_ms)
    return page.locator("#export-result").inner_text()


def chat(page, message: str = "write a review of the night river .", timeout_ms: int = 300_000) -> str:
    """Open Chat on the newest run, send `message`, return the streamed reply once the page says who answered."""
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_function("document.querySelector('#chat-adapter input')?.value.length > 0", timeout=30_000)
    page.locator("#chat-message textarea").fill(message)
    page.locator("#chat-send").click()
    page.wait_for_selector("#chat-note:has-text('answered by')", timeout=timeout_ms)
    return page.locator("#chat [data-testid=bot]").last.inner_text()


def sweep(page, grid: str = "loss.beta=0.03,0.3,3.0", changes: str = "train.max_steps=100\ntrain.eval_every=25",
          timeout_ms: int = 900_000) -> str:
    """Open Sweep, start a small grid on the chosen recipe, wait until every point is drawn; the status text."""
    page.get_by_role("tab", name="Sweep").click()
    page.locator("#sweep-grid textarea").fill(grid)
    page.locator("#sweep-changes textarea").fill(changes)
    page.wait_for_selector("#sweep-command:has-text('--grid')", timeout=30_000)
    page.locator("#sweep-start").click()
    points = len(grid.split("=", 1)[1].split(","))
    page.wait_for_selector(f"#sweep-state[data-done='{points}']", timeout=timeout_ms)
    page.wait_for_selector("#sweep-frontier img", timeout=60_000)
    page.wait_for_timeout(2500)  # the picture of the last point
    return page.locator("#sweep-status").inner_text()


def screenshots(out: Path, workdir: Path | None = None) -> list[Path]:
    """Train the toy recipe in the app, compare, export, and save one screenshot per tab in `out`."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional (dev extra): the tour alone needs it

    root = Path(workdir or tempfile.mkdtemp(prefix="lora-dpo-tour-"))
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "recipes" / "toy.yaml", root / "recipes" / "toy.yaml")
    demo, url = launch(Workspace.at(root))
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    try:
        with sync_playwright() as p:
            b = browser(p)
            page = b.new_page(viewport={"width": 1360, "height": 1500})
            page.goto(url)
            train(page)
            shots.append(out / "app-train.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            compare(page)
            page.locator("#show-diff input").check()  # where the two answers part, word by word
            page.wait_for_selector("#diff ins, #diff del", timeout=30_000)
            shots.append(out / "app-compare.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            chat(page)
            shots.append(out / "app-chat.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            export(page)
            shots.append(out / "app-export.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            sweep(page)
            shots.append(out / "app-sweep.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            b.close()
    finally:
        demo.jobs.shutdown(timeout=30)
        demo.close()
    return shots


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go (default docs/)")
    parser.add_argument("--workdir", type=Path, help="the app's workspace (default: a new temporary folder)")
    args = parser.parse_args()
    for shot in screenshots(args.out, args.workdir):
        print(shot)
