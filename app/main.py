"""`lora-dpo app`: the Gradio app (Train, Sweep, Compare, Chat, Export tabs) on the folders of one workspace.

The command joins `lora-dpo` through the entry point `lora_dpo.commands: app` (pyproject.toml; its arguments are
command.py's), so the training library never imports the app; gradio comes with the `app` extra (`pip install 'lora-dpo[app]'`, which `make
setup` installs) and is imported only when the app starts. Binds to 127.0.0.1 unless --host says otherwise; --share (a public gradio.live link) is never implied;
--auth USER:PASSWORD or LORA_DPO_APP_AUTH asks for a login.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from lora_dpo.errors import UserError

from .workspace import Workspace

AUTH_ENV = "LORA_DPO_APP_AUTH"
# gradio's run history keeps every call's inputs in the browser (a typed Hub token included) and shows them on its
# "runs" page: off, which also deletes what an earlier version of the app saved there
PRIVATE = dict(run_history=False, footer_links=["api", "settings"])


def build_app(ws, jobs=None, allow_code: bool = False):
    """The app's Blocks for workspace `ws`; `jobs` is its one-job slot (a JobManager). `allow_code`: recipes
    and runs may run code from outside the package (a model's remote code, a custom eval.scorer)."""
    import gradio as gr  # noqa: PLC0415 - the optional `app` extra: imported when the app is built, not for --help

    from .chat_tab import ChatTab  # noqa: PLC0415 - (the tabs import gradio)
    from .compare_tab import CompareTab  # noqa: PLC0415
    from .export_tab import ExportTab  # noqa: PLC0415
    from .sweep_tab import SweepTab  # noqa: PLC0415
    from .jobs import JobManager  # noqa: PLC0415
    from .train_tab import TrainTab  # noqa: PLC0415

    jobs = jobs or JobManager()
    with gr.Blocks(title="lora-dpo") as demo:
        gr.Markdown("## lora-dpo · DPO with a LoRA adapter on a 4-bit base")
        with gr.Tab("Train", id="train"):
            train = TrainTab(ws, jobs, allow_code)
            train.build()
        with gr.Tab("Sweep", id="sweep"):
            sweep = SweepTab(ws, jobs)
            sweep.build()
        with gr.Tab("Compare", id="compare") as compare_tab:
            compare = CompareTab(ws, allow_code)
            compare.build()
        with gr.Tab("Chat", id="chat") as chat_tab:
            chat = ChatTab(compare)  # the model Compare loaded: one base in memory for both tabs
            chat.build()
        with gr.Tab("Export", id="export") as export_tab:
            export = ExportTab(ws, allow_code)
            export.build()
        # the running job's recipe and fields, after a reload too; else the chosen recipe's
        demo.load(train.load_page, train.recipe, [train.recipe, *train.fields], api_visibility="private")
        demo.load(sweep.preview, sweep.inputs, sweep.command_box, api_visibility="private")
        # runs finished since the page loaded appear when their tab is opened
        compare_tab.select(compare.refresh, compare.adapters[0], compare.adapters, api_visibility="private")
        chat_tab.select(chat.refresh, chat.source, chat.source, api_visibility="private")
        export_tab.select(export.refresh, export.run, export.run, api_visibility="private")
    demo.jobs = jobs
    return demo


def parse_auth(text: str | None):
    text = text or os.environ.get(AUTH_ENV)
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError(f"--auth / {AUTH_ENV}: expected USER:PASSWORD")
    return user, password


def run(args) -> int:
    try:
        import gradio  # noqa: F401, PLC0415 - the optional `app` extra: say what is missing before anything starts
    except ImportError:
        raise UserError("the app needs gradio, which the `app` extra installs: pip install 'lora-dpo[app]' "
                        "(make setup does)") from None

    auth = parse_auth(args.auth)
    if (args.share or args.host not in ("127.0.0.1", "localhost")) and auth is None:
        print("warning: the app is reachable from other machines and asks for no login; "
              "consider --auth USER:PASSWORD", file=sys.stderr)
    ws = Workspace.at(args.workdir, data=args.data_dir)
    if copied := ws.add_shipped_recipes():
        print(f"lora-dpo app: {ws.show(ws.recipes)}/ did not exist: copied the {copied} shipped recipes into it "
              "(edit them there, or add your own)", file=sys.stderr)
    demo = build_app(ws, allow_code=args.allow_code)
    # a job still running is stopped safely (checkpoint) when the app exits, on Ctrl-C or on SIGTERM
    atexit.register(demo.jobs.shutdown)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # runs the atexit handler
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                   share=args.share, auth=auth, **PRIVATE)
    return 0
