"""`clipvip` console script: one subcommand per job, each `--config FILE.yaml` + repeated `--set`.

The CLI is frozen to those two options (plus `--out/--seed` for sample data, `inspect ROOT`
with `--set storage.*`, and `plan --json`): every other knob is a config key, so YAML recipes, overrides and MLflow
params share one vocabulary.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module in jobs/, one-line help)
COMMANDS = {
    "sample-data": ("jobs.sample_data", "write a synthetic HD-VILA-format dataset (videos, metadata, subtitles)"),
    "prepare": ("jobs.prepare", "videos -> frame shards + auxiliary captions (Ray Data)"),
    "recaption": ("jobs.recaption", "a new caption set for a prepared root with another captioner; frames untouched"),
    "pack": ("jobs.pack", "a training view of a root and caption set: frames at training size, mixed row groups"),
    "plan": ("jobs.plan", "dry run of a prepare/recaption/pretrain recipe: work, costs, cluster fit (`--json`)"),
    "inspect": ("jobs.inspect_root", "list a dataset root: shards, caption sets, clip counts (`clipvip inspect ROOT`)"),
    "pretrain": ("jobs.pretrain", "omnisource post-pretraining on Ray Train + DeepSpeed, tracked in MLflow"),
    "evaluate": ("jobs.evaluate", "text<->video retrieval metrics (MSR-VTT/DiDeMo/LSMDC/ActivityNet) for any checkpoint"),
    "finetune": ("jobs.finetune", "retrieval fine-tuning on Ray Train + DeepSpeed, best checkpoint chosen on validation"),
    "submit": ("jobs.submit", "submit a jobs/ recipe to a Ray cluster through the Ray Jobs API (`--follow` streams logs)"),
    "job": ("jobs.job_control", "status, logs or stop of a submitted job (`clipvip job status|logs|stop ID`)"),
    "demo": ("jobs.demo", "the embedded default end to end on synthetic data (what `make run` runs)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="clipvip", description="CLIP-ViP post-pretraining pipeline")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
