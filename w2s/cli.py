"""The `w2s` command line. Every subcommand is a thin wrapper; the work lives in the package.

    w2s --help
    w2s inspect CKPT_DIR          family, shapes, parameters, dtype and memory of an HF checkpoint (no weights read)
    w2s run RECIPE                the whole weak-to-strong pipeline (skips finished stages, resumes killed ones)
    w2s report RUN_DIR            the paper-style table and plot of a run
    w2s data [olympicarena]       download GSM8K / MATH (or the tasks named), or say which file to put where offline
    w2s sample CKPT --input q.jsonl --output out.jsonl [-n 10 --temperature 1 --tp 2]   complete prompts (resumable)
"""

import sys
from collections import Counter
from pathlib import Path

import click


class OneLineError(click.ClickException):
    """click's `Error: ...` line, said once per launch under torchrun, not once per rank (w2s.parallel.say_error)."""

    def show(self, file=None):
        from w2s.parallel import say_error

        say_error(f"Error: {self.format_message()}")


def _one_line(invoke, ctx):
    """Bad input (missing file, malformed config, unknown key, a truncated shard), a diverged training (nan loss), a
    full disk or a denied permission (OSError: it names the path), a run directory locked by another run become one
    `Error: ...` line, not a traceback; so does a rank's collective failing because another rank failed first. A
    warning is one `warning: ...` line, and SIGTERM stops a command as Ctrl-C does (parallel.command_line_process)."""
    from w2s.parallel import command_line_process

    try:
        with command_line_process():
            return invoke(ctx)
    except Exception as e:
        from w2s.parallel import lost_peer_line

        engine = sys.modules.get("w2s.engine")  # loaded whenever its RunLocked (another run holds the lock) is raised
        if isinstance(e, (ValueError, OSError)) or (engine is not None and isinstance(e, engine.RunLocked)):
            raise OneLineError(str(e)) from None
        if line := lost_peer_line(e):
            raise OneLineError(line) from None
        raise


class _Group(click.Group):
    def invoke(self, ctx):
        return _one_line(super().invoke, ctx)


class _Command(click.Command):
    """The same one-line errors for a command run on its own (scripts/pipeline.py runs `run`)."""

    def invoke(self, ctx):
        return _one_line(super().invoke, ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """w2s: weak-to-strong reasoning from scratch in PyTorch (Yang, Ma, Liu 2024).

    A weak model fine-tuned on gold supervises a stronger base model on math word problems: Stage I fine-tunes the
    strong model where the weak answer and the strong model's few-shot answer agree; Stage II runs DPO/ORPO on the
    strong model's confident disagreements with the weak model. See README.md.

    \b
    Examples:
      w2s run recipes/demo.toml          the whole method on the miniature world, on CPU (= make demo)
      w2s report runs/demo               its tables and figure again
      w2s inspect ckpts/Llama-3.1-8B     what a checkpoint holds, from its headers
      w2s sample CKPT --input q.jsonl --output out.jsonl -n 10 --temperature 1
      w2s COMMAND --help                 each command's options, defaults and the data it reads
    Training alone: python scripts/sft.py --help, python scripts/dpo.py --help; evaluation: scripts/evaluate.py.
    """


def _human(n, unit="B"):
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n} {unit}"
        n /= 1024


@main.command()
@click.argument("ckpt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def inspect(ckpt_dir):
    """Print family, layers, heads, vocab, parameter count, dtype and memory of the checkpoint in CKPT_DIR, then
    check that it loads: tokenizer, every shard the index lists, every tensor's bytes within its file (a truncated
    copy), names and shapes against config.json. Exit status 1 with a problem per line when it would not load.

    Reads config.json and the safetensors headers only (model.safetensors or the shards of
    model.safetensors.index.json), so it is instant even for a 70B checkpoint. A LoRA adapter directory (PEFT layout)
    prints the adapter, then its base checkpoint (each adapter of a chain, an adapter trained from an adapter, first).

    \b
    Example:
      w2s inspect demo/strong
    """
    from w2s.checkpoint import adapter_problems, checkpoint_files, checkpoint_problems, read_safetensors_header
    from w2s.config import ModelConfig
    from w2s.lora import adapter_base_dir, read_adapter
    from w2s.tokenizer import tokenizer_file

    problems = []
    while (adapter := read_adapter(ckpt_dir)) is not None:  # ends: adapter_base_dir refuses a chain that comes back
        problems += adapter_problems(ckpt_dir, adapter)
        n = sum(a.numel() + b.numel() for a, b in adapter.tensors.values())
        _echo_rows([("adapter", f"LoRA rank {adapter.rank}, alpha {adapter.alpha:g}, {len(adapter.tensors)} layers "
                                 f"({', '.join(adapter.targets)})"),
                    ("adapter parameters", f"{n:,} ({_human(4 * n)} in fp32)"), ("base", adapter.base)])
        ckpt_dir = adapter_base_dir(ckpt_dir, adapter)
    cfg = ModelConfig.from_pretrained(ckpt_dir)
    stored = checkpoint_files(ckpt_dir)
    files = sorted(set(stored.values()))
    dtypes, stored_bytes, stored_params = Counter(), 0, 0
    for f in files:
        for info in read_safetensors_header(f)[0].values():
            numel = 1
            for s in info["shape"]:
                numel *= s
            dtypes[info["dtype"]] += numel
            begin, end = info["data_offsets"]
            stored_bytes += end - begin  # the header's own extent: exact for any dtype, FP8 included
            stored_params += numel
    n = cfg.n_params()
    windows = sorted({str(cfg.layer_window(i)) for i in range(cfg.n_layers)})
    rows = [
        ("family", cfg.family),
        ("layers", cfg.n_layers),
        ("dim / mlp hidden", f"{cfg.dim} / {cfg.hidden_dim}"),
        ("heads / kv heads / head dim", f"{cfg.n_heads} / {cfg.n_kv_heads} / {cfg.head_dim}"),
        ("vocab", cfg.vocab_size),
        ("tied embeddings", cfg.tie_embeddings if not (cfg.tie_embeddings and "lm_head.weight" in stored) else
         "True in config.json, but an lm_head.weight is stored too: untied on load if it differs"),
        ("sliding windows", ", ".join(windows)),
        ("rope", f"theta {cfg.rope_theta:g}" + (f", {cfg.rope_scaling.get('rope_type')} scaling"
                                                 if cfg.rope_scaling else "")),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)"),
        ("stored dtype", ", ".join(f"{d} ({c / stored_params:.0%})" for d, c in dtypes.most_common())),
        ("shards", len(files)),
        ("memory (as stored)", _human(stored_bytes)),
        ("memory in bf16 / fp32", f"{_human(2 * n)} / {_human(4 * n)}"),
        ("full fine-tune, AdamW fp32 states", _human(16 * n) + " (fp32 master, grads, AdamW m, v)"),
    ]
    has_tokenizer = tokenizer_file(ckpt_dir) is not None
    problems += checkpoint_problems(ckpt_dir, tokenizer=has_tokenizer)
    ok = "loads" + ("" if has_tokenizer else " (no tokenizer: token-id prompts only)")
    rows.append(("check", ok if not problems else f"{len(problems)} problem(s):"))
    _echo_rows(rows)
    for problem in problems:
        click.echo(f"  {problem}")
    if problems:
        raise SystemExit(1)


def _echo_rows(rows):
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command(cls=_Command)
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--runs", default="runs", show_default=True, help="Directory holding runs/<recipe name>/.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only)  [default: bars shown]")
@click.option("--dry-run", is_flag=True,
              help="Run nothing: list every stage as done / will run / will rerun and why, with its estimated tokens, "
                   "disk, peak memory per device and time.")
@click.option("--world-size", type=int, default=None,
              help="--dry-run: processes of the run it plans for [default: this launch's, 1 under plain python].")
@click.option("--gpu", "gpu", default=None,
              help="--dry-run: the GPU the time estimate is for, e.g. 'H100 SXM' [default: this machine's].")
@click.option("--reuse", type=click.Path(path_type=Path), default=None,
              help="Another run directory: take its finished stages that this recipe would run with the same key "
                   "(hard links; copies across file systems) instead of running them. Stages this run has finished "
                   "stay its own.")
def run(recipe, runs, no_progress, dry_run, world_size, gpu, reuse):
    """Run every stage of RECIPE (a TOML file, see recipes/) that is not already done.

    Each stage writes runs/<name>/<NN_stage>/ with its data and a meta.json written last; a finished stage is
    skipped, a killed one resumes, and changing an option reruns exactly the stages that depend on it. At the end
    the report (tables, report.md, report.png) of `w2s report` is printed.

    \b
    Examples:
      w2s run recipes/demo.toml                                      (= make demo)
      torchrun --nproc_per_node=8 scripts/pipeline.py recipes/gsm8k.toml
      w2s run recipes/gsm8k.toml --dry-run --world-size 8 --gpu "H100 SXM"
      w2s run my_stage2_idea.toml --reuse runs/gsm8k-gemma2b-llama2-70b   (Stage I taken, not rerun)
    \b
    What it reads: the recipe's sections (w2s/recipe.py lists every key and default): [data] task, train, test,
    split sizes or split_file, seed, grader; [models] weak, strong (HF checkpoint dirs), dtype, device; [sampling];
    [weak_sft] [strong_sft] [preference] (TrainConfig fields, as scripts/sft.py --help); [stage1]; [stage2]; [eval];
    [logging] report_to = ["tensorboard"] (-> runs/<name>/tb/<stage>) or ["wandb"]. The train and test files are
    jsonl in the task's format: GSM8K {"question", "answer": "... #### N"}; MATH {"problem", "solution", ...}.
    """
    from w2s.estimate import dry_run as plan_run
    from w2s.parallel import exit_if_stopped, is_main
    from w2s.pipeline import run_pipeline

    if dry_run:
        plan = plan_run(recipe, runs_dir=runs, world=world_size, device=gpu, reuse=reuse)
        if is_main():  # under torchrun every rank plans (the same plan); one prints it
            click.echo(plan)
        return
    try:
        _, _, text = run_pipeline(recipe, runs_dir=runs, progress=not no_progress, reuse=reuse)
    except (KeyboardInterrupt, RuntimeError) as e:
        exit_if_stopped(e, "the finished stages are kept; the same command resumes the run")
        raise
    if text:  # under torchrun only rank 0 builds the report; the other ranks print nothing
        click.echo(text)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--no-plot", is_flag=True, help="Skip report.png  [default: drawn when matplotlib is installed]")
def report(run_dir, no_plot):
    """Print the paper-style tables of RUN_DIR (accuracy, PGR, selected data and its precision, cost per stage and
    per kind of work) and write report.md and report.png (accuracy by method group with the weak-floor and ceiling
    lines and PGR; selection precision and set sizes per round) in RUN_DIR; the last line names the files written.

    \b
    Example:
      w2s report runs/demo
    What it reads: RUN_DIR/<NN_stage>/meta.json of every finished stage, RUN_DIR/recipe.json (the grader, and
    whether the run has gold) and RUN_DIR/stages.json (the stages of the latest run's recipe, with their keys) when
    there are; a finished stage that is not part of the run as it stands (an earlier recipe's, or one whose input
    ran again since) is left out, and the report names it.
    """
    from w2s.report import write_report

    text, written = write_report(run_dir, plot=not no_plot)
    click.echo(text)
    click.echo("wrote " + ", ".join(str(p) for p in written))


@main.command()
@click.argument("tasks", nargs=-1, type=click.Choice(["gsm8k", "math", "olympicarena"]))
@click.option("--dest", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Where to put the gsm8k/, math/ and olympicarena/ jsonl files.")
@click.option("--offline", is_flag=True, help="Do not try the network; only list what is missing and where from.")
def data(tasks, dest, offline):
    """Download the public files of TASKS (default: gsm8k math) into DEST; offline, print exactly which file to put
    where. `w2s data olympicarena` writes olympicarena/test.jsonl (train_2) and val.jsonl (the test set).

    \b
    Examples:
      w2s data                      data/gsm8k/{train,test}.jsonl and data/math/...
      w2s data gsm8k --offline      only say what is missing and where to get it
    """
    from w2s.tasks import fetch_data

    if any(p.exists() and not p.is_dir() for p in (dest, *dest.parents)):
        raise ValueError(f"--dest {dest}: it, or a directory above it, is a file; expected a directory")
    missing = fetch_data(dest, tasks=tasks or ("gsm8k", "math"), offline=offline, log=click.echo)
    if missing:
        raise SystemExit(1)


def _unescape(text):
    """Shell-friendly stop strings: backslash-n / backslash-t in an option value mean a newline / tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@click.command()
@click.argument("ckpt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="Prompts: jsonl, one JSON object per line with a prompt (string or list of token ids) and an id.")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help='Completions: jsonl, one {"id", "prompt", "completions": [n dicts]} per input line, in input order.'
                   " Streamed to OUTPUT.part<rank> as prompts finish; a rerun resumes where a killed run stopped.")
@click.option("--prompt-key", default="prompt", show_default=True, help="Key of the prompt in each input line.")
@click.option("--id-key", default="id", show_default=True,
              help="Key of the unique id in each input line ('' numbers the lines 0, 1, ... instead).")
@click.option("-n", "--n", "n", default=1, show_default=True, type=click.IntRange(min=1),
              help="Completions per prompt.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0, min_open=True),
              help="Nucleus sampling mass (1 keeps every token).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Keep the k most likely tokens (0: no limit).")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Generated tokens per completion at most.")
@click.option("--stop", multiple=True,
              help="A string that ends a completion (repeatable; \\n means a newline)  [default: EOS only]")
@click.option("--seed", default=0, show_default=True,
              help="Sampling seed; a completion depends only on (seed, line index, sample index).")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="Sequences decoded together (cache slots).")
@click.option("--cache-len", default=None, type=click.IntRange(min=1),
              help="KV positions per sequence [default: longest prompt + max-new-tokens]; longer prompts are an error.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel size (under torchrun; ranks in groups of tp, the groups split the prompts).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bfloat16", "float16", "float32"]), help="auto: bfloat16 on CUDA, else fp32.")
@click.option("--no-cuda-graphs", is_flag=True,
              help="Run the decode step eagerly on CUDA (CUDA graphs are the default there; never used on CPU).")
@click.option("--no-shared-prefix", is_flag=True,
              help="Do not prefill the prompts' common prefix once and share it  [default: shared]")
@click.option("--prefill-chunk", default=0, show_default=True, type=click.IntRange(min=0),
              help="Prompt tokens per decode step: prompts entering freed slots ride in the decode batch instead of a "
                   "prefill forward of their own (chunked prefill; 0 is off). Changes no sample.")
@click.option("--no-progress", is_flag=True, help="No progress bar  [default: shown]")
def sample(ckpt_dir, input_path, output_path, prompt_key, id_key, n, temperature, top_p, top_k, max_new_tokens, stop,
           seed, max_batch, cache_len, tp, dtype, no_cuda_graphs, no_shared_prefix, prefill_chunk, no_progress):
    """Complete every prompt of INPUT with the HF checkpoint in CKPT_DIR; write OUTPUT (resumable).

    \b
    Examples:
      w2s sample CKPT --input q.jsonl --output out.jsonl -n 10 --temperature 1 --stop Question
      torchrun --nproc_per_node=8 scripts/sample.py CKPT --input q.jsonl --output out.jsonl --tp 2
    \b
    INPUT lines: {"id": ..., "prompt": "Question: ...\\nAnswer:"} (a string, or a list of token ids; keys set by
    --id-key / --prompt-key). OUTPUT lines, in input order: {"id", "prompt", "completions": [{"text", "token_ids",
    "num_tokens", "finish_reason": "eos" | "stop" | "length"}, ...]}. With --tp 2 under 8 processes: 4
    data-parallel groups of 2 tensor-parallel ranks. The output is the same for any number of processes and any
    --max-batch (same seed).
    """
    import time

    import torch

    from w2s.checkpoint import fingerprint, model_config
    from w2s.parallel import barrier, exit_if_stopped, init_distributed
    from w2s.sampling import check_distribution, check_prompts
    from w2s.sampling_jsonl import check_run_meta, generate_to_jsonl, read_prompts_jsonl, write_run_meta

    try:
        check_distribution(temperature, top_p, top_k)
        if any(p.exists() and not p.is_dir() for p in output_path.parents):
            raise ValueError(f"--output {output_path}: a directory above it is a file")
        records, lines = read_prompts_jsonl(input_path, prompt_key=prompt_key, id_key=id_key, with_lines=True)
        d = init_distributed()
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                       "auto": torch.bfloat16 if d.device.type == "cuda" else torch.float32}[dtype]
        stop = [_unescape(s) for s in stop]
        # what the samples depend on (not batch size, tp, graphs, prefix sharing or chunking: w2s/sampling_engine.py)
        meta = {"checkpoint": str(ckpt_dir.resolve()), "checkpoint_files": fingerprint(ckpt_dir), "n": n,
                "temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
                "stop": stop, "seed": seed, "dtype": str(torch_dtype).removeprefix("torch."),
                "prompt_key": prompt_key, "id_key": id_key}
        fresh = check_run_meta(output_path, meta)  # before loading 140 GB: a mismatch is refused at once
        tokenizer = _sampling_tokenizer(ckpt_dir, records, prompt_key)
        vocab_size = model_config(ckpt_dir).vocab_size
        # a bad prompt is named by its line, before the weights load
        check_prompts(tokenizer, [r[prompt_key] for r in records], lines, vocab_size, max_new_tokens, cache_len)
        model = _load_for_sampling(ckpt_dir, tp, torch_dtype, d.device)
        barrier()  # every rank has checked the record before rank 0 writes it
        if fresh and d.is_main:
            write_run_meta(output_path, meta)
        start = time.perf_counter()
        generate_to_jsonl(model, tokenizer, records, output_path, prompt_key=prompt_key, id_key=id_key or "id",
                          progress=not no_progress, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                          max_new_tokens=max_new_tokens, stop=stop, seed=seed,
                          max_batch=max_batch, cache_len=cache_len, shared_prefix=not no_shared_prefix,
                          cuda_graphs=False if no_cuda_graphs else None, prefill_chunk=prefill_chunk)
    except (ValueError, OSError) as e:
        raise OneLineError(str(e)) from None
    except (KeyboardInterrupt, RuntimeError) as e:
        exit_if_stopped(e, "the prompts finished so far are kept; the same command resumes")
        raise
    if d.is_main:
        click.echo(f"wrote {output_path}: {len(records)} prompts x {n} completions in "
                   f"{time.perf_counter() - start:.1f} s", err=True)


def _sampling_tokenizer(ckpt_dir, records, prompt_key):
    """The tokenizer of a checkpoint or adapter directory; None when it has none and every prompt is token ids."""
    from w2s.checkpoint import tokenizer_dir
    from w2s.tokenizer import load_tokenizer, tokenizer_file

    if tokenizer_file(tokenizer_dir(ckpt_dir)) is not None:
        return load_tokenizer(tokenizer_dir(ckpt_dir))
    if any(isinstance(r[prompt_key], str) for r in records):
        raise ValueError(f"{ckpt_dir}: no tokenizer.json or tokenizer.model, so prompts must be token-id lists")
    return None


def _load_for_sampling(ckpt_dir, tp, dtype, device):
    """The model of a checkpoint or adapter directory, tensor-parallel when tp > 1."""
    if tp > 1:
        from w2s.tensor_parallel import load_model_tp

        return load_model_tp(ckpt_dir, tp, dtype=dtype, device=device)
    from w2s.checkpoint import load_model

    return load_model(ckpt_dir, dtype=dtype, device=device)


main.add_command(sample)


if __name__ == "__main__":
    main()
