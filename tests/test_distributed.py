"""Two processes (torchrun, gloo): every rank takes the same trust-region step."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    # A fixed port fails now and then when an earlier run's socket still holds it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]


def launcher(name: str) -> list[str]:
    """Two CPU processes (gloo) through torchrun, or through `accelerate launch` with the shipped
    multi-GPU config (on a machine without a GPU its processes fall back to CPU and gloo)."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    config = ROOT / "recipes" / "accelerate_configs" / "multi_gpu.yaml"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return accelerate + ["--config_file", str(config), "--num_processes", "2", "--main_process_ip", "127.0.0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchrun", "accelerate multi_gpu.yaml"])
def test_two_processes_stay_in_sync(name, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    port = ["--master_port" if name == "torchrun" else "--main_process_port", str(free_port())]
    result = subprocess.run(
        launcher(name) + port + [str(WORKER), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads((tmp_path / "ranks.json").read_text())
    assert [r["world"] for r in reports] == [2, 2]
    # different prompts on each rank (the batch is sharded) ...
    assert set(reports[0]["prompts"]).isdisjoint(reports[1]["prompts"])
    # ... but identical parameters after the all-reduced TRPO and critic updates
    assert reports[0]["policy"] == reports[1]["policy"]
    assert reports[0]["value"] == reports[1]["value"]
    assert reports[0]["accepted"] == reports[1]["accepted"]
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # written once, by the main process
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_a_sharding_backend_is_refused_at_construction(kind, make_trainer, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    with pytest.raises(ValueError, match=f"distributed_type is {DistributedType[kind].value}: .*multi_gpu.yaml"):
        make_trainer()
