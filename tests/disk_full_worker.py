"""Run by test_output_dir.py inside a small tmpfs of its own: TRPO on the tiny model fills the disk
while it saves, and the worker prints what the failure said and left, as JSON on stdout (the
tmpfs is gone when the worker exits).

    python disk_full_worker.py MOUNT POINT

POINT: `checkpoint` (the disk fills while checkpoint-1 is written: save_steps=1) or `final`
(while the final model files are written, after the final checkpoint; then the room is made and
the run resumed, as the error says).
"""

import json
import os
import sys
from pathlib import Path

import trpo_rlhf.run_state as run_state
from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.checkpointing import WriteError
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm, build_word_tokenizer

LEFT_FREE = 16 * 1024  # less than any checkpoint or final save of the tiny model needs


def fill(mount: Path) -> Path:
    """A ballast file that leaves `LEFT_FREE` bytes of the tmpfs free."""
    ballast = mount / "ballast"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(ballast, "ab") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size + free - LEFT_FREE)
    return ballast


def main(mount: str, point: str) -> int:
    mount = Path(mount)
    run = mount / "run"
    if point == "checkpoint":
        real_prepare = run_state.prepare_staging

        def prepare_on_a_full_disk(target):
            fill(mount)
            return real_prepare(target)

        run_state.prepare_staging = prepare_on_a_full_disk
    else:
        real_write = TRPOTrainer._write_model_files

        def write_on_a_full_disk(self, folder):
            if folder.name == run_state.FINAL_STAGING:
                fill(mount)
            return real_write(self, folder)

        TRPOTrainer._write_model_files = write_on_a_full_disk

    def trainer():
        tokenizer = build_word_tokenizer()
        config = TRPOConfig(
            output_dir=str(run),
            max_steps=2,
            save_steps=1 if point == "checkpoint" else 0,
            batch_size=8,
            max_new_tokens=6,
            lora_target_modules=["q_proj", "v_proj"],
            value_epochs=1,
            value_minibatch_size=4,
        )
        return TRPOTrainer(config, build_tiny_lm(tokenizer), tokenizer, WordScoreReward(), TOY_PROMPTS)

    report = {}
    try:
        trainer().train()
    except WriteError as error:
        report |= {"error": str(error), "entries": sorted(p.name for p in run.iterdir())}
    if point == "final":
        (mount / "ballast").unlink()
        TRPOTrainer._write_model_files = real_write
        trainer().train(resume_from_checkpoint=True)
        report["after_resume"] = sorted(p.name for p in run.iterdir())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
