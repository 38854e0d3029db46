"""quickstart.py: the whole pipeline on the embedded sample, shortened, with the outputs a newcomer sees; the
documented `python quickstart.py --output-dir /tmp/qs`, with a folder of the test's own."""

import json
import math

from tests.helpers.runs import run_script


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "qs"
    result = run_script("quickstart.py", "--output-dir", out, "training_args.max_steps=40",
                        "training_args.warmup_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    for stage in ("1/3 train a tokenizer", "2/3 tokenize and pack the sample", "3/3 pre-train the tiny Llama"):
        assert stage in stdout
    tokenizer_report = json.loads((out / "tokenizer" / "tokenizer_report.json").read_text())
    assert tokenizer_report["vocab_size"] == 512
    manifest = json.loads((out / "tokenized" / "manifest.json").read_text())
    assert manifest["block_size"] == 128 and manifest["splits"]["test"]["blocks"] > 0
    evals = [json.loads(line) for line in (out / "model" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert [r["step"] for r in evals] == [40]
    perplexity = evals[-1]["perplexity"]
    assert math.isfinite(perplexity) and perplexity < 512  # better than guessing uniformly
    assert f"perplexity on the test split: {perplexity:.2f}" in stdout
    assert f"model: {out / 'model' / 'final-checkpoint'}" in stdout
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "model" / "final-checkpoint" / "model.safetensors").stat().st_size > 100_000
    sample = stdout.split("sample: ", 1)[1].splitlines()[0]
    assert sample.startswith("A capital do Brasil é") and len(sample) > len("A capital do Brasil é") + 10
