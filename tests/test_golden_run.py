"""The golden run: TRPO at its defaults and PPO at lr 1e-3, 3 steps on the toy task, compared with
what the recorded run computed, within a tolerance that other CPUs' rounding stays inside.

`golden_run.json` holds every metric but timings and memory, and the values of every trainable
tensor after the third step. A CPU whose kernels round otherwise (another vector width, another
BLAS code path) computes the same run to within float32 rounding, amplified a little by three
steps; it never equals it bitwise, so the recorded values are compared with `RTOL` and `ATOL`.
docs/testing.md ("The golden run") gives the measured cross-kernel differences they rest on and
the commands that record and compare a run:

    python tests/test_golden_run.py --record tests/golden_run.json
    python tests/test_golden_run.py --diff tests/golden_run.json other.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from trpo_rlhf import PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm, build_word_tokenizer

GOLDEN = Path(__file__).with_name("golden_run.json")
ALGORITHMS = {"trpo": (TRPOConfig, TRPOTrainer, {}), "ppo": (PPOConfig, PPOTrainer, {"learning_rate": 1e-3})}
# |now - recorded| <= ATOL + RTOL * |recorded| for every metric and tensor entry: over 20 times the
# largest difference measured between this CPU's kernels (docs/testing.md, "The golden run").
RTOL = 1e-4
ATOL = 1e-5


def run(algorithm: str, output_dir: Path) -> dict:
    """The metrics of 3 steps and the trainable tensors after them, as plain floats."""
    config_class, trainer_class, settings = ALGORITHMS[algorithm]
    tokenizer = build_word_tokenizer()
    config = config_class(
        output_dir=str(output_dir),
        max_steps=3,
        batch_size=8,
        max_new_tokens=6,
        seed=0,
        lora_target_modules=["q_proj", "v_proj"],
        value_epochs=1,
        value_minibatch_size=4,
        **settings,
    )
    trainer = trainer_class(
        config=config,
        model=build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        reward_fn=WordScoreReward(),
        train_dataset=TOY_PROMPTS,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: a reduction's order follows the thread count
    try:
        rows = [trainer.step() for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    return {
        "metrics": [{k: v for k, v in row.items() if not k.startswith(("time/", "memory/"))} for row in rows],
        "tensors": {
            # 9 significant digits write a float32 exactly
            name: [float(f"{v:.9g}") for v in t.detach().cpu().float().flatten().tolist()]
            for name, t in trainer.actor_critic.trainable_tensors().items()
        },
    }


def differences(recorded: dict, now: dict) -> list[tuple[str, float, float]]:
    """(where, recorded, now) for every value, in the order of the recorded run; a key missing on
    either side is an AssertionError naming it."""
    pairs = []
    assert len(now["metrics"]) == len(recorded["metrics"])
    for step, (was, row) in enumerate(zip(recorded["metrics"], now["metrics"]), start=1):
        assert set(row) == set(was), f"step {step}: metrics {sorted(set(row) ^ set(was))} added or removed"
        pairs += [(f"step {step} {key}", was[key], row[key]) for key in was]
    assert set(now["tensors"]) == set(recorded["tensors"]), sorted(set(now["tensors"]) ^ set(recorded["tensors"]))
    for name, values in recorded["tensors"].items():
        assert len(now["tensors"][name]) == len(values), name
        pairs += [(f"{name}[{i}]", a, b) for i, (a, b) in enumerate(zip(values, now["tensors"][name]))]
    return pairs


def outside_tolerance(pairs: list[tuple[str, float, float]]) -> list[str]:
    return [
        f"{where}: recorded {a!r}, now {b!r}"
        for where, a, b in pairs
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) and not (math.isnan(a) and math.isnan(b))
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="recorded on the CPU: CUDA kernels round otherwise")
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_the_defaults_compute_what_they_computed_when_recorded(algorithm, tmp_path):
    recorded = json.loads(GOLDEN.read_text())[algorithm]
    now = run(algorithm, tmp_path)
    wrong = outside_tolerance(differences(recorded, now))
    assert not wrong, f"{len(wrong)} values outside rtol {RTOL}, atol {ATOL}, e.g.:\n" + "\n".join(wrong[:10])


def test_the_tolerance_catches_a_change_of_one_part_in_a_thousand():
    recorded = json.loads(GOLDEN.read_text())["trpo"]
    moved = json.loads(json.dumps(recorded))
    name = sorted(moved["tensors"])[0]
    moved["tensors"][name][0] = moved["tensors"][name][0] * 1.001 + 1e-5
    assert outside_tolerance(differences(recorded, recorded)) == []
    assert len(outside_tolerance(differences(recorded, moved))) == 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record the golden run, or show how far two records differ.")
    parser.add_argument("--record", metavar="FILE", help="Run both algorithms here and write their record to FILE.")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"), help="The largest differences between two records.")
    args = parser.parse_args(argv)
    if args.record:
        with tempfile.TemporaryDirectory() as folder:
            record = {name: run(name, Path(folder) / name) for name in sorted(ALGORITHMS)}
        Path(args.record).write_text(json.dumps(record, indent=None, separators=(",", ":")) + "\n")
        print(f"wrote {args.record}")
    if args.diff:
        a, b = (json.loads(Path(path).read_text()) for path in args.diff)
        for name in sorted(ALGORITHMS):
            pairs = differences(a[name], b[name])
            absolute = max(pairs, key=lambda p: abs(p[1] - p[2]))
            share = max(pairs, key=lambda p: abs(p[1] - p[2]) / (ATOL + RTOL * abs(p[1])))
            print(
                f"{name}: {len(pairs)} values; largest absolute difference {abs(absolute[1] - absolute[2]):.3g} "
                f"({absolute[0]}); largest share of the tolerance "
                f"{abs(share[1] - share[2]) / (ATOL + RTOL * abs(share[1])):.3g} ({share[0]}); "
                f"outside it: {len(outside_tolerance(pairs))}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
