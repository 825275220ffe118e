"""lmlab: train language models end to end on Lightning.

Data, tokenizer, pretraining, SFT, reward modeling, PPO, evaluation and
scaling-law studies share one transformer backbone (``lmlab.models``) and one
command line (``lmlab``).
"""

__version__ = "0.1.0"
