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
