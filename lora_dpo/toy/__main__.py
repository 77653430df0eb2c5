"""`python -m lora_dpo.toy`: where the toy world's base and data are (the data written into the cache if need be).
`python -m lora_dpo.toy build DIR`: make the base again into DIR, and say whether its bits equal the shipped
base's (`python -m lora_dpo.toy build lora_dpo/toy/base` refreshes the shipped one after a change to the world)."""

import argparse
import sys
from pathlib import Path

from .build import BASE, RECORD, build_base, shipped_record
from .cache import toy_data_files

parser = argparse.ArgumentParser(prog="python -m lora_dpo.toy", description=__doc__)
parser.add_argument("command", nargs="?", choices=["build"], help="make the base again")
parser.add_argument("folder", nargs="?", type=Path, help="where to build it")
args = parser.parse_args()
if args.command is None:
    print(f"model: {BASE}")
    for split, path in toy_data_files().items():
        print(f"{split}: {path}")
    sys.exit(0)
if args.folder is None:
    parser.error("build: give the folder to build into")
record = build_base(args.folder)
same = record["model_sha256"] == shipped_record()["model_sha256"] if (BASE / RECORD).is_file() else None
print(f"built the toy base into {args.folder} in {record['seconds']} s (final pre-training loss "
      f"{record['final_pretraining_loss']}); "
      + {True: "its weights equal the shipped base's, bit for bit", False: "its weights differ from the shipped base's",
         None: "no shipped base to compare with"}[same])
