"""`lora-dpo app`'s arguments, a light module: `lora-dpo --help` lists the command and `lora-dpo app --help`
answers without importing gradio or torch. The entry point `lora_dpo.commands: app` names this module; the
command runs in main.py."""

from __future__ import annotations


def add_parser(sub) -> None:
    a = sub.add_parser("app", help="open the Gradio app: train and watch, compare answers, export",
                       description="Open the Gradio app on this folder's recipes/, runs/, data/ and exports/.")
    a.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    a.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    a.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    a.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this login (or set LORA_DPO_APP_AUTH)")
    a.add_argument("--workdir", default=".", help="the workspace folder (default: the current folder)")
    a.add_argument("--data-dir", default="data", metavar="DIR", help="data files the app may read (default data/)")
    a.add_argument("--allow-code", action="store_true",
                   help="let recipes and runs run code from outside lora_dpo (model.trust_remote_code, a custom "
                        "eval.scorer); only on an app no stranger can reach")
    a.set_defaults(module="lora_dpo_app.main")
