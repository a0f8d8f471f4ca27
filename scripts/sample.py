"""Sample completions for a jsonl file of prompts: the same command as `w2s sample`, runnable with python or torchrun.

    python scripts/sample.py CKPT --input prompts.jsonl --output out.jsonl -n 10 --temperature 1 --stop Question
    torchrun --nproc_per_node=8 scripts/sample.py CKPT --input prompts.jsonl --output out.jsonl --tp 2
    python scripts/sample.py --help

Input lines: {"id": ..., "prompt": "Question: ...\\nAnswer:"} (keys set by --id-key / --prompt-key). Output lines, in
input order: {"id", "prompt", "completions": [{"text", "token_ids", "num_tokens", "finish_reason"}, ...]}. A killed
run resumes on rerun without redoing finished prompts. Tested by tests/test_sampling.py (test_sample_script_*).
"""

from w2s.cli import sample

if __name__ == "__main__":
    sample(prog_name="scripts/sample.py")
