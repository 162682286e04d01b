import json

import pytest

from trpo_rlhf.prompts import default_prompts, load_prompts, review_openings


def test_shipped_prompts():
    prompts = default_prompts()
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() == p and p for p in prompts)
    assert not any(p.startswith("#") for p in prompts)


def test_review_openings_take_two_to_eight_words():
    texts = ["This film was a <br /><br />delight from start to finish and more", "Short", "Two words"]
    openings = review_openings(texts, seed=0)
    assert len(openings) == 2  # the one-word review is dropped
    for opening, text in zip(openings, [texts[0], texts[2]]):
        words = opening.split()
        assert 2 <= len(words) <= 8
        assert " ".join(text.replace("<br />", " ").split()).startswith(opening)


def test_load_prompts_from_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nThe film\n\nI watched  \n")
    assert load_prompts(str(txt)) == ["The film", "I watched"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in ["A", "B"]) + "\n")
    assert load_prompts(str(jsonl)) == ["A", "B"]
    csv = tmp_path / "p.csv"
    csv.write_text("text\nthis movie was long and slow\n")
    assert load_prompts(str(csv), seed=0)[0] in {
        "this movie",
        "this movie was",
        "this movie was long",
        "this movie was long and",
        "this movie was long and slow",
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="neither a 'prompt' nor a 'text' column"):
        load_prompts(str(bad))


# ------------------------------------------------------------------ inputs named (issue 42)
def test_a_latin1_prompt_file_is_named_with_its_byte(tmp_path):
    from trpo_rlhf.experiments.arithmetic import load_arithmetic

    for name in ("p.txt", "p.jsonl", "p.csv"):
        path = tmp_path / name
        path.write_bytes("prompt\nLe film était\n".encode("latin-1"))
        with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text: byte 15 \(line 2\) is b'\\xe9'"):
            load_prompts(str(path))
    with pytest.raises(ValueError, match=r"p.jsonl is not UTF-8 text"):
        load_arithmetic(tmp_path / "p.jsonl")
    (tmp_path / "rows.jsonl").write_text('{"prompt": [], "answer": "1"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 2 is a JSON list, not a row"):
        load_arithmetic(tmp_path / "rows.jsonl")


@pytest.mark.parametrize(
    "dataset, error, match",
    [
        (
            ["fine", "bad \ud800 text"],
            ValueError,
            r"train_dataset\[1\] holds '\\ud800' at character 4, a lone surrogate",
        ),
        (
            [[{"role": "user", "content": "hi \udcff"}]],
            ValueError,
            r"train_dataset\[0\]\[0\]\['content'\] holds '\\udcff' at character 3",
        ),
        (
            [[{"role": "user", "content": "hi"}], [{"role": "robot", "content": "beep"}]],
            ValueError,
            r"train_dataset\[1\]\[0\] has the role 'robot', which chat templates do not know",
        ),
        (5, TypeError, r"train_dataset must be a list of prompts, a dict of columns or a datasets.Dataset, not a int"),
        (b"bytes", TypeError, r"not a bytes"),
    ],
)
def test_a_bad_prompt_is_named_by_its_row(dataset, error, match):
    from trpo_rlhf.prompts import prompt_columns

    with pytest.raises(error, match=match):
        prompt_columns(dataset)


def test_a_template_that_refuses_the_messages_is_named_by_its_row(tmp_path, word_tokenizer):
    from trpo_rlhf import TRPOConfig, TRPOTrainer
    from trpo_rlhf.experiments.toy import WordScoreReward, build_tiny_lm

    word_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    chats = [[{"role": "user", "content": "good film"}], [{"role": "system", "content": "be good"}]]
    with pytest.raises(ValueError, match=r"train_dataset prompt 1: the tokenizer's chat template refused .*no system"):
        TRPOTrainer(
            TRPOConfig(output_dir=str(tmp_path / "run"), lora_target_modules=["q_proj"]),
            build_tiny_lm(word_tokenizer),
            word_tokenizer,
            WordScoreReward(),
            chats,
        )
