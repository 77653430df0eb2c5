"""The Gradio app of lora-dpo (installed as `lora_dpo_app`): it calls lora_dpo and holds no training logic.

    main.py          `lora-dpo app`: build_app(workspace) and launch (127.0.0.1 by default, optional login)
    workspace.py     the folders the app may touch; every typed path is checked against them
    jobs.py          one training job at a time, as a `lora-dpo train` subprocess; its progress from the run dir
    train_tab.py     recipe fields, command preview, Start/Stop, progress bar, live plots, log, final metrics
    compare_tab.py   reference vs tuned (or A vs B) answers with implicit rewards (lora_dpo.compare)
    export_tab.py    adapter or merged export, optional Hub push (lora_dpo.export, lora_dpo.hub)
"""

from .main import build_app

__all__ = ["build_app"]
