"""`w2s --help` and `w2s inspect` on tiny checkpoints.

    python -m pytest -q tests/test_cli.py
"""

import re

import pytest
from click.testing import CliRunner
from hf_tiny import FAMILIES, save_hf, store_output_matrix

from w2s.cli import _human, _unescape, main
from w2s.config import ModelConfig


def test_help_lists_commands():
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0 and "inspect" in out.output


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count_matches_transformers(family, tmp_path):
    hf = save_hf(family, tmp_path)
    assert ModelConfig.from_pretrained(tmp_path).n_params() == sum(p.numel() for p in hf.parameters())



def test_parameter_count_with_attention_and_mlp_biases_matches_transformers(tmp_path):
    """Qwen-style q/k/v/o and MLP biases add their vectors to the count (inspect, MFU and the memory estimate)."""
    from hf_tiny import save_llama_with_biases
    from transformers import AutoModelForCausalLM

    save_llama_with_biases(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path).n_params() == sum(p.numel() for p in hf.parameters())


def test_inspect_prints_shapes_and_memory(tmp_path):
    hf = save_hf("gemma2", tmp_path)
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert out.exit_code == 0, out.output
    n = sum(p.numel() for p in hf.parameters())
    assert "gemma2" in out.output and f"{n:,}" in out.output
    assert "F32 (100%)" in out.output and "5, None" in out.output
    # stored bytes: every tensor's data, i.e. each file less its 8-byte length and its JSON header
    data = 0
    for f in tmp_path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            data += f.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    assert re.search(rf"\nmemory \(as stored\) +{re.escape(_human(data))}\n", out.output)


def test_inspect_memory_follows_the_parameter_count_and_names_a_stored_output_matrix(tmp_path):
    """bf16 is 2 bytes a parameter, fp32 4, and a full fine-tune with AdamW 16 (fp32 master, gradient, m and v).
    A tied config whose checkpoint stores an lm_head.weight anyway is said to be untied on load if it differs."""
    hf = save_hf("gemma", tmp_path)
    n = sum(p.numel() for p in hf.parameters())
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)]).output
    assert re.search(rf"\nmemory in bf16 / fp32 +{re.escape(_human(2 * n))} / {re.escape(_human(4 * n))}\n", out)
    assert re.search(rf"\nfull fine-tune, AdamW fp32 states +{re.escape(_human(16 * n))} ", out)
    assert re.search(r"\ntied embeddings +True\n", out)
    store_output_matrix(tmp_path)
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)]).output
    assert "tied embeddings" in out and "an lm_head.weight is stored too: untied on load if it differs" in out


def test_sizes_are_said_in_binary_units():
    assert (_human(1023), _human(1024), _human(3 * 2**29), _human(2**50)) == \
        ("1023 B", "1.0 KiB", "1.5 GiB", "1024.0 TiB")


def test_stop_strings_from_the_shell_read_backslash_n_and_t():
    assert _unescape("\\nQuestion\\t") == "\nQuestion\t" and _unescape("plain") == "plain"


def test_data_offline_exits_1_while_a_file_is_missing(tmp_path):
    out = CliRunner().invoke(main, ["data", "gsm8k", "--offline", "--dest", str(tmp_path)])
    assert out.exit_code == 1 and "gsm8k" in out.output


def test_sample_without_a_tokenizer_takes_token_ids_in_fp32_on_cpu(tmp_path):
    """A checkpoint with no tokenizer samples token-id prompts; one text prompt among them is refused before the
    weights load. --dtype auto is fp32 off CUDA (bf16 is for GPUs), and the run's record says so."""
    import json

    save_hf("llama2", tmp_path / "ckpt")
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": [1, 2, 3]}) + "\n" + json.dumps({"id": "b", "prompt": [4]}))
    args = ["sample", str(tmp_path / "ckpt"), "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "2", "--no-progress"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["completions"][0]["num_tokens"]) for r in rows] == [("a", 2), ("b", 2)]
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["dtype"] == "float32"
    prompts.write_text(json.dumps({"id": "a", "prompt": [1, 2, 3]}) + "\n" + json.dumps({"id": "b", "prompt": "4"}))
    out = CliRunner().invoke(main, [*args[:5], str(tmp_path / "other.jsonl"), *args[6:]])
    assert out.exit_code == 1 and "no tokenizer.json or tokenizer.model, so prompts must be token-id" in out.output


def test_inspect_bad_dir_is_one_clear_error(tmp_path):
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert out.exit_code == 1
    assert out.output.startswith("Error: ") and "no config.json" in out.output and len(out.output.splitlines()) == 1


def test_an_error_is_said_once_per_torchrun_launch_and_named_in_its_failure_summary(tmp_path, monkeypatch):
    """Under torchrun every rank meets the same bad input: rank 0 prints the one line, and each rank writes it to
    torchrun's error file (its failure summary said "To enable traceback see ..." instead)."""
    import json

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    for rank in ("0", "1"):
        error_file = tmp_path / f"error{rank}.json"
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        out = CliRunner().invoke(main, ["inspect", str(tmp_path)])
        assert out.exit_code == 1
        line = f"Error: {tmp_path}/config.json: no config.json (expected a Hugging Face checkpoint directory)"
        assert out.output == (line + "\n" if rank == "0" else "")
        # torchrun reads the file this way for its summary
        failure = ProcessFailure(local_rank=int(rank), pid=1, exitcode=1, error_file=str(error_file))
        assert failure.message["extraInfo"]["py_callstack"] == line
        assert json.loads(error_file.read_text())["message"]["message"] == line
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # another launcher: no summary to carry it, so every rank says it
    assert CliRunner().invoke(main, ["inspect", str(tmp_path)]).output == f"[rank 1] {line}\n"


def test_a_rank_whose_peer_left_is_told_apart_from_its_own_failure(monkeypatch):
    """gloo's error on the ranks that wait in a collective when another rank has failed (rank 0's export I/O, say):
    sft.py / dpo.py turn it into one line there, not a traceback after the failed rank's own line."""
    from w2s import parallel

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46251. This is "
                        "typically caused by a remote worker crashing.")
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 1)
    assert parallel.lost_peer_line(gone) == "rank 1 stopped: another rank left the process group (its error says why)"
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:598] Connection reset by peer [127.0.0.1]:48391")
    assert parallel.lost_peer_line(reset) == parallel.lost_peer_line(gone)  # the other way gloo says it
    assert parallel.lost_peer_line(RuntimeError("CUDA out of memory")) is None
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)  # rank 0's own failure is never hidden
    assert parallel.lost_peer_line(gone) is None


def test_a_barrier_waits_only_among_several_joined_ranks(monkeypatch):
    """parallel.barrier is a collective in a joined group of more than one rank, and a no-op in a single process:
    no group, a group of one, or a plain (unsharded) Dist. torch.distributed is stood in for."""
    import torch

    from w2s import parallel

    waits = []
    monkeypatch.setattr(parallel.dist, "barrier", lambda *args, **kwargs: waits.append(True))
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    parallel.barrier()
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 1)
    parallel.barrier()
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    parallel.barrier(parallel.Dist(0, 1, torch.device("cpu"), sharded=False))
    assert waits == []
    parallel.barrier()
    parallel.barrier(parallel.Dist(1, 2, torch.device("cpu"), sharded=True))
    assert waits == [True, True]


def test_a_dry_run_under_torchrun_prints_its_plan_once(monkeypatch):
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "demo.toml")
    plan = CliRunner().invoke(main, ["run", recipe, "--dry-run"])
    assert plan.exit_code == 0 and "01_weak_sft" in plan.output
    monkeypatch.setenv("RANK", "1")  # every rank plans; rank 0 prints (each rank printed all of it)
    assert CliRunner().invoke(main, ["run", recipe, "--dry-run"]).output == ""


def test_ctrl_c_says_what_is_kept_and_how_to_resume(monkeypatch):
    import w2s.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(w2s.pipeline, "run_pipeline", interrupted)
    out = CliRunner().invoke(main, ["run", "recipe.toml"])
    assert out.exit_code == 130
    assert out.output.strip() == ("stopped (Ctrl-C or SIGTERM): the finished stages are kept; the same command "
                                  "resumes the run")


@pytest.mark.parametrize("option", [["--temperature", "nan"], ["--temperature", "inf"], ["--top-p", "nan"]])
def test_sample_refuses_an_impossible_distribution_before_reading_anything(tmp_path, option):
    """The checkpoint and the prompts file do not even exist: the options are refused first, in one line (NaN
    passes click's ranges, so w2s checks it before loading the model or writing the run's meta.json)."""
    out = CliRunner().invoke(main, ["sample", str(tmp_path), "--input", str(tmp_path / "p.jsonl"), "--output",
                                    str(tmp_path / "o.jsonl"), *option])
    assert out.exit_code == 1 and out.output.startswith(f"Error: {option[0][2:].replace('-', '_')}=")
    assert len(out.output.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_an_output_under_a_file_and_impossible_sizes_before_loading(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = CliRunner().invoke(main, ["sample", str(tmp_path), "--input", str(tmp_path / "p.jsonl"), "--output",
                                    str(tmp_path / "a_file" / "o.jsonl")])
    assert out.exit_code == 1 and "a directory above it is a file" in out.output  # before loading, not an OS error
    for option in (["--tp", "0"], ["--cache-len", "-5"]):
        out = CliRunner().invoke(main, ["sample", str(tmp_path), "--input", "p", "--output", "o", *option])
        assert out.exit_code == 2 and f"Invalid value for '{option[0]}'" in out.output


def test_data_refuses_a_destination_that_is_a_file(tmp_path):
    (tmp_path / "sft.jsonl").write_text("{}\n")
    for dest in (tmp_path / "sft.jsonl", tmp_path / "sft.jsonl" / "below"):
        out = CliRunner().invoke(main, ["data", "gsm8k", "--offline", "--dest", str(dest)])
        assert (out.exit_code, out.output) == (1, f"Error: --dest {dest}: it, or a directory above it, is a file; "
                                                  f"expected a directory\n")
