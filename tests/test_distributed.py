"""Two processes (torchrun, gloo): every rank takes the same trust-region step."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trpo_rlhf.experiments.toy import build_tiny_lm, build_word_tokenizer
from trpo_rlhf.sharding import deepspeed_zero_stage

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    # A fixed port fails now and then when an earlier run's socket still holds it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]


def launcher(name: str) -> list[str]:
    """Two CPU processes (gloo) through torchrun, or through `accelerate launch` with a shipped
    config (on a machine without a GPU its processes fall back to CPU and gloo)."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    config = ROOT / "recipes" / "accelerate_configs" / name.split()[-1]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return accelerate + ["--config_file", str(config), "--num_processes", "2", "--main_process_ip", "127.0.0.1"]


def run_two_processes(name: str, output_dir: Path, algorithm: str = "trpo") -> list[dict]:
    """Two steps of `distributed_worker.py` in two processes; each rank's report."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    port = ["--master_port" if name == "torchrun" else "--main_process_port", str(free_port())]
    result = subprocess.run(
        launcher(name) + port + [str(WORKER), str(output_dir), algorithm],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "ranks.json").read_text())


@pytest.fixture(scope="module")
def replicated_run(tmp_path_factory):
    """`run_two_processes("accelerate multi_gpu.yaml", ..., algorithm)`, each algorithm's run once
    per module: the reference every sharded launch must reproduce."""
    runs: dict[str, list[dict]] = {}

    def run(algorithm: str) -> list[dict]:
        if algorithm not in runs:
            folder = tmp_path_factory.mktemp(f"replicated-{algorithm}")
            runs[algorithm] = run_two_processes("accelerate multi_gpu.yaml", folder, algorithm)
        return runs[algorithm]

    return run


def needs_deepspeed(launch: str) -> None:
    """`accelerate launch` refuses a DeepSpeed config without the package (the `deepspeed` extra)."""
    if "deepspeed" in launch.lower():
        pytest.importorskip("deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchrun", "accelerate multi_gpu.yaml", "accelerate deepspeed_zero2.yaml"])
def test_two_processes_stay_in_sync(name, tmp_path):
    needs_deepspeed(name)
    reports = run_two_processes(name, tmp_path)
    assert [r["world"] for r in reports] == [2, 2]
    # different prompts on each rank (the batch is sharded) ...
    assert set(reports[0]["prompts"]).isdisjoint(reports[1]["prompts"])
    # each rank holds out prompts of its own, outside every rank's batch
    batch = set(reports[0]["prompts"]) | set(reports[1]["prompts"])
    held_out = [set(r["held_out_prompts"]) for r in reports]
    assert [len(h) for h in held_out] == [2, 2] and held_out[0].isdisjoint(held_out[1])
    assert batch.isdisjoint(held_out[0] | held_out[1])
    # ... but identical parameters after the all-reduced TRPO and critic updates
    assert reports[0]["policy"] == reports[1]["policy"]
    assert reports[0]["value"] == reports[1]["value"]
    assert reports[0]["accepted"] == reports[1]["accepted"]
    assert [r["sharded_layers"] for r in reports] == [0, 0]
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # written once, by the main process
    assert all(json.loads(row)["policy/kl_held_out"] > 0 for row in rows)
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, launch",
    [
        ("trpo_cg1", "fsdp.yaml"),
        ("ppo", "fsdp.yaml"),
        ("trpo_cg1", "deepspeed_zero3.yaml"),
        ("ppo", "deepspeed_zero3.yaml"),
    ],
)
def test_a_sharded_launch_shards_the_frozen_layers_and_takes_the_replicated_runs_steps(
    algorithm, launch, tmp_path, replicated_run
):
    """Under fsdp.yaml or deepspeed_zero3.yaml each process holds about half of the frozen base
    (every decoder layer split in two), and both policy steps and the critic's land on exactly the
    tensors of the replicated run: TRPO's one-iteration step (the one a sharded base can run) and
    PPO."""
    needs_deepspeed(launch)
    replicated = replicated_run(algorithm)
    sharded = run_two_processes(f"accelerate {launch}", tmp_path / "sharded", algorithm)
    layers = len(build_tiny_lm(build_word_tokenizer()).model.layers)
    assert [r["sharded_layers"] for r in sharded] == [layers, layers]
    for report in sharded:
        # The layers hold most of the tiny model's frozen weights; their halves are all a rank keeps.
        assert report["frozen_local_numel"] < 0.75 * report["frozen_numel"]
    assert replicated[0]["frozen_local_numel"] == replicated[0]["frozen_numel"]
    for key in ("policy", "value", "accepted", "prompts"):
        assert [r[key] for r in sharded] == [r[key] for r in replicated], key
    assert (tmp_path / "sharded" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_checkpointed_layers_under_fsdp_take_the_plain_replicated_runs_steps(tmp_path, replicated_run):
    """Each sharded layer's weights are gathered again for the recomputation in its backward
    (FSDP2's hooks stay outside the checkpoint): the two steps land on the replicated run's tensors
    without checkpointing."""
    replicated = replicated_run("trpo_cg1")
    sharded = run_two_processes("accelerate fsdp.yaml", tmp_path / "sharded", "trpo_checkpointed")
    layers = len(build_tiny_lm(build_word_tokenizer()).model.layers)
    assert [r["sharded_layers"] for r in sharded] == [layers, layers]
    assert [r["checkpointed_layers"] for r in sharded] == [layers, layers]
    assert [r["checkpointed_layers"] for r in replicated] == [0, 0]
    for key in ("policy", "value", "accepted", "prompts"):
        assert [r[key] for r in sharded] == [r[key] for r in replicated], key


def test_megatron_is_refused_at_construction(make_trainer, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.MEGATRON_LM))
    with pytest.raises(ValueError, match="distributed_type is MEGATRON_LM: .*fsdp.yaml or deepspeed_zero3.yaml"):
        make_trainer()


# How accelerate reports each sharded launch: FSDP and DEEPSPEED on GPUs, MULTI_CPU on CPUs, where
# only the launcher's environment says which it was.
SHARDED_LAUNCHES = {
    "fsdp gpu": ("FSDP", {"ACCELERATE_USE_FSDP": "true"}),
    "fsdp cpu": ("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"}),
    "zero3 gpu": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
    "zero3 cpu": ("MULTI_CPU", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
}


def launched_as(monkeypatch, kind: str, environ: dict[str, str]) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        pytest.importorskip("deepspeed")  # accelerate's Accelerator refuses a DeepSpeed launch without it
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))


@pytest.mark.parametrize(
    "settings",
    [{}, {"cg_iters": 3}],
    ids=["defaults", "cg_iters 3"],
)
@pytest.mark.parametrize("launch", SHARDED_LAUNCHES)
def test_fisher_products_are_refused_with_a_sharded_base_before_anything_is_sharded(
    launch, settings, make_trainer, monkeypatch
):
    launched_as(monkeypatch, *SHARDED_LAUNCHES[launch])
    with pytest.raises(
        ValueError, match=r"sharded \(fsdp.yaml, deepspeed_zero3.yaml\): .*--cg_iters 1 .*multi_gpu.yaml"
    ):
        make_trainer(**settings)


@pytest.mark.parametrize("launch", ["fsdp cpu", "zero3 gpu"])
def test_compiled_generation_is_refused_with_a_sharded_base(launch, make_trainer, monkeypatch):
    launched_as(monkeypatch, *SHARDED_LAUNCHES[launch])
    with pytest.raises(ValueError, match=r"compile_generation=True with the frozen base sharded.*--compile_generation"):
        make_trainer(compile_generation=True)


@pytest.mark.parametrize("stage", ["0", "1", "2"])
def test_zero_stages_below_3_train_replicas(stage, make_trainer, monkeypatch):
    """ZeRO-1/2 partition optimizer states and gradients only (the LoRA tensors'), so the frozen base stays whole."""
    launched_as(
        monkeypatch, "DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage}
    )
    trainer = make_trainer(cg_iters=3)  # products are fine on a whole base
    assert trainer.sharded is False


def test_deepspeed_offload_is_refused_at_construction(make_trainer, monkeypatch):
    launched_as(
        monkeypatch,
        "DEEPSPEED",
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu",
        },
    )
    with pytest.raises(ValueError, match="offload_param_device='cpu' .*does not offload. Set it to none"):
        make_trainer()


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"ACCELERATE_USE_FSDP": "true"}, None),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, 2),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, 3),
        ({"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, None),
    ],
)
def test_deepspeed_zero_stage_from_the_launch_environment(environ, expected):
    assert deepspeed_zero_stage("MULTI_CPU", environ) == expected


def test_deepspeed_zero_stage_from_a_deepspeed_config_file(tmp_path):
    config = tmp_path / "ds.json"
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}))
    assert deepspeed_zero_stage("DEEPSPEED", environ) == 3
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ValueError, match=f"offload_optimizer='cpu' \\(zero_optimization in {config}\\)"):
        deepspeed_zero_stage("DEEPSPEED", environ)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"}, "zero_stage='4' .*set 0, 1, 2 \\(replicas\\) or 3"),
        (
            {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"},
            "zero3_init_flag=true: .*Set zero3_init_flag: false",
        ),
        (
            {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"},
            "offload_optimizer_device='nvme'",
        ),
    ],
)
def test_deepspeed_settings_the_trainer_does_not_carry_out_are_refused(environ, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_zero_stage("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", **environ})
