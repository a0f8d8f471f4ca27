"""Recipes (w2s/recipe.py): the shipped GSM8K / MATH recipes say what docs/PAPER.md says, defaults follow the paper,
paths resolve against the recipe's directory, and every bad recipe stops with one line naming the file and the key. Also
the stage plan a recipe implies (w2s/pipeline.py build_stages), without loading any model.

    python -m pytest -q tests/test_recipe.py
"""

import json
from pathlib import Path

import pytest

from w2s.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_recipes_follow_the_paper():
    gsm8k = load_recipe(ROOT / "recipes" / "gsm8k.toml", check_files=False)
    math = load_recipe(ROOT / "recipes" / "math.toml", check_files=False)
    for r in (gsm8k, math):
        assert r.stage2.n_samples == 10 and r.stage2.temperature == 1.0 and r.stage2.top_p == 1.0
        assert (r.stage2.min_confidence, r.stage2.flip_confidence) == (0.6, 0.8)
        assert r.stage2.losses == ["dpo", "orpo"] and r.stage1.n_demos == 4 and r.eval.pass_k_samples == 10
        assert r.strong_sft["lora_rank"] == 8 and r.preference["beta"] == 0.1
        assert r.stage2.export_merged == ["dpo"]  # the one merged 70B copy: M_pro (README: disk per recipe)
    assert (gsm8k.data.task, gsm8k.stage1.rounds, gsm8k.stage2.max_pairs, gsm8k.sampling.sample_max_new_tokens) == \
        ("gsm8k", 2, 1, 1024)
    assert (math.data.task, math.stage1.rounds, math.stage2.max_pairs, math.sampling.sample_max_new_tokens) == \
        ("math", 1, 3, 2048)
    demo = load_recipe(ROOT / "recipes" / "demo.toml", check_files=False)
    assert gsm8k.data.grader == math.data.grader == demo.data.grader == "paper"  # the authors' answer protocol
    # Relative paths are resolved against the recipe's directory, not the working directory.
    assert gsm8k.data.train == str((ROOT / "data" / "gsm8k" / "train.jsonl").resolve())


def _world(tmp_path):
    for name in ("train.jsonl", "test.jsonl"):
        if not (tmp_path / name).exists():
            (tmp_path / name).write_text("{}\n")
    for name in ("weak", "strong"):
        (tmp_path / name).mkdir(exist_ok=True)
        if not (tmp_path / name / "config.json").exists():  # rewriting it would change its mtime, hence the keys
            (tmp_path / name / "config.json").write_text("{}")
    return tmp_path


BASE = """
[data]
train = "train.jsonl"
test = "test.jsonl"
[models]
weak = "weak"
strong = "strong"
"""


def _load(tmp_path, text):
    path = _world(tmp_path) / "r.toml"
    path.write_text(text)
    return load_recipe(path)


def test_defaults_and_train_config(tmp_path):
    from w2s.recipe import train_config

    r = _load(tmp_path, BASE + '[strong_sft]\nlr = 2e-5\nadam_betas = [0.9, 0.99]\nlora_targets = ["q_proj"]\n')
    assert r.name == "r" and r.stage1.rounds == 2 and r.stage1.round2_init == "base"
    assert r.eval.baselines == ["full_weak_ft", "strong_icl", "ceiling"]
    cfg = train_config(r, "strong_sft", progress=False)
    assert cfg.lr == 2e-5 and cfg.adam_betas == (0.9, 0.99) and cfg.lora_targets == ("q_proj",)
    assert cfg.progress is False and cfg.epochs == 1  # untouched fields keep TrainConfig's defaults


@pytest.mark.parametrize("extra, message", [
    ("bogus = 1\n", r"r\.toml: unknown key 'bogus'"),
    ("[stage2]\nn_sample = 4\n", r"r\.toml: \[stage2\]: unknown key 'n_sample' \(did you mean 'n_samples'\?\); "
                                 r"expected one of n_samples"),
    ("[stage2]\nbeta = 0.5\n", r"\[stage2\]: unknown key 'beta' \(a key of \[weak_sft\], \[strong_sft\], "
                               r"\[preference\], \[grpo\]\); expected one of n_samples"),
    ("[preference]\nmin_confidence = 0.5\n", r"\[preference\]: unknown key 'min_confidence' \(a key of \[stage2\]\)"),
    ("[stage2]\nn_samples = \"ten\"\n", r"\[stage2\]\.n_samples: expected int, got 'ten'"),
    ("[stage2]\ntemperature = true\n", r"\[stage2\]\.temperature: expected float, got True"),
    ("[stage2]\nmin_confidence = 0.9\n", r"\[stage2\]: expected 0 <= min_confidence <= flip_confidence <= 1, got "
                                        r"min_confidence = 0\.9, flip_confidence = 0\.8$"),
    ("[stage2]\nlosses = [\"kto\"]\n", r"\[stage2\] losses: unknown loss 'kto'"),
    ("[stage2]\nlosses = [\"dpo\", \"orpo\", \"dpo\"]\n",
     r"\[stage2\] losses: lists \['dpo'\] more than once: \['dpo', 'orpo', 'dpo'\]$"),
    ("[stage2]\nexport_merged = [\"orpo\", \"orpo\"]\n", r"\[stage2\] export_merged: lists \['orpo'\] more than once"),
    ("[eval]\nbaselines = [\"ceiling\", \"ceiling\"]\n", r"\[eval\] baselines: lists \['ceiling'\] more than once"),
    ("[stage1]\nrounds = 3\n", r"\[stage1\] rounds: expected 1 or 2, got 3"),
    ("[stage1]\nround2_init = \"warm\"\n", r"\[stage1\] round2_init: expected 'base' or 'continue'"),
    ("[eval]\nbaselines = [\"oracle\"]\n", r"\[eval\] baselines: unknown baseline 'oracle'"),
    ("[sampling]\nmax_new_tokens = 0\n", r"\[sampling\] max_new_tokens: expected >= 1, got 0"),
    ("[sampling]\nprefill_chunk = -8\n", r"\[sampling\] prefill_chunk: expected >= 0 \(0: off\), got -8"),
    ("[models2]\n", r"unknown key 'models2'"),
    ("[weak_sft]\nlearning_rate = 1e-5\n", r"\[weak_sft\]: unknown key 'learning_rate'; expected one of activation_"),
    ("[weak_sft]\nprogress = false\n", r"\[weak_sft\]: unknown key 'progress'"),
    ("[weak_sft]\nlr = \"fast\"\n", r"\[weak_sft\]\.lr: expected float, got 'fast'"),
    ("[weak_sft]\nepochs = 1.5\n", r"\[weak_sft\]\.epochs: expected int, got 1\.5"),
    ("[weak_sft]\nlora_rank = -8\n", r"\[weak_sft\]\.lora_rank: expected a value >= 0"),
    ("[weak_sft]\nbatch_size = 0\n", r"\[weak_sft\]: TrainConfig\.batch_size=0: expected a number > 0"),
    ("[preference]\nadam_betas = 0.9\n", r"\[preference\]\.adam_betas: expected tuple, got 0\.9"),
    ("[data2]\ngrader = \"exact\"\n", r"unknown key 'data2'"),
    ("[stage2]\nlosses = [\"grpo\"]\n[strong_sft]\nlora_rank = 4\n[grpo]\nlora_rank = 8\n",
     r"\[grpo\] lora_rank: 8 differs from \[strong_sft\] lora_rank = 4; Stage II continues M_plus's LoRA adapter"),
    # non-finite and impossible sampling and training values: refused at load, not stages into the run
    ("[stage2]\ntemperature = nan\n", r"\[stage2\]: temperature=nan: expected a finite number >= 0"),
    ("[stage2]\ntop_p = 0.0\n", r"\[stage2\]: top_p=0\.0: expected 0 < top_p <= 1"),
    ("[eval]\npass_k_temperature = -1.0\n", r"\[eval\] pass_k_temperature: temperature=-1\.0: expected a finite"),
    ("[sampling]\ncache_len = 5\n", r"\[sampling\] cache_len: 5 cannot hold a prompt and 1024 new tokens"),
    ("[preference]\nbeta = 0.0\n", r"\[preference\] beta: beta=0\.0: DPO needs a finite beta > 0"),
    ("[weak_sft]\nlr = inf\n", r"\[weak_sft\]: TrainConfig\.lr=inf: expected a finite number"),
    ("[strong_sft]\nweight_decay = nan\n", r"\[strong_sft\]: TrainConfig\.weight_decay=nan: expected a finite"),
    ('name = "../escape"\n', r"r\.toml: name: expected the run's directory name .* got '\.\./escape'"),
    ("name = 5\n", r"r\.toml: name: expected the run's directory name .* got 5"),
    # a section given as a value, not a table
    ("stage2 = 5\n", r"r\.toml: \[stage2\]: expected a table of options, got 5$"),
    ("weak_sft = 5\n", r"r\.toml: \[weak_sft\]: expected a table of TrainConfig options, got 5$"),
    # a name that is no directory of its own under the runs directory (the parent, or a Windows-style path)
    ('name = ".."\n', r"r\.toml: name: expected the run's directory name .* got '\.\.'$"),
    ('name = "a\\\\b"\n', r"r\.toml: name: expected the run's directory name .* got 'a\\\\b'$"),
    # every bound the module docstring and the options' comments state, each named by its key
    ("[stage1]\nrounds = 0\n", r"\[stage1\] rounds: expected 1 or 2, got 0"),
    ("[stage1]\nn_demos = 0\n", r"\[stage1\] n_demos: expected >= 1, got 0"),
    ("[stage2]\nmin_confidence = -0.1\n", r"\[stage2\]: expected 0 <= min_confidence <= flip_confidence <= 1"),
    ("[stage2]\nflip_confidence = 1.5\n", r"\[stage2\]: expected 0 <= min_confidence <= flip_confidence <= 1"),
    ("[stage2]\nn_samples = 0\n", r"\[stage2\]: n_samples and max_pairs must be >= 1"),
    ("[stage2]\nmax_pairs = 0\n", r"\[stage2\]: n_samples and max_pairs must be >= 1"),
    ("[stage2]\nexport_merged = [\"ipo\"]\n", r"\[stage2\] export_merged: 'ipo' is not one of the run's losses"),
    ("[sampling]\ntp = 0\n", r"\[sampling\] tp: expected >= 1, got 0"),
    ("[sampling]\nweak_tp = 0\n", r"\[sampling\] weak_tp: expected >= 1, got 0"),
    ("[eval]\npass_k_samples = -1\n", r"\[eval\] pass_k_samples: expected >= 0"),
    ('device = "gpu"\n', r"\[models\] device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),  # into [models]
    ('dtype = "fp16"\n', r"\[models\] dtype: expected bfloat16, float16 or float32, got 'fp16'"),
    # torch.device refuses these (Invalid device string): refused here, not when the first stage moves its model
    ('device = "cuda:"\n', r"\[models\] device: expected auto, cpu, cuda or cuda:N, got 'cuda:'"),
    ('device = "cuda:01"\n', r"\[models\] device: expected auto, cpu, cuda or cuda:N, got 'cuda:01'"),
    ('device = "cuda:x"\n', r"\[models\] device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    # a cache exactly as long as the new tokens leaves no room for the prompt; a negative one holds nothing
    ("[sampling]\ncache_len = 1024\n", r"\[sampling\] cache_len: 1024 cannot hold a prompt and 1024 new tokens"),
    ("[sampling]\ncache_len = -1\n", r"\[sampling\] cache_len: -1 cannot hold a prompt"),
    # beta is checked for every loss, not the first: ORPO's lambda may be 0, IPO's beta may not (losses.check_beta)
    ("[stage2]\nlosses = [\"orpo\", \"ipo\"]\n[preference]\nbeta = 0.0\n",
     r"\[preference\] beta: beta=0\.0: IPO needs"),
    # Stage II continues M_plus's adapter: alpha scales it, so it must match too, not only the rank
    ("[strong_sft]\nlora_rank = 4\nlora_alpha = 8.0\n[preference]\nlora_rank = 4\nlora_alpha = 16.0\n",
     r"\[preference\] lora_alpha: 16\.0 differs from \[strong_sft\] lora_alpha = 8\.0"),
])  # fmt: skip
def test_bad_recipes_are_one_clear_error(tmp_path, extra, message):
    text = BASE + extra if not extra.startswith(("bogus", "[models2]", "name", "stage2 =", "weak_sft =")) else \
        extra + BASE
    with pytest.raises(ValueError, match=message) as info:
        _load(tmp_path, text)
    assert "\n" not in str(info.value) and "r.toml" in str(info.value)


def test_split_sizes_past_the_train_file_are_refused_before_the_run(tmp_path):
    from w2s.recipe import validate_inputs

    _world(tmp_path)
    rows = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(4)]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    from w2s.estimate import workload

    recipe = _load(tmp_path, BASE.replace("[data]", "[data]\nn_train_1 = 3\nn_train_2 = 3"))
    for check in (validate_inputs, workload):  # before any stage runs, naming the recipe and the file; the dry run too
        with pytest.raises(ValueError, match=r"r\.toml: \[data\] n_train_1 \+ n_train_2 = 3 \+ 3 but .*train\.jsonl "
                                             r"has 4 records$"):
            check(recipe)

    recipe = _load(tmp_path, BASE.replace("[data]", "[data]\nn_test = 5"))  # refused, not taken as 4
    for check in (validate_inputs, workload):  # the run's check and the dry run's
        with pytest.raises(ValueError, match=r"r\.toml: \[data\] n_test = 5 but .*test\.jsonl has 4 records$"):
            check(recipe)
    (tmp_path / "test.jsonl").write_text("")
    recipe = _load(tmp_path, BASE)
    for check in (validate_inputs, workload):  # the dry run said "max() arg is an empty sequence"
        with pytest.raises(ValueError, match=r"r\.toml: \[data\] test: .*test\.jsonl holds no records$"):
            check(recipe)


def test_inputs_that_fit_exactly_pass_and_then_both_checkpoints_and_the_split_file_are_read(tmp_path):
    """validate_inputs reads what the run will read, in order: n_test equal to the test file's records fits (only
    more than the file is refused), a split file naming ids the train file lacks is refused before the run, and the
    weak checkpoint is checked as well as the strong one (here both are a bare config.json: weak is named first)."""
    from w2s.recipe import validate_inputs

    _world(tmp_path)
    rows = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(4)]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    recipe = _load(tmp_path, BASE.replace("[data]", "[data]\nn_test = 4\nn_train_1 = 2\nn_train_2 = 2"))
    with pytest.raises(ValueError, match=r"r\.toml: \[models\] weak: ") as info:  # the data passed
        validate_inputs(recipe)
    assert "\n" not in str(info.value)
    (tmp_path / "split.json").write_text(json.dumps({"train_1": ["nope"], "train_2": []}))
    recipe = _load(tmp_path, BASE.replace("[data]", '[data]\nsplit_file = "split.json"'))  # relative to the recipe
    assert recipe.data.split_file == str((tmp_path / "split.json").resolve())
    with pytest.raises(ValueError, match=r"split\.json: 1 unknown ids in 'train_1'"):
        validate_inputs(recipe)


def test_an_integer_is_taken_where_a_number_with_a_point_is_expected(tmp_path):
    """TOML tells 1 from 1.0; a recipe that writes `temperature = 1` means the float (not a bool, though)."""
    r = _load(tmp_path, BASE + "[stage2]\ntemperature = 1\nmin_confidence = 0\n[eval]\npass_k_temperature = 1\n")
    assert (r.stage2.temperature, r.stage2.min_confidence, r.eval.pass_k_temperature) == (1, 0, 1)


def test_split_sizes_default_to_the_data_stage_halves():
    """Without n_train_1 / n_train_2 the sizes are the data stage's (split_train): train_2 gets the odd record."""
    from w2s.recipe import DataOptions, split_sizes
    from w2s.tasks.data import split_train

    for n in (4, 5):
        first, second = split_train(list(range(n)))
        assert split_sizes(DataOptions(), n) == (len(first), len(second)) == (n // 2, n - n // 2)
    assert split_sizes(DataOptions(n_train_1=1), 5) == (1, 3)


def test_a_device_this_machine_lacks_is_refused_before_a_stage_runs(tmp_path, monkeypatch):
    import torch

    from w2s.recipe import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = _load(tmp_path, BASE + 'device = "cuda"\n')  # [models] is BASE's last section
    with pytest.raises(ValueError, match=r"r\.toml: \[models\] device = 'cuda', but CUDA is not available here "
                                         r"\(use \"cpu\" or \"auto\"\)$"):
        check_device(recipe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device(_load(tmp_path, BASE + 'device = "cuda:1"\n'))
    with pytest.raises(ValueError, match=r"device = 'cuda:2', but this machine has 2 CUDA device\(s\)$"):
        check_device(_load(tmp_path, BASE + 'device = "cuda:2"\n'))
    check_device(_load(tmp_path, BASE + 'device = "cpu"\n'))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device(_load(tmp_path, BASE + 'device = "cuda"\n'))  # plain "cuda" is device 0: one GPU is enough


def test_grader_option(tmp_path, monkeypatch):
    import w2s.recipe as recipe

    assert _load(tmp_path, BASE).data.grader == "paper"  # the default: the authors' protocol
    assert _load(tmp_path, BASE.replace("[data]", "[data]\ngrader = \"equivalence\"")).data.grader == "equivalence"
    with pytest.raises(ValueError, match=r"r\.toml: \[data\] grader: expected one of paper, equivalence, math-verify, "
                                         r"got 'exact'") as info:
        _load(tmp_path, BASE.replace("[data]", "[data]\ngrader = \"exact\""))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(recipe, "is_available", lambda name: name != "math-verify")  # as without the package
    with pytest.raises(ValueError, match=r"\[data\] grader: 'math-verify' needs the math-verify package: pip install"):
        _load(tmp_path, BASE.replace("[data]", "[data]\ngrader = \"math-verify\""))


def test_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.toml: recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match=r"r\.toml: not valid TOML"):
        _load(tmp_path, "[data\n")
    missing_train = r"\[data\] train: file not found: .*missing\.jsonl \(`w2s data gsm8k` downloads"
    with pytest.raises(ValueError, match=missing_train):
        _load(tmp_path, BASE.replace('train = "train.jsonl"', 'train = "missing.jsonl"'))
    with pytest.raises(ValueError, match=r"\[models\] weak: no checkpoint \(config\.json\) at .*nowhere"):
        _load(tmp_path, BASE.replace('weak = "weak"', 'weak = "nowhere"'))
    with pytest.raises(ValueError, match=r"\[data\] train: missing: the path of a jsonl file \(`w2s data gsm8k`"):
        _load(tmp_path, BASE.replace('train = "train.jsonl"\n', ""))
    with pytest.raises(ValueError, match=r"\[models\] strong: missing: a checkpoint directory \(the model's"):
        _load(tmp_path, BASE.replace('strong = "strong"\n', ""))
    with pytest.raises(ValueError, match=r"\[data\] task: expected one of gsm8k, math, got 'olympiad'"):
        _load(tmp_path, BASE.replace("[data]", "[data]\ntask = \"olympiad\""))
    with pytest.raises(ValueError, match=r"\[data\] test: file not found: .*missing\.jsonl"):
        _load(tmp_path, BASE.replace('test = "test.jsonl"', 'test = "missing.jsonl"'))
    with pytest.raises(ValueError, match=r"\[data\] split_file: file not found: .*nosplit\.json"):
        _load(tmp_path, BASE.replace("[data]", '[data]\nsplit_file = "nosplit.json"'))
    with pytest.raises(ValueError, match=r"\[data\]: n_train_1, n_train_2 and n_test must be >= 0"):
        _load(tmp_path, BASE.replace("[data]", "[data]\nn_train_2 = -1"))


# ---------------------------------------------------------------------------------------------------- the plan


def _stages(tmp_path, extra="", data=""):
    from w2s.pipeline import build_stages

    return {s.name: s for s in build_stages(_load(tmp_path, BASE.replace("[data]\n", f"[data]\n{data}") + extra))}


def test_paper_plan_gsm8k(tmp_path):
    stages = _stages(tmp_path, "[eval]\npass_k_samples = 10\n")
    names = list(stages)
    assert names[:21] == ["00_data", "00_test", "01_weak_sft", "02_weak_labels", "03_icl_labels", "04_r1_filter",
                          "05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid", "08_r2_labels_weak",
                          "09_r2_labels_icl", "10_r2_filter", "11_r2_sft_weak", "12_r2_sft_icl", "13_r2_sft_hybrid",
                          "14_samples", "15_pairs", "16_dpo", "17_orpo", "18_full_weak_ft", "19_ceiling"]
    assert len([n for n in names if "_eval_" in n]) == 12 and len([n for n in names if "_passk_" in n]) == 3
    # Who reads what (docs/PAPER.md): ICL labels need the weak labels (demos); round 2 relabels with the round-1 weak-ft
    # and icl-ft models; pairs compare the weak labels with M_plus's samples; Stage II starts from M_plus.
    assert stages["03_icl_labels"].reads == ["00_data", "02_weak_labels"]
    assert stages["08_r2_labels_weak"].reads == ["00_data", "05_r1_sft_weak"]
    assert stages["09_r2_labels_icl"].reads == ["00_data", "06_r1_sft_icl"]
    assert stages["10_r2_filter"].reads == ["00_data", "08_r2_labels_weak", "09_r2_labels_icl"]
    assert stages["11_r2_sft_weak"].reads == ["10_r2_filter"]  # round2_init = "base": no round-1 model
    assert stages["14_samples"].reads == ["00_data", "13_r2_sft_hybrid"]
    assert stages["15_pairs"].reads == ["00_data", "02_weak_labels", "14_samples"]
    assert stages["16_dpo"].reads == ["15_pairs", "13_r2_sft_hybrid"]
    assert stages["18_full_weak_ft"].reads == ["02_weak_labels"]
    assert stages["31_eval_strong_icl"].reads == ["00_test", "02_weak_labels"]
    assert stages["20_eval_weak_floor"].reads == ["00_test", "01_weak_sft"]  # the test set: an input of evals only
    assert stages["14_samples"].options["n"] == 10 and stages["14_samples"].options["temperature"] == 1.0


def test_plan_variants(tmp_path):
    one_round = _stages(tmp_path, "[stage1]\nrounds = 1\n[stage2]\nlosses = [\"orpo\"]\n[eval]\nbaselines = []\n")
    assert "08_r2_labels_weak" not in one_round and "18_full_weak_ft" not in one_round
    assert one_round["14_samples"].reads == ["00_data", "07_r1_sft_hybrid"]  # M_plus is the round-1 hybrid model
    assert "16_dpo" not in one_round and one_round["17_orpo"].reads == ["15_pairs", "07_r1_sft_hybrid"]
    # Evaluation numbers never shift when stages are turned off, so run directories stay comparable.
    assert "24_eval_stage1_r1_hybrid" in one_round and "29_eval_stage2_orpo" in one_round
    assert not [n for n in one_round if "ceiling" in n or "strong_icl" in n or "passk" in n]
    cont = _stages(tmp_path, "[stage1]\nround2_init = \"continue\"\n")
    assert cont["11_r2_sft_weak"].reads == ["10_r2_filter", "05_r1_sft_weak"]
    assert cont["13_r2_sft_hybrid"].reads == ["10_r2_filter", "07_r1_sft_hybrid"]
    # each round-2 model continues round 1's model of its own set (docs/PAPER.md Stage I step 4)
    assert cont["12_r2_sft_icl"].reads == ["10_r2_filter", "06_r1_sft_icl"]
    assert [cont[f"{n}_r2_sft_{s}"].args["init"] for n, s in ((11, "weak"), (12, "icl"), (13, "hybrid"))] == \
        ["05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid"]


def test_each_filter_compares_the_weak_side_with_the_other_side(tmp_path):
    """docs/PAPER.md Stage I: the weak set is built of the weak responses (round 1: D_weak; round 2: M_weak-ft's
    labels) and the icl set of the ICL side's (D_icl; M_icl-ft's labels): the filters' weak and other arguments."""
    stages = _stages(tmp_path)
    assert (stages["04_r1_filter"].args["weak"], stages["04_r1_filter"].args["other"]) == \
        ("02_weak_labels", "03_icl_labels")
    assert (stages["10_r2_filter"].args["weak"], stages["10_r2_filter"].args["other"]) == \
        ("08_r2_labels_weak", "09_r2_labels_icl")


def test_options_enter_the_keys(tmp_path):
    """A stage's key changes with its own options and with its inputs' keys, and with nothing else."""
    from w2s.engine import stage_key

    def keys(extra="", data=""):
        out = {}
        for stage in _stages(tmp_path, extra, data).values():
            out[stage.name] = stage_key(stage, out)
        return out

    base, changed = keys(), keys("[preference]\nbeta = 0.2\n")
    differ = {n for n in base if base[n] != changed[n]}
    assert differ == {"16_dpo", "17_orpo", "28_eval_stage2_dpo", "29_eval_stage2_orpo"}
    # The grader: only what compares answers reruns (the filters, the pairs) and what is downstream of them; never
    # the weak labels, the ICL labels (the demos contain the marker, whatever the grader) nor the evaluations of
    # models trained without a filter (an evaluation scores every grader; the report picks the recipe's).
    changed = keys(data='grader = "equivalence"\n')
    differ = {n for n in base if base[n] != changed[n]}
    assert {"04_r1_filter", "10_r2_filter", "15_pairs"} <= differ
    assert not differ & {"00_data", "01_weak_sft", "02_weak_labels", "03_icl_labels", "18_full_weak_ft",
                         "19_ceiling", "20_eval_weak_floor", "21_eval_full_weak_ft", "30_eval_ceiling",
                         "31_eval_strong_icl"}
    assert all(n in differ for n in base if n >= "04" and n < "18")  # everything fed by the round-1 filter
    (tmp_path / "train.jsonl").write_text("{\"changed\": 1}\n")  # new train data: everything but the test set
    assert {n for n, key in keys().items() if key != base[n]} == set(base) - {"00_test"}
    json.dumps(base)  # keys are plain strings, written into meta.json


def _changed(tmp_path, extra, edit=None):
    """The stages whose key differs between BASE and BASE with `extra` (new sections, or "[data]"/"[models]" lines
    merged into BASE's own), or after edit(tmp_path) changes a file."""
    from w2s.engine import stage_key
    from w2s.pipeline import build_stages

    def keys(text):
        out = {}
        for stage in build_stages(_load(tmp_path, text)):
            out[stage.name] = stage_key(stage, out)
        return out

    before = keys(BASE)
    if edit is not None:
        edit(tmp_path)
    for section in ("[data]", "[models]"):
        if extra.startswith(section):
            return {n for n, key in keys(BASE.replace(section, extra.rstrip("\n"))).items() if key != before[n]}
    return {name for name, key in keys(BASE + extra).items() if key != before[name]}


EVALS = {f"{n}_eval_{m}" for n, m in [(20, "weak_floor"), (21, "full_weak_ft"), (22, "stage1_r1_weak"),
                                       (23, "stage1_r1_icl"), (24, "stage1_r1_hybrid"), (25, "stage1_r2_weak"),
                                       (26, "stage1_r2_icl"), (27, "stage1_r2_hybrid"), (28, "stage2_dpo"),
                                       (29, "stage2_orpo"), (30, "ceiling"), (31, "strong_icl")]}
ROUND_1 = {"04_r1_filter", "05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid"}
ROUND_2 = {"08_r2_labels_weak", "09_r2_labels_icl", "10_r2_filter", "11_r2_sft_weak", "12_r2_sft_icl",
           "13_r2_sft_hybrid"}
STAGE_2 = {"14_samples", "15_pairs", "16_dpo", "17_orpo"}


@pytest.mark.parametrize("option", ["activation_checkpointing = true", "cpu_offload = true", "ckpt_every = 5",
                                    "resume = false", 'bad_rows = "error"', "log_every = 7", "export_merged = true"])
def test_runtime_only_options_rerun_nothing(tmp_path, option):
    """Turning on activation checkpointing after an out-of-memory error (or any option that changes how a run goes,
    not what it gives) costs nothing: no key changes."""
    assert _changed(tmp_path, f"[weak_sft]\n{option}\n[strong_sft]\n{option}\n[preference]\n{option}\n") == set()


def test_option_by_option_which_stages_rerun(tmp_path):
    everything_but_data = {"01_weak_sft", "02_weak_labels", "03_icl_labels", "18_full_weak_ft", "19_ceiling"} | \
        ROUND_1 | ROUND_2 | STAGE_2 | EVALS
    assert _changed(tmp_path, "[models]\ndtype = \"float32\"\n") == everything_but_data
    assert _changed(tmp_path, "[weak_sft]\nlr = 1e-3\n") == everything_but_data - {"19_ceiling", "30_eval_ceiling"}
    assert _changed(tmp_path, "[strong_sft]\nlr = 1e-3\n") == (
        ROUND_1 - {"04_r1_filter"}) | ROUND_2 | STAGE_2 | {"18_full_weak_ft", "19_ceiling"} | EVALS - {
        "20_eval_weak_floor", "31_eval_strong_icl"}
    # The demonstrations change the strong model's labels and everything after them, and strong ICL; not the
    # weak model, its labels, or the baselines trained on them.
    assert _changed(tmp_path, "[stage1]\ndemo_seed = 1\n") == {"03_icl_labels"} | ROUND_1 | ROUND_2 | STAGE_2 | (
        EVALS - {"20_eval_weak_floor", "21_eval_full_weak_ft", "30_eval_ceiling"})
    assert _changed(tmp_path, "[stage2]\nmin_confidence = 0.7\n") == {"15_pairs", "16_dpo", "17_orpo",
                                                                       "28_eval_stage2_dpo", "29_eval_stage2_orpo"}
    assert _changed(tmp_path, "[preference]\nbeta = 0.2\n") == {"16_dpo", "17_orpo", "28_eval_stage2_dpo",
                                                                  "29_eval_stage2_orpo"}
    # The test set is an input of the evaluations only: a new test file or size retrains nothing.
    assert _changed(tmp_path, "[data]\nn_test = 3\n") == {"00_test"} | EVALS
    assert _changed(tmp_path, "", edit=lambda p: (p / "test.jsonl").write_text('{"new": 1}\n')) == {"00_test"} | EVALS


def test_what_reruns_follows_the_data_flow_of_the_paper(tmp_path):
    """Each option reruns the stage it acts on and everything that reads it, derived here from the stage table of
    docs/PAPER.md (not from the keys): the split changes every stage but the test set; a checkpoint changes what
    starts from it; a generation length changes the generations that use it; Stage II's options change Stage II."""
    everything_but_test = {"00_data", "01_weak_sft", "02_weak_labels", "03_icl_labels", "18_full_weak_ft",
                           "19_ceiling"} | ROUND_1 | ROUND_2 | STAGE_2 | EVALS
    for split in ("[data]\nseed = 1\n", "[data]\nn_train_1 = 1\n", "[data]\nn_train_2 = 1\n"):
        assert _changed(tmp_path, split) == everything_but_test, split
    (tmp_path / "split.json").write_text("{}")
    assert _changed(tmp_path, '[data]\nsplit_file = "split.json"\n') == everything_but_test
    # The strong base: the ICL labels and strong ICL (few-shot), every strong SFT and all after them; not the weak
    # model nor its labels. The weak base: the weak model and everything after it; not the ceiling (gold train_2).
    rewrite = lambda name: lambda p: (p / name / "config.json").write_text('{"rewritten": true}')  # noqa: E731
    weak_side = {"01_weak_sft", "02_weak_labels", "20_eval_weak_floor"}
    assert _changed(tmp_path, "", edit=rewrite("strong")) == everything_but_test - {"00_data"} - weak_side
    assert _changed(tmp_path, "", edit=rewrite("weak")) == everything_but_test - {"00_data", "19_ceiling",
                                                                                  "30_eval_ceiling"}
    # Greedy generations (labels, evaluations) and the Stage II samples have lengths of their own; the cache length
    # is every generation's.
    greedy = everything_but_test - {"00_data", "01_weak_sft", "19_ceiling"}  # every generation and what follows
    assert _changed(tmp_path, "[sampling]\nmax_new_tokens = 300\n") == greedy
    assert _changed(tmp_path, "[sampling]\ncache_len = 4096\n") == greedy
    stage2 = STAGE_2 | {"28_eval_stage2_dpo", "29_eval_stage2_orpo"}
    assert _changed(tmp_path, "[sampling]\nsample_max_new_tokens = 512\n") == stage2
    assert _changed(tmp_path, "[stage1]\nn_demos = 3\n") == {"03_icl_labels"} | ROUND_1 | ROUND_2 | STAGE_2 | (
        EVALS - {"20_eval_weak_floor", "21_eval_full_weak_ft", "30_eval_ceiling"})
    for option in ("top_p = 0.9", "temperature = 0.7", "n_samples = 5"):  # M_plus's samples
        assert _changed(tmp_path, f"[stage2]\n{option}\n") == stage2, option
    for option in ("max_pairs = 2", "flip_confidence = 0.9", "pair_seed = 1"):  # the pairs
        assert _changed(tmp_path, f"[stage2]\n{option}\n") == stage2 - {"14_samples"}, option


def test_pass_at_k_options_rerun_only_pass_at_k_and_it_samples_m_plus_and_m_pro(tmp_path):
    """[eval] pass_k_samples and pass_k_temperature change the pass@k rows only; they sample M_plus (the model
    Stage II starts from: [stage2] start_from) and each M_pro at pass_k_temperature (docs/PAPER.md: T = 1.0)."""
    from w2s.engine import table_keys
    from w2s.pipeline import build_stages

    def keys(options):
        return table_keys(build_stages(_load(tmp_path, BASE + "[eval]\n" + options)))

    base = keys("pass_k_samples = 10\n")
    passk = {"32_passk_stage1_plus", "33_passk_stage2_dpo", "34_passk_stage2_orpo"}
    for options in ("pass_k_samples = 10\npass_k_temperature = 0.5\n", "pass_k_samples = 5\n"):
        changed = keys(options)
        assert {n for n in base if changed[n] != base[n]} == passk, options
    stages = _stages(tmp_path, "[eval]\npass_k_samples = 10\npass_k_temperature = 0.5\n")
    assert [stages[n].args["temperature"] for n in sorted(passk)] == [0.5, 0.5, 0.5]
    assert stages["32_passk_stage1_plus"].args["model"] == "13_r2_sft_hybrid"
    icl = _stages(tmp_path, "[stage2]\nstart_from = \"icl\"\n[eval]\npass_k_samples = 10\n")
    assert icl["32_passk_stage1_plus"].reads == ["00_test", "12_r2_sft_icl"]
    assert icl["33_passk_stage2_dpo"].reads == ["00_test", "16_dpo"]


def test_the_evaluations_come_in_the_order_of_their_fixed_numbers(tmp_path):
    """build_stages: Stage 0 to II and the baselines in run order, then the evaluations by their numbers: with IPO
    on, its evaluation (35) and pass@k (36) come after the paper's 20-34, not next to DPO's and ORPO's."""
    names = list(_stages(tmp_path, "[stage2]\nlosses = [\"dpo\", \"orpo\", \"ipo\"]\n[eval]\npass_k_samples = 10\n"))
    numbers = [int(n.split("_")[0]) for n in names[names.index("20_eval_weak_floor"):]]
    assert numbers == list(range(20, 37))


def test_every_preference_loss_has_its_stage():
    from w2s.losses import PREFERENCE_LOSSES
    from w2s.pipeline import PREFERENCE_STAGES

    assert set(PREFERENCE_STAGES) == set(PREFERENCE_LOSSES)
