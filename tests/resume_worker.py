"""Run by test_checkpoints.py in a subprocess: TRPO on the tiny model, checkpointing every step,
like a recipe (SIGTERM/SIGINT end it with exit code 128 + signal after a checkpoint). Each reward
call sleeps, so the test can interrupt the run in the middle of a step.

    python resume_worker.py OUTPUT_DIR MAX_STEPS SLEEP_SECONDS [RESUME]
"""

import hashlib
import json
import sys
import time

from trpo_rlhf import TrainingInterrupted, TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm, build_word_tokenizer


def main(output_dir: str, max_steps: int, sleep_seconds: float, resume: str | None = None) -> int:
    tokenizer = build_word_tokenizer()
    score = WordScoreReward()

    def slow_reward(prompts, completions):
        time.sleep(sleep_seconds)
        return score(prompts, completions)

    config = TRPOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        batch_size=8,
        max_new_tokens=6,
        seed=0,
        save_steps=1,
        lora_target_modules=["q_proj", "v_proj", "lm_head"],
        value_epochs=1,
        value_minibatch_size=4,
    )
    trainer = TRPOTrainer(
        config=config,
        model=build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        reward_fn=slow_reward,
        train_dataset=TOY_PROMPTS,
    )
    try:
        trainer.train(resume_from_checkpoint=True if resume == "latest" else None)
    except TrainingInterrupted as stop:
        return stop.exit_code
    write_final_digest(trainer, output_dir)
    return 0


def write_final_digest(trainer, output_dir: str) -> None:
    """OUTPUT_DIR/final_digest.json: a hash of every trainable tensor, to compare runs by."""
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.actor_critic.trainable_tensors().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    with open(f"{output_dir}/final_digest.json", "w") as f:
        json.dump({"digest": digest.hexdigest()}, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:]))
