"""The Gradio app of lora-dpo (installed as `lora_dpo_app`): it calls lora_dpo and holds no training logic.

    command.py       `lora-dpo app`'s arguments, light: `lora-dpo --help` lists them without gradio or torch
    main.py          `lora-dpo app`: build_app(workspace) and launch (127.0.0.1 by default, optional login)
    workspace.py     the folders the app may touch; every typed path is checked against them
    jobs.py          one training job at a time, as a `lora-dpo train` subprocess; its progress from the run dir
    train_tab.py     recipe fields (resume filled from the run itself), command preview, Start/Stop, data preview,
                     save as recipe, progress bar, the run's phases, live plots, log, final metrics
    runs.py          the finished runs as the tabs offer them
    phases.py        the phases of a run (lora_dpo.run.read_phases) as the page shows them; pure HTML
    sweep_tab.py     a beta sweep as a `lora-dpo sweep` job, its frontier drawn as points finish (lora_dpo.sweep)
    compare_tab.py   reference vs tuned (or A vs B) answers with implicit rewards (lora_dpo.compare), how far the
                     adapter moved the model, and where the answers part
    chat_tab.py      a conversation with a finished run's model, adapter on or off, streamed
    export_tab.py    adapter or merged export, optional Hub push or its dry run (lora_dpo.export, lora_dpo.hub)
"""

from lora_dpo.lazy import lazy_names

# build_app loads gradio and torch on first use: `lora-dpo --help` reads command.py through this package
__getattr__, __dir__ = lazy_names(__name__, {"build_app": ".main"})
__all__ = ["build_app"]
