"""Packaging for w2s. `make install` (or `pip install -e ".[dev]"`) installs it; see the README."""
from setuptools import setup

setup(
    name="w2s",
    version="0.1.0",
    description="Weak-to-strong reasoning (Yang, Ma, Liu 2024) from scratch in PyTorch",
    packages=["w2s", "w2s.tasks", "w2s.stages", "w2s.kernels"],
    python_requires=">=3.11",
    # torch is left unpinned on purpose: a GPU node keeps the CUDA build it already has
    # (`make install` installs the pinned CPU wheel only when no torch is importable).
    install_requires=[
        "torch>=2.6",
        "triton; platform_system=='Linux'",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "numpy",
        "click",
        "sympy",  # the `equivalence` grader's MATH comparison (w2s's lenient grader, not the paper's protocol)
        "tqdm",  # progress bars on every long stage
        "jinja2>=3.1.6",  # instruct models' chat templates (tokenizer_config.json), rendered as transformers does
    ],
    extras_require={
        # transformers is a test-only dependency: the parity tests compare logits against it (protobuf: its
        # SentencePiece -> tokenizer.json converter, which the tokenizer tests use on the real Mistral-7B model;
        # peft: the reference loader of the LoRA adapters the training stages write, tests/test_adapters.py;
        # tensorboard: the tracking test reads the event files back with tensorboard's own reader;
        # trl: tests/test_grpo.py checks GRPO's loss against TRL's GRPOTrainer (>= 1.16: use_bias_correction_kl);
        # math-verify: tests/test_graders.py runs the optional `math-verify` grader, which it skips without it).
        # transformers >= 5.24: 5.17 to 5.23 (each checked) convert Mistral-7B's tokenizer.model to a tokenizer.json
        # without SentencePiece's prefix space ("Hello" -> "Hello", not "▁Hello"), tests/test_tokenizer.py's reference.
        "dev": ["pytest", "pytest-xdist", "transformers>=5.24", "protobuf", "mistral-common", "peft", "ruff",
                "tensorboard", "trl>=1.16", "math-verify"],
        "plot": ["matplotlib"],
        # Experiment trackers for --report-to / [logging] report_to (w2s/tracking.py imports them only when asked).
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # Hugging Face's answer verifier: the `math-verify` grader (w2s/tasks/graders.py); without it that grader is
        # simply not available and every other one works.
        "math-verify": ["math-verify"],
    },
    entry_points={"console_scripts": ["w2s=w2s.cli:main"]},
)
