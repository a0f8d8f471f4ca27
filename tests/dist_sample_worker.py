"""Worker for tests/test_sampling_dist.py: sampling under torchrun, 2 CPU processes (gloo), tensor AND data parallel.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_sample_worker.py WORK_DIR

WORK_DIR/job.json holds {"prompts": [[ids]], "families": {name: ckpt_dir}, "options", "sampled_options"} and
optionally "chunked_options". For each family this runs, in one process group of 2 ranks:
  * tp=2, dp=1: load_model_tp (each rank reads only its slices), greedy generate, generate_to_jsonl (and for llama2
    also apply_tensor_parallel on a fully loaded model); with chunked_options, a generate with chunked prefill;
  * tp=1, dp=2: the full model on each rank, greedy and sampled (n=2) generate, generate_to_jsonl;
and rank 0 writes WORK_DIR/result.json; the jsonl files go to WORK_DIR/<family>_{tp,dp}.jsonl. The test compares
all of it with a one-process run. Before sampling, each rank checks w2s.parallel's broadcast_object and all_reduce_sum
on the real group (a failed check fails the launch).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import w2s
from w2s.parallel import Dist, all_reduce_sum, broadcast_object
from w2s.sampling import generate
from w2s.sampling_jsonl import generate_to_jsonl
from w2s.tensor_parallel import apply_tensor_parallel, load_model_tp, tp_group_for


def main(work):
    work = Path(work)
    job = json.loads((work / "job.json").read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # What the engine (run ids, refusals) and the trainer (rank 0's fingerprint, global token counts) rely on: rank
    # 0's object reaches every rank, a plain Dist keeps its own, and all_reduce_sum adds the ranks' values.
    d = Dist(rank, 2, torch.device("cpu"), sharded=True)
    assert broadcast_object(f"rank {rank}") == broadcast_object(f"rank {rank}", d) == "rank 0", rank
    assert broadcast_object(f"rank {rank}", Dist(rank, 1, torch.device("cpu"), sharded=False)) == f"rank {rank}"
    assert all_reduce_sum(torch.tensor([rank + 1.0]), d).tolist() == [3.0], rank
    prompts, opts, sampled = job["prompts"], job["options"], job["sampled_options"]
    records = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
    result = {}
    for family, ckpt in job["families"].items():
        tp_model = load_model_tp(ckpt, tp=2, dtype=torch.float32)
        assert tp_model.layers[0].self_attn.q_proj.weight.shape[0] * 2 == tp_model.cfg.n_heads * tp_model.cfg.head_dim
        result[f"{family}/tp/greedy"] = generate(tp_model, None, prompts, progress=False, **opts)
        if job.get("chunked_options"):  # mixed decode steps: the ranks' host plans must stay in lockstep
            result[f"{family}/tp/chunked"] = generate(tp_model, None, prompts, progress=False, **job["chunked_options"])
        generate_to_jsonl(tp_model, None, records, work / f"{family}_tp.jsonl", progress=False, **opts)
        del tp_model

        dp_model = w2s.load_model(ckpt, dtype=torch.float32)
        if family == "llama2":  # the other entry point: split a model that is already loaded in full
            group, tp_rank = tp_group_for(2)
            split = apply_tensor_parallel(w2s.load_model(ckpt, dtype=torch.float32), group, tp_rank, 2)
            result[f"{family}/tp_in_memory/greedy"] = generate(split, None, prompts, progress=False, **opts)
            del split
        result[f"{family}/dp/greedy"] = generate(dp_model, None, prompts, progress=False, **opts)
        result[f"{family}/dp/sampled"] = generate(dp_model, None, prompts, progress=False, **sampled)
        generate_to_jsonl(dp_model, None, records, work / f"{family}_dp.jsonl", progress=False, **opts)
    if rank == 0:
        (work / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
