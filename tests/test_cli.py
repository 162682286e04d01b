"""--config FILE.yaml: every recipe reads its example file in recipes/configs/, the command line
overrides the file, and a key that is not a flag is an error naming it."""

import sys
from pathlib import Path

import pytest
import yaml
from transformers import HfArgumentParser

from trpo_rlhf import PPOConfig, TRPOConfig
from trpo_rlhf.experiments.cli import apply_config_file
from trpo_rlhf.experiments.recipe import ScriptArguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(ROOT / "recipes"))

import benchmark  # noqa: E402
import compare_trpo_ppo  # noqa: E402


def parse_sentiment(config_class, argv):
    parser = HfArgumentParser((ScriptArguments, config_class))
    return parser.parse_args_into_dataclasses(args=apply_config_file(parser, argv))


def test_the_trpo_recipe_reads_its_yaml_and_the_command_line_wins():
    args, config = parse_sentiment(
        TRPOConfig, ["--config", str(CONFIGS / "trpo_gpt2_sentiment.yaml"), "--max_kl", "0.05"]
    )
    assert isinstance(config, TRPOConfig)
    assert (args.model_name_or_path, args.reward_model) == ("embedded", "vader")
    assert config.max_kl == 0.05  # the flag, over the file's 0.8
    assert (config.max_steps, config.value_lr) == (20, 5e-4)
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.report_to == ["tensorboard"]
    # The same settings by flags alone give the same config.
    _, by_flags = parse_sentiment(
        TRPOConfig,
        [
            "--output_dir",
            "runs/trpo_sentiment",
            "--max_steps",
            "20",
            "--max_kl",
            "0.05",
            "--save_steps",
            "10",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--report_to",
            "tensorboard",
        ],
    )
    assert by_flags == config


@pytest.mark.parametrize(
    ("recipe", "config_class"), [("ppo_gpt2_sentiment", PPOConfig), ("trl_ppo_gpt2_sentiment", PPOConfig)]
)
def test_the_ppo_recipes_read_their_yaml(recipe, config_class):
    _, config = parse_sentiment(config_class, ["--config", str(CONFIGS / f"{recipe}.yaml")])
    assert (config.learning_rate, config.ppo_epochs, config.max_steps) == (1e-3, 4, 20)


def test_the_argparse_recipes_read_their_yaml():
    compare = compare_trpo_ppo.parse_args(["--config", str(CONFIGS / "compare_trpo_ppo.yaml"), "--seeds", "2"])
    assert [v.name for v in compare.variants][-2:] == ["trpo_cg1", "trpo_kl08"] and compare.parallel == 9
    assert compare.held_out_kl_prompts == 16 and compare.reuse_finished
    # The headline runs first, in the same folder with the same settings; the full protocol then
    # reuses its runs and adds the TRPO variants.
    headline = compare_trpo_ppo.parse_args(["--config", str(CONFIGS / "compare_trpo_ppo_headline.yaml")])
    full = compare_trpo_ppo.parse_args(["--config", str(CONFIGS / "compare_trpo_ppo.yaml")])
    full_only = [v for v in full.variants if v.name not in {h.name for h in headline.variants}]
    assert [v.name for v in headline.variants] == [v.name for v in full.variants if v not in full_only]
    assert full_only and all(v.algorithm == "trpo" and v.flags for v in full_only)
    assert {k: v for k, v in vars(headline).items() if k not in ("variant", "variants", "config")} == {
        k: v for k, v in vars(full).items() if k not in ("variant", "variants", "config")
    }
    assert (compare.task, compare.steps, compare.seeds, compare.batch_size) == ("sentiment", 50, 2, 32)
    assert compare.learning_rates == [3e-4, 1e-3, 3e-3]
    assert [v.name for v in compare.variants if v.algorithm == "trl_ppo"] == [
        "trl_ppo_lr3e-4",
        "trl_ppo_lr1e-3",
        "trl_ppo_lr3e-3",
    ]
    bench = benchmark.parse_args(["--config", str(CONFIGS / "benchmark.yaml")])
    assert (bench.model, bench.repeats, bench.ppo_learning_rate, bench.output) == (
        "embedded",
        3,
        1e-3,
        Path("runs/benchmark.jsonl"),
    )
    steps = benchmark.parse_args(["--config", str(CONFIGS / "benchmark_whole_step.yaml")])
    assert steps.whole_step and (steps.steps, steps.rounds) == (3, 2) and steps.algorithms == ["trpo", "ppo", "trl_ppo"]
    scale = benchmark.parse_args(["--config", str(CONFIGS / "benchmark_8b.yaml")])
    assert (scale.model, scale.model_dtype, scale.batch_size, scale.max_new_tokens) == (
        "random:8b",
        "bfloat16",
        16,
        128,
    )


def test_the_group_advantage_configs_read_their_yaml():
    arithmetic = compare_trpo_ppo.parse_args(["--config", str(CONFIGS / "compare_arithmetic.yaml")])
    assert (arithmetic.task, arithmetic.num_generations, arithmetic.advantage_estimator) == ("arithmetic", 8, "grpo")
    assert (arithmetic.cg_damping, arithmetic.cg_iters, arithmetic.fisher_chunks) == (None, None, 1)  # the package's
    names = ["trpo", "trl_grpo_lr1e-4", "trl_grpo_lr3e-4", "trl_grpo_lr1e-3", "trpo_beta0"]
    assert [v.name for v in arithmetic.variants] == names and arithmetic.seeds == 5
    assert arithmetic.frontier_nats == [0.5, 1]
    assert arithmetic.variants[-1].flags == ["--init_kl_coef", "0"]
    steps = benchmark.parse_args(["--config", str(CONFIGS / "benchmark_whole_step_grpo.yaml")])
    assert steps.algorithms == ["trpo", "ppo", "trl_grpo"] and (steps.num_generations, steps.batch_size) == (8, 32)
    _, config = parse_sentiment(TRPOConfig, ["--config", str(CONFIGS / "trpo_smollm2_arithmetic.yaml")])
    assert (config.advantage_estimator, config.num_generations, config.reward_weights) == ("grpo", 8, [1.0, 0.5])
    assert config.max_kl == 0.08 and (config.cg_damping, config.cg_iters) == (
        TRPOConfig.cg_damping,
        TRPOConfig.cg_iters,
    )


def test_no_recipe_sets_the_solver():
    """The trust region needs no tuning per model (issue 43): a recipe chooses delta, steps and
    batch, never the solver, in its code or its YAML."""
    import trpo_smollm2_arithmetic

    solver = {"cg_damping", "cg_iters", "fvp_method", "cg_residual_tol", "fvp_subsample"}
    assert not solver & set(trpo_smollm2_arithmetic.DEFAULTS)
    for name in ("trpo_gpt2_sentiment.yaml", "trpo_smollm2_arithmetic.yaml"):
        assert not solver & set(yaml.safe_load((CONFIGS / name).read_text())), name


def test_a_key_that_is_not_a_flag_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("max_kl: 0.01\nmax_kll: 0.02\n")
    with pytest.raises(SystemExit):
        parse_sentiment(TRPOConfig, ["--config", str(path)])
    assert "['max_kll'] are not flags of this recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_sentiment(TRPOConfig, ["--config", str(tmp_path / "missing.yaml")])
    assert "no such file" in capsys.readouterr().err
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")  # issue 42: a binary --config
    with pytest.raises(SystemExit):
        parse_sentiment(TRPOConfig, ["--config", str(path)])
    assert f"The --config file {path} is not UTF-8 text: byte 0 (line 1) is b'\\x89'" in capsys.readouterr().err
