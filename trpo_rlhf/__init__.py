"""trpo_rlhf: Trust Region Policy Optimization for RLHF on LoRA-adapted language models.

>>> from trpo_rlhf import TRPOConfig, TRPOTrainer
>>> config = TRPOConfig(output_dir="runs/x", max_steps=50, max_kl=0.01)
>>> trainer = TRPOTrainer(config=config, model="embedded", reward_fn="vader",
...                       train_dataset=["This movie"])     # doctest: +SKIP
"""

from .checkpointing import TrainingInterrupted
from .config import RLConfig
from .engine import NonFiniteError, RLTrainer
from .ppo import PPOConfig, PPOTrainer
from .rewards import RewardError, RewardFunctions
from .trpo import TRPOConfig, TRPOTrainer

__all__ = [
    "RLConfig",
    "TRPOConfig",
    "TRPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "RLTrainer",
    "RewardError",
    "RewardFunctions",
    "NonFiniteError",
    "TrainingInterrupted",
]
__version__ = "0.1.0"
