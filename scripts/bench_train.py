"""Training-step benchmark: tokens/s and MFU of w2s's SFT loop, against transformers on the same weights and batches.

    python scripts/bench_train.py                          # `make bench-train`; CPU: a small Llama, fp32
    python scripts/bench_train.py --dpo-memory            # peak memory of DPO with vs without the fused log-probs
    python scripts/bench_train.py --dpo [shape options]   # DPO step tokens/s and MFU (w2s alone; target >= 35 %)
    python scripts/bench_train.py --dim 2048 --layers 16 --heads 16 --kv-heads 8 --hidden 5632 --vocab 32000 \\
        --batch 8 --seq 2048                               # GPU: a ~1B Llama (w2s: FSDP2 bf16 compute, fp32 master)
    python scripts/bench_train.py --dim 2048 --layers 16 --heads 32 --kv-heads 8 --hidden 8192 --vocab 128256 \\
        --batch 8 --seq 2048 --no-hf                       # GPU: Llama-3.2-1B-shaped, w2s alone (MFU)
    python scripts/bench_train.py --profile [--dpo] [shape options]   # + where a step's time goes (torch.profiler)

Both sides run the same random Llama (built by transformers, loaded into w2s from the saved checkpoint) on the same
(batch, seq) token batches, with AdamW at the same settings; one step = forward, backward, optimizer step. The first
--prompt-frac of every row is prompt: no loss on it, on either side. The modes that time w2s alone (--no-hf,
--profile, --dpo) build w2s's model right on the device with transformers' Llama init instead (no checkpoint).
  * w2s:          the real loop, w2s.train.train_sft (collate, fused linear cross-entropy on the target positions
                  only, clipping, logging);
  * transformers: LlamaForCausalLM(input_ids, labels=input_ids with -100 on the prompt).loss, backward, clip, fused
                  AdamW step (the Trainer's default optimizer); its default SDPA attention; on CUDA under bf16
                  autocast.
The two sides alternate step by step (a transformers step runs between two w2s steps, outside w2s's clock), so a
change in the load of a shared machine reaches both alike.
Reported per side: median tokens/s over the steps after --warmup (tokens = model inputs, batch * (seq - 1)), MFU
from w2s/profile.py (model FLOPs 6N + 12 L H D T per token, less the output layer for prompt tokens, as in
w2s.profile.step_flops; peak bf16 FLOP/s by device name, "-" on CPU unless W2S_PEAK_FLOPS is set), and the speed
ratio w2s / transformers (target >= 1.2x). --profile (w2s alone) records the first two measured steps under
torch.profiler and prints their time per group of kernels (attention, matmul, norms, optimizer, copies, ...;
w2s.profile.profile_summary) and the top kernels; the medians then count only the steps after them (give --steps
more than 2). All rows have the same length, so the loop's shuffling changes which rows form a step but not the
work per step.
"""

import argparse
import statistics
import tempfile
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    p.add_argument("--hidden", type=int, default=768, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=8, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="share of every row that is prompt, masked out of the loss (default 0: only the first\n"
                        "token; 0.5 is GSM8K-shaped: half of a question + solution row is the question)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true",
                   help="time w2s alone (its model built on the device with random weights, no checkpoint): for\n"
                        "shapes where two models with their optimizer states would not fit on one GPU together")
    p.add_argument("--dpo", action="store_true",
                   help="instead: tokens/s and MFU of DPO steps (w2s.train.train_preference, w2s alone): --batch\n"
                        "pairs of --seq-token chosen and rejected rows per step; the reference pass runs first and\n"
                        "is not timed (what the loop's meter counts: policy forward + backward + optimizer step)")
    p.add_argument("--dpo-memory", action="store_true",
                   help="instead: peak memory of DPO training (reference pass + --steps steps, --batch pairs each)\n"
                        "with the fused linear log-probs (W2S_KERNELS=auto) vs the unfused reference")
    p.add_argument("--profile", action="store_true",
                   help="also profile the first two measured steps (torch.profiler; w2s alone, implies --no-hf):\n"
                        "where a step's time goes, by group of kernels, and the top kernels")
    args = p.parse_args()
    if args.profile and args.warmup < 1:
        p.error("--profile needs --warmup >= 1: the profiler warms up during the last warm-up step")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_config(args):
    """The transformers LlamaConfig of the requested shape, its output layer untied from the embeddings (Llama-3.2
    ties them; BENCHMARKS.md's shapes do not)."""
    import transformers

    return transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.hidden,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                    architectures=["LlamaForCausalLM"])


def make_checkpoint(args, path):
    """A random transformers Llama of the requested shape, saved to path; -> the transformers model."""
    import transformers

    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(llama_config(args)).float()
    model.save_pretrained(path)
    return model


def random_model_loader(args, device):
    """-> (load, cfg) for the modes that time w2s alone: load() builds a w2s Llama of the requested shape right on
    `device` with fresh N(0, 0.02) weights (transformers' Llama init; the same weights every call), and cfg is its
    ModelConfig, read from the shape's config.json. No checkpoint is written or read: a 3B model's CPU init, save
    and load would take a GPU run's first minute."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer

    with tempfile.TemporaryDirectory() as path:
        llama_config(args).save_pretrained(path)
        cfg = ModelConfig.from_pretrained(path)

    def load():
        with torch.device(device):
            model = Transformer(cfg)
        return model.init_weights(generator=torch.Generator(device).manual_seed(args.seed))

    return load, cfg


def batches(args):
    """Every step's (batch, seq) token ids; ids 3.. so no pad/BOS/EOS. The same list feeds both sides."""
    g = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(3, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.warmup + args.steps)]


def prompt_len(args):
    """Tokens at the start of every row that are prompt (no loss): --prompt-frac of the sequence, at least 1."""
    return max(1, round(args.prompt_frac * args.seq))


PROFILED_STEPS = 2


def profiled_steps(args):
    """How many measured steps run under the profiler: the first PROFILED_STEPS after the warm-up (--profile)."""
    return min(PROFILED_STEPS, args.steps) if args.profile else 0


def step_profiler(args, device):
    """--profile: a torch.profiler that skips the warm-up steps but the last (its own warm-up) and records the
    profiled steps after them; the loop's on_step advances it. None without --profile."""
    if not args.profile:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities,
                   schedule=schedule(wait=args.warmup - 1, warmup=1, active=profiled_steps(args), repeat=1))


def timed_steps(records, args):
    """The step records the medians are taken over: those after the warm-up, and after the profiled steps too while
    any are left (the profiler's overhead stays out of the medians)."""
    profiled = profiled_steps(args)
    return records[args.warmup + (profiled if profiled < args.steps else 0):]


def print_profile(profiler, records, args, device):
    """The profiled steps' time by group of kernels and their top kernels, per step (w2s.profile.profile_summary)."""
    from w2s.profile import profile_summary

    profiled = records[args.warmup: args.warmup + profiled_steps(args)]
    wall_s = sum(r["tokens"] / r["tok_per_s"] for r in profiled if r["tok_per_s"])
    print(f"\nprofile: {len(profiled)} steps after {args.warmup} warm-up (under the profiler)")
    print(profile_summary(profiler, device, per=len(profiled), wall_s=wall_s))


def run_loop(train, args, device, between=None):
    """train(on_step), a training loop that calls on_step(record) after every step -> the records. between(i), when
    given, runs after step i's record; under --profile the profiler is stepped there too, and its summary printed
    at the end."""
    records, profiler = [], step_profiler(args, device)

    def on_step(rec):
        records.append(rec)
        if profiler is not None:
            profiler.step()
        if between is not None:
            between(len(records) - 1)

    if profiler is None:
        train(on_step)
        return records
    with profiler:
        train(on_step)
    print_profile(profiler, records, args, device)
    return records


def bench_w2s(load, steps, args, device, between=None):
    """The real loop on all steps' rows (batch_size = micro_batch_size = batch; it shuffles them) of the model load()
    returns -> step records.

    between(i), when given, runs after w2s's step i is logged and outside its clock (the loop restarts its timer
    after on_step): the two sides alternate step by step, so a change in machine load hits both alike.
    """
    from w2s.train import TrainConfig, train_sft

    n_prompt = prompt_len(args)
    rows = [{"prompt_ids": seq[:n_prompt], "response_ids": seq[n_prompt:]} for ids in steps for seq in ids.tolist()]
    cfg = TrainConfig(lr=1e-4, batch_size=args.batch, micro_batch_size=args.batch, max_steps=len(steps), clip=1.0,
                      max_seq_len=args.seq, progress=False, seed=args.seed)
    return run_loop(lambda on_step: train_sft(load(), None, rows, cfg, on_step=on_step), args, device, between)


def transformers_stepper(hf, steps, args, device):
    """-> (step(i): one LlamaForCausalLM training step on steps[i], [(seconds, tokens, loss)] filled per step)."""
    hf = hf.to(device).train()
    # fused AdamW: what transformers' Trainer uses by default with torch >= 2.8 (optim="adamw_torch_fused")
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    n_prompt = prompt_len(args)
    out = []

    def step(i):
        ids = steps[i].to(device)
        labels = ids.clone()
        labels[:, :n_prompt] = -100  # the prompt carries no loss, as in w2s (transformers shifts labels itself)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = hf(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # a host sync, like the w2s loop's log step
        sync(device)
        out.append((time.perf_counter() - t0, ids.shape[0] * (ids.shape[1] - 1), loss_value))

    return step, out


def random_pairs(args, n_pairs):
    """n_pairs DPO pairs: a one-token prompt, then chosen and rejected responses of seq - 1 random tokens."""
    g = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(3, args.vocab, (n_pairs, 2, args.seq), generator=g).tolist()
    return [{"prompt_ids": c[:1], "chosen_ids": c[1:], "rejected_ids": r[1:]} for c, r in ids]


def bench_dpo(load, args, device):
    """The real DPO loop on the model load() returns (reference pass, then --warmup + --steps steps of --batch pairs)
    -> the step records (the loop's meter: tokens/s and MFU of each step, chosen and rejected rows counted)."""
    from w2s.train import TrainConfig, train_preference

    steps = args.warmup + args.steps
    cfg = TrainConfig(lr=1e-6, batch_size=args.batch, micro_batch_size=args.batch, max_steps=steps,
                      max_seq_len=args.seq, progress=False, seed=args.seed, beta=0.1)
    pairs = random_pairs(args, steps * args.batch)
    return run_loop(lambda on_step: train_preference(load(), None, pairs, cfg, loss="dpo", on_step=on_step), args,
                    device)


def bench_dpo_memory(path, args, device):
    """Peak memory above the loaded model of train_preference(loss="dpo") per kernel backend -> {backend: bytes}.

    Each run: the reference log-prob pass over all pairs, then --steps optimizer steps of --batch pairs (chosen and
    rejected rows of --seq tokens; the response is all but the first token). The fused path never builds the
    (tokens, vocab) logits; the reference builds them in fp32 and keeps them (and the log-softmax) for backward.
    """
    import gc

    import w2s
    from w2s import ops, profile
    from w2s.train import TrainConfig, train_preference

    pairs = random_pairs(args, args.steps * args.batch)
    cfg = TrainConfig(lr=1e-6, batch_size=args.batch, micro_batch_size=args.batch, max_steps=args.steps,
                      max_seq_len=args.seq, progress=False, seed=args.seed, beta=0.1)
    peaks, previous = {}, ops.get_backend()
    try:
        for backend in ("auto", "reference"):
            ops.set_backend(backend)
            model = w2s.load_model(path, dtype=torch.float32)  # the loop moves it (and on CUDA computes in bf16)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            elif not profile.reset_host_peak_rss():
                raise SystemExit("--dpo-memory on CPU needs Linux (/proc/self/clear_refs resets the peak RSS)")
            else:
                base = profile.host_peak_rss_bytes()
            train_preference(model, None, pairs, cfg, loss="dpo")
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else profile.host_peak_rss_bytes()
            peaks[backend] = peak - base
            del model
    finally:
        ops.set_backend(previous)
    return peaks


def main():
    import w2s
    from w2s import profile
    from w2s.config import ModelConfig
    from w2s.profile import step_flops

    args = parse_args()
    device = profile.resolve_device()
    if args.dpo_memory:
        with tempfile.TemporaryDirectory() as path:
            make_checkpoint(args, path)
            peaks = bench_dpo_memory(path, args, device)
        what = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
        print(f"# device {profile.device_name(device)} | DPO, {args.steps} steps x {args.batch} pairs x seq "
              f"{args.seq} | vocab {args.vocab} | {what} above the loaded model")
        for backend, name in (("auto", "fused linear log-probs"), ("reference", "unfused (reference)")):
            print(f"{name:<26}{peaks[backend] / 2**20:>10,.0f} MiB")
        ratio = f"{peaks['auto'] / peaks['reference']:.2f}" if peaks["reference"] > 0 else "n/a (no growth measured)"
        print(f"fused / unfused: {ratio}")
        return
    if args.dpo:
        load, model_cfg = random_model_loader(args, device)
        params = model_cfg.n_params()
        records = bench_dpo(load, args, device)
        timed = timed_steps(records, args)
        tok_s = statistics.median(r["tok_per_s"] for r in timed)
        mfus = [r["mfu"] for r in timed if r["mfu"] is not None]
        print(f"# device {profile.device_name(device)} | params {params / 1e6:.1f}M | DPO, {args.batch} pairs x 2 "
              f"rows x seq {args.seq} per step | median of the last {len(timed)} of {len(records)} steps")
        mfu_text = f"{100 * statistics.median(mfus):.1f}%" if mfus else "-"
        target = f" (target >= 35 %: {'met' if statistics.median(mfus) >= 0.35 else 'NOT met'})" if mfus else ""
        print(f"w2s DPO step: {tok_s:,.0f} tok/s, MFU {mfu_text}{target}, peak "
              f"{max(r['peak_mem_gib'] or 0 for r in records):.1f} GiB")
        return
    steps = batches(args)
    alone = args.no_hf or args.profile
    with tempfile.TemporaryDirectory() as path:
        if alone:
            (load, model_cfg), hf = random_model_loader(args, device), None
        else:
            hf = make_checkpoint(args, path)
            model_cfg = ModelConfig.from_pretrained(path)
            load = lambda: w2s.load_model(path, dtype=torch.float32)  # noqa: E731
        print(f"# device {profile.device_name(device)} | torch threads {torch.get_num_threads()} | params "
              f"{model_cfg.n_params() / 1e6:.1f}M | batch {args.batch} x seq {args.seq} | "
              f"{'bf16 compute, fp32 master' if device.type == 'cuda' else 'fp32'}")
        against = "alone" if alone else ("alternating step by step with transformers (LlamaForCausalLM, same "
                                         "weights and batches)")
        print(f"# w2s (w2s.train.train_sft), {against}; prompt {prompt_len(args)} of {args.seq} tokens per row:")
        hf_step, hf_steps = (None, []) if alone else transformers_stepper(hf, steps, args, device)
        del hf
        records = bench_w2s(load, steps, args, device, between=hf_step)
        if hf_steps:
            print("# transformers:")
    # model FLOPs per input token, the same for both sides (work transformers spends on prompt logits is not counted)
    fpt = step_flops(model_cfg, [(args.seq - 1, args.seq - prompt_len(args))], lora=False) / (args.seq - 1)
    peak = profile.peak_flops(profile.device_name(device))
    for i, (seconds, tokens, loss) in enumerate(hf_steps):
        print(profile.fmt_log_line(step=i + 1, total_steps=len(hf_steps), loss=loss, tok_s=tokens / seconds,
                                   mfu=profile.mfu(tokens / seconds, fpt, peak)))

    timed = timed_steps(records, args)
    medians = {"w2s": statistics.median(r["tok_per_s"] for r in timed)}
    if hf_steps:
        medians["transformers"] = statistics.median(tokens / seconds for seconds, tokens, _ in hf_steps[args.warmup:])
    print(f"\nmedians over the last {len(timed)} of {len(records)} steps\n{'impl':<14}{'tok/s (median)':>16}{'MFU':>8}")
    for name, tok_s in medians.items():
        utilization = profile.mfu(tok_s, fpt, peak)
        print(f"{name:<14}{tok_s:>16,.0f}{'-' if utilization is None else f'{100 * utilization:.1f}%':>8}")
    if not hf_steps:
        return
    w2s_tok_s, hf_tok_s = medians["w2s"], medians["transformers"]
    ratio = w2s_tok_s / hf_tok_s
    print(f"speed ratio w2s / transformers: {ratio:.2f}x (target >= 1.2x: {'met' if ratio >= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    from w2s.parallel import command_line_process

    with command_line_process():  # leaves the 1-rank process group training joins on CUDA
        main()
