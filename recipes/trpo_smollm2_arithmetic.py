"""TRPO with group advantages on chat arithmetic: teach a chat model to answer "What is a + b?"
with the number, a reward checked against the dataset's answer column.

    accelerate launch recipes/trpo_smollm2_arithmetic.py
    python recipes/trpo_smollm2_arithmetic.py --max_steps 10 --num_generations 4 --batch_size 16
    python recipes/trpo_smollm2_arithmetic.py --config recipes/configs/trpo_smollm2_arithmetic.yaml

Offline from a fresh clone: the embedded SmolLM2-135M-Instruct (its chat template) on the 100
conversational prompts of data/arithmetic_chat.jsonl, each sampled --num_generations times (8);
the advantages are GRPO's (each completion's reward minus its group's mean, over its group's std:
no critic). Two reward functions in TRL's form read the `answer` column: correct_answer (1 when
the last number written is the answer) and number_only (1 when the reply is a number and nothing
else), weighted 1 and 0.5 (--reward_weights). --dataset takes another JSON-lines file of
{"prompt": [messages], "answer": ...} rows, --model_name_or_path another chat model. Writes
metrics.jsonl (reward/correct_answer and reward/number_only beside reward/mean),
training_curves.png, samples.md and the LoRA adapter into --output_dir.
"""

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.recipe import run_recipe

# The task's settings; the trust-region solver is the package's, as on every task.
DEFAULTS = dict(
    advantage_estimator="grpo",
    num_generations=8,
    batch_size=32,
    max_new_tokens=8,
    max_steps=20,
    max_kl=0.08,  # nats per completion: 0.01 per token over its 8-token replies
    lora_target_modules=["q_proj", "v_proj"],
)


def main(argv: list[str] | None = None) -> None:
    run_recipe(
        TRPOTrainer,
        TRPOConfig,
        default_output_dir="runs/trpo_arithmetic",
        task="arithmetic",
        argv=argv,
        defaults=DEFAULTS,
    )


if __name__ == "__main__":
    main()
