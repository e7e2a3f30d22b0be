"""Evaluation harness (imported as ``zoo.eval``; CLI ``zoo eval``).

* `mad`: the six MAD synthetic tasks and the train-and-score protocol (MAD score per architecture).
* `retrieval`: multi-query associative recall (Zoology's MQAR) and needle-in-a-haystack.
* `commonsense`: multiple-choice log-likelihood scoring (`acc`, `acc_norm` as lm-eval defines
  them) over local jsonl files of PIQA, HellaSwag, WinoGrande, ARC, OpenBookQA, BoolQ, SIQA.
* `perplexity`: sliding-window perplexity of a text file.
* `lm_eval_adapter`: lm-eval's harness on any zoo model (`hybrid-zoo[eval]`):
  `python -m zoo.eval.lm_eval_adapter --model zoo --model_args pretrained=PATH --tasks ...`
  (lm-eval finds model classes only in imported modules, so plain `lm_eval --model zoo` cannot).
* `mad_study`: a MAD study folder (`study.yaml` in, `runs.jsonl` and a report out).
* `runner`: what `zoo eval` runs; results go out in lm-eval's layout (`zoo.results`).
"""
