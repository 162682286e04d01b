"""Two processes (torchrun, gloo): every rank takes the same trust-region step."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trpo_rlhf.experiments.toy import build_tiny_lm, build_word_tokenizer

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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchrun", "accelerate multi_gpu.yaml"])
def test_two_processes_stay_in_sync(name, tmp_path):
    reports = run_two_processes(name, tmp_path)
    assert [r["world"] for r in reports] == [2, 2]
    # different prompts on each rank (the batch is sharded) ...
    assert set(reports[0]["prompts"]).isdisjoint(reports[1]["prompts"])
    # ... but identical parameters after the all-reduced TRPO and critic updates
    assert reports[0]["policy"] == reports[1]["policy"]
    assert reports[0]["value"] == reports[1]["value"]
    assert reports[0]["accepted"] == reports[1]["accepted"]
    assert [r["sharded_layers"] for r in reports] == [0, 0]
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # written once, by the main process
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["trpo", "ppo", "trpo_top_critic"])
def test_fsdp_shards_the_frozen_layers_and_takes_the_replicated_runs_steps(algorithm, tmp_path):
    """Under fsdp.yaml each process holds about half of the frozen base (every decoder layer split
    in two), and both policy steps and the critic's land on exactly the tensors of the replicated run:
    TRPO at its defaults, whose second step probes the KL for its length, and with the critic on
    the top layer and the forward-mode quadratic (`trpo_top_critic`), which probes nothing."""
    replicated = run_two_processes("accelerate multi_gpu.yaml", tmp_path / "replicated", algorithm)
    sharded = run_two_processes("accelerate fsdp.yaml", tmp_path / "fsdp", algorithm)
    layers = len(build_tiny_lm(build_word_tokenizer()).model.layers)
    assert [r["sharded_layers"] for r in sharded] == [layers, layers]
    for report in sharded:
        # The layers hold most of the tiny model's frozen weights; their halves are all a rank keeps.
        assert report["frozen_local_numel"] < 0.75 * report["frozen_numel"]
    assert replicated[0]["frozen_local_numel"] == replicated[0]["frozen_numel"]
    for key in ("policy", "value", "accepted", "prompts", "kl_probes"):
        assert [r[key] for r in sharded] == [r[key] for r in replicated], key
    if algorithm == "trpo":
        assert sharded[0]["kl_probes"][0] == 0 and sharded[0]["kl_probes"][1] >= 1
    if algorithm == "trpo_top_critic":
        assert sharded[0]["kl_probes"] == [0, 0]
    assert (tmp_path / "fsdp" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_an_unsupported_backend_is_refused_at_construction(kind, make_trainer, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    with pytest.raises(ValueError, match=f"distributed_type is {DistributedType[kind].value}: .*fsdp.yaml"):
        make_trainer()


@pytest.mark.parametrize(
    "settings",
    [{"cg_iters": 3}, {"cg_stop": "held_out", "cg_iters": 3}, {"fisher_quadratic": "product"}],
    ids=["cg_iters 3", "held-out stop", "product quadratic"],
)
@pytest.mark.parametrize("kind", ["FSDP", "MULTI_CPU"])
def test_fisher_products_are_refused_under_fsdp_before_anything_is_sharded(kind, settings, make_trainer, monkeypatch):
    """accelerate reports FSDP on GPUs and MULTI_CPU (with the launcher's ACCELERATE_USE_FSDP) on CPUs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    with pytest.raises(ValueError, match=r"under FSDP: .*cg_iters 1 .*multi_gpu.yaml"):
        make_trainer(**settings)
