"""Run the weak-to-strong pipeline of a recipe (same as `w2s run RECIPE`).

    python scripts/pipeline.py recipes/demo.toml
    torchrun --nproc_per_node=8 scripts/pipeline.py recipes/gsm8k.toml     # sampling and training use all ranks

Finished stages are skipped; a killed run picks up where it stopped. `--help` lists the options. Under torchrun
every rank runs every stage (FSDP2 training, prompts split over ranks); rank 0 writes the artifacts and the report.
Bad input (the recipe, its data files or checkpoints), a nan loss, a full disk or a denied permission end in one
`Error: ...` line naming the file, exit status 1, as with `w2s run`. One checkpoint alone: scripts/evaluate.py.

    python -m pytest -q tests/test_pipeline.py -k torchrun
    python -m pytest -q tests/test_realrun.py -k script
"""

from w2s.cli import run

if __name__ == "__main__":
    run()
