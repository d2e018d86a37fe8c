"""Character-level language modelling: the text dataset, the gpt model, LM metrics."""

import csv
import json
import math

import pytest
import torch

from gradcent.experiments.datasets import DatasetError, build_dataset
from gradcent.experiments.models import build_model
from gradcent.rules import plan

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(40))


def write_text(tmp_path, text=TEXT, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_text_split_vocab_and_windows(tmp_path):
    text = TEXT + "QZ"  # two characters that only the validation part has
    spec = build_dataset("text", str(write_text(tmp_path, text)), context=16)
    assert spec.task == "lm" and spec.image_size == 16
    assert spec.vocab == "".join(sorted(set(text))) and spec.num_classes == len(set(text))
    cut = int(len(text) * 0.9)  # the last 10% validates, contiguous
    assert len(spec.train) == (cut - 1) // 16 and len(spec.test) == (len(text) - cut - 1) // 16
    decode = lambda ids: "".join(spec.vocab[i] for i in ids)  # noqa: E731
    x, y = spec.train[2]
    assert decode(x) == text[32:48] and decode(y) == text[33:49]  # targets: shifted by one
    xv, _ = spec.test[0]
    assert decode(xv) == text[cut : cut + 16]
    # the vocabulary covers characters only the validation text has
    assert decode(spec.test.ids).endswith("QZ") and "Q" not in decode(spec.train.ids)
    assert decode(spec.train.ids) + decode(spec.test.ids) == text
    with pytest.raises(IndexError):
        spec.train[len(spec.train)]


def test_text_subset_limits_windows_evenly(tmp_path):
    full = build_dataset("text", str(write_text(tmp_path)), context=8)
    spec = build_dataset("text", str(write_text(tmp_path)), context=8, subset=10)
    assert len(spec.train) == 10 and len(spec.test) == 10
    n = len(full.train)
    assert torch.equal(spec.train[3][0], full.train[3 * n // 10][0])


def test_text_errors(tmp_path):
    with pytest.raises(DatasetError, match="text needs --data FILE"):
        build_dataset("text")
    with pytest.raises(DatasetError, match="Expected a UTF-8 text file at .*missing"):
        build_dataset("text", str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe")
    with pytest.raises(DatasetError, match="not UTF-8"):
        build_dataset("text", str(bad))
    with pytest.raises(DatasetError, match="too few for one training and one validation window"):
        build_dataset("text", str(write_text(tmp_path, "short text")), context=128)


def test_gpt_default_size_and_gc_choices():
    model = build_model("gpt", 84, task="lm")  # the Shakespeare file's 84 characters
    assert sum(p.numel() for p in model.parameters()) == 831_232  # ~0.8M
    assert model.tok.weight is not model.head.weight  # not tied
    decisions = plan(model, mode="all")
    for name, p in model.named_parameters():
        spec = decisions.spec(p)
        centred = name.endswith(("qkv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight"))
        if centred or name == "head.weight":
            assert spec is not None and spec.dims == (1,), name  # per output unit (row)
        else:  # token / position embeddings, LayerNorms, biases
            assert spec is None, name
    assert len(model.blocks) == 4 and model.blocks[0].attn.heads == 4


def test_gpt_is_causal_and_trains(tmp_path):
    torch.manual_seed(0)
    model = build_model("gpt", 20, context=12, layers=2, heads=2, width=16, task="lm")
    x = torch.randint(0, 20, (3, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 20  # change only positions 7..11
    model.eval()
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])
    model.train()
    targets = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="longer than the context 12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="width a multiple of heads"):
        build_model("gpt", 20, heads=3, width=16, task="lm")


def test_cli_compare_text_gpt_reports_lm_metrics(tmp_path, capsys):
    from gradcent.cli import main

    path = write_text(tmp_path)
    out = tmp_path / "run"
    args = ["compare", "--dataset", "text", "--data", str(path), "--model", "gpt"]
    args += ["--optimizer", "adamw", "--lr", "0.01", "--context", "16", "--gpt-layers", "1"]
    args += ["--gpt-heads", "2", "--gpt-width", "16", "--batch-size", "8", "--epochs", "2"]
    args += ["--seeds", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "val loss nats/char" in table and "bits/char" in table and "test acc" not in table
    doc = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in doc["summary"]}
    assert rows["baseline"]["metric"] == "test_bpc"
    for row in rows.values():
        nats, bits = row["test_loss"]["mean"], row["test_bpc"]["mean"]
        assert math.isclose(bits, nats / math.log(2)) and 0 < bits < math.log2(24)
        assert row["test_bpc"]["std"] > 0  # two seeds
    assert math.isclose(rows["gc"]["test_bpc"]["p"], rows["gc"]["test_loss"]["p"])
    assert doc["config"]["gpt_width"] == 16 and doc["config"]["context"] == 16
    with (out / "results.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and all(float(r["test_bpc"]) > 0 for r in runs)
    assert all(r["test_acc"] == "nan" for r in runs)
    history = doc["runs"][0]["history"]
    assert len(history) == 2 and all("test_bpc" in h for h in history)
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "baseline" / "seed0" / "result.json").exists()


def test_cli_refuses_image_model_on_text(tmp_path, capsys):
    from gradcent.cli import main

    args = ["train", "--dataset", "text", "--data", str(write_text(tmp_path)), "--model"]
    args += ["smallcnn", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--dataset text needs --model gpt" in capsys.readouterr().err


def test_lm_curves_show_validation_nats_and_bits_instead_of_accuracy():
    from gradcent.experiments.plots import _panels

    lm = {"gc": [[{"epoch": 1, "train_loss": 2.0, "test_loss": 1.9, "test_bpc": 2.7}]]}
    image = {"gc": [[{"epoch": 1, "train_loss": 2.0, "test_loss": 1.9, "test_acc": 50.0}]]}
    assert _panels(lm, ("train_loss", "test_acc")) == ["train_loss", "test_loss", "test_bpc"]
    assert _panels(image, ("train_loss", "test_acc")) == ["train_loss", "test_acc"]
