"""Run by test_output_dir.py in a subprocess: TRPO on the tiny model at the default save_steps=0,
killed with SIGKILL at one point of its final save, or resumed to its end.

    python final_save_worker.py OUTPUT_DIR POINT

POINT: `checkpoint` (while the final checkpoint is written), `publish-K` (after K of the final
files have replaced those in OUTPUT_DIR; `publish-last`: all but the last), `resume` (train(resume_from_checkpoint=True), no kill)
or `none` (a run that is never killed). A finished run writes OUTPUT_DIR/final_digest.json.
"""

import os
import signal
import sys

import torch
from resume_worker import write_final_digest

import trpo_rlhf.checkpointing as checkpointing
from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm, build_word_tokenizer


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, output_dir: str) -> None:
    """Replace the functions of the final save with ones that kill this process at `point`."""
    if point == "checkpoint":
        real_save = torch.save

        def save_then_die(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            if str(path).endswith("optimizer.pt"):  # the final checkpoint, half written
                kill_self()

        torch.save = save_then_die
    elif point.startswith("publish-"):
        kill_at = point.split("-")[1]  # a count of files, or "last": before the one that marks a complete set
        real_replace = os.replace
        moved = []

        def replace_then_die(source, destination, *args, **kwargs):
            if ".final.tmp" in str(source):
                if str(len(moved)) == kill_at or (
                    kill_at == "last" and str(destination).endswith("trainer_config.json")
                ):
                    kill_self()
                moved.append(destination)
            real_replace(source, destination, *args, **kwargs)

        checkpointing.os.replace = replace_then_die


def main(output_dir: str, point: str) -> int:
    tokenizer = build_word_tokenizer()
    config = TRPOConfig(
        output_dir=output_dir,
        max_steps=2,
        batch_size=8,
        max_new_tokens=6,
        seed=0,
        lora_target_modules=["q_proj", "v_proj"],
        value_epochs=1,
        value_minibatch_size=4,
    )
    trainer = TRPOTrainer(
        config=config,
        model=build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        reward_fn=WordScoreReward(),
        train_dataset=TOY_PROMPTS,
    )
    arm(point, output_dir)
    trainer.train(resume_from_checkpoint=True if point == "resume" else None)
    write_final_digest(trainer, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
