"""The pure data steps between the pipeline's model runs, as plain functions over plain-dict records.

Stages in pipeline order (docs/PAPER.md); the model runs (SFT, sampling, DPO/ORPO) happen in w2s/runners.py, and
these modules decide what goes into and comes out of them:

    0  split train into train_1 / train_2                       w2s.tasks.split_train
    1  weak SFT on train_1 gold; weak labels on train_2         (models) -> D_weak
    2  strong ICL labels, 4 weak demos                          w2s.tasks.select_demos, few_shot_prompt -> D_icl
    3  final-answer consistency; weak / icl / hybrid SFT sets   consistency.consistent, consistency.sft_sets
    4  strong SFT on each set; round 2 relabels and filters     (models), then consistency again -> M_plus
    5  n samples per question from M_plus                       (models: each question's n samples in one row;
                                                                preference_pairs.group_samples groups flat ones)
    6  majority vote and preference pairs (0.6 / 0.8 rules)     metrics.majority_vote, preference_pairs.build_pairs
    7  DPO or ORPO on the pairs                                 (models) -> M_pro
    *  evaluation: accuracy, pass@k, by level, PGR, precision   metrics
    *  LLaMA-Factory json in and out (the paper's released sets) w2s.interchange

Record shapes: labelled {"id", "question", "response", "answer"} ("answer" read by the recipe's grader,
w2s/tasks/graders.py, "" if none; "truncated" when the response stopped at the token limit); SFT row {"id", "prompt",
"response"}; pair {"id", "prompt", "chosen", "rejected", "kind", "confidence", ...}. Comparisons are
`same_answer(a, b)` or, when they depend on the question, `same_for(id)`.

Test: python -m pytest -q tests/test_stages.py tests/test_interchange.py
"""
