"""report_to: metrics and completions reach experiment trackers through accelerate's tracker API."""

import json

import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from trpo_rlhf import TRPOConfig
from trpo_rlhf.tracking import RunTrackers, completions_markdown, tracker_names


def scalar_series(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)], events


def test_tensorboard_event_files_hold_the_reward_curve_and_the_completions(make_trainer, tmp_path):
    trainer = make_trainer(report_to="tensorboard", run_name="tb-run", log_completions_steps=2, max_steps=3)
    history = trainer.train()
    run_dir = tmp_path / "run" / "tb-run"
    assert list(run_dir.glob("events.out.tfevents.*")), list(run_dir.iterdir())
    rewards, events = scalar_series(run_dir, "reward/mean")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in rewards] == [1, 2, 3]
    assert [value for _, value in rewards] == pytest.approx([row["reward/mean"] for row in logged])
    assert [row["reward/mean"] for row in history] == pytest.approx([value for _, value in rewards])
    assert "trpo/kl" in events.Tags()["scalars"] and "value/loss" in events.Tags()["scalars"]
    # The completions table, as markdown text, at step 2 only.
    texts = events.Tensors("completions/text_summary")
    assert [t.step for t in texts] == [2]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert (
        table.startswith("| step | prompt | completion | reward |")
        and table.count("\n") == 2 + trainer.config.batch_size - 1
    )


class RecordingTracker(GeneralTracker):
    """A tracker with a table type, as wandb's: what accelerate hands it is recorded."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logs, self.tables = None, [], []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, values))

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs):
        self.tables.append((table_name, columns, data, step))


def test_other_trackers_get_metrics_hyperparameters_and_a_completions_table():
    recording = RecordingTracker()
    trackers = RunTrackers(
        Accelerator(cpu=True, log_with=[recording]),
        "run",
        {"max_kl": 0.02, "lora_target_modules": ["q_proj", "v_proj"], "target_kl_ref": None},
    )
    trackers.log_metrics({"step": 1, "reward/mean": 0.5, "trpo/kl": float("nan")}, step=1)
    trackers.log_completions(["a prompt"], ["a completion"], [0.25], step=1)
    assert recording.config == {"max_kl": 0.02, "lora_target_modules": "q_proj,v_proj", "target_kl_ref": "None"}
    assert recording.logs == [
        (1, {"reward/mean": 0.5})
    ]  # "step" is the step; non-finite values are left to metrics.jsonl
    assert recording.tables == [
        ("completions", ["step", "prompt", "completion", "reward"], [[1, "a prompt", "a completion", 0.25]], 1)
    ]


def test_completions_markdown_escapes_table_characters():
    table = completions_markdown([[3, "a | b", "line\nbreak", 1.0]])
    assert table.splitlines()[-1] == "| 3 | a \\| b | line break | 1.000 |"


@pytest.mark.parametrize(
    ("report_to", "match"),
    [
        (["nope"], r"\['nope'\] not among"),
        (["none", "tensorboard"], "'none' and 'all' stand alone"),
    ],
)
def test_bad_report_to_fails_at_construction(report_to, match):
    with pytest.raises(ValueError, match=match):
        TRPOConfig(report_to=report_to)


def test_a_tracker_that_is_not_installed_is_named_with_what_to_install(make_trainer):
    missing = next(name for name in ("wandb", "trackio", "mlflow", "aim") if name not in tracker_names(["all"]))
    with pytest.raises(ValueError, match=f"pip install {missing}"):
        make_trainer(report_to=[missing])


def test_report_to_none_starts_no_tracker(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=1)
    trainer.train()
    assert trainer.accelerator.log_with == [] or not trainer.accelerator.log_with
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))
