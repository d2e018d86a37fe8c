"""The benchmark suite's tooling: the markdown renderer, the target check, a smoke run.

Timings are never asserted: the results fed in are synthetic, and the smoke run only
checks that the suite runs end to end and writes what the renderer reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
import targets  # noqa: E402

MS = 1e-3


def _result(device: str = "cpu", **overrides: float) -> dict:
    """A two-set result in run.py's --json layout; medians in ms, any overridden by name."""
    medians = {
        "torch fused Adam (no GC)": 10.0,
        "gradcent eager + torch Adam": 15.0,
        "gradcent fused Adam": 10.5,
        "gradcent native Adam": 9.0,
        "torch fused SGDM (no GC)": 8.0,
        "gradcent native SGDM": 8.0,
        "gradcent fused SGDM": 8.4,
        "copy of the gradients": 4.0,
        "gradcent eager GC pass": 4.0,
        "gradcent native GC pass": 2.6,
    }
    medians.update(overrides)
    small = {k: v * MS for k, v in medians.items()}
    big = {k: v * 10 * MS for k, v in medians.items()}
    step = {
        "batch": 128,
        "median_s": {
            "full training step (torch SGDM)": 2.0,
            "torch fused SGDM step": 0.005,
            "gradcent eager GC pass": 0.004,
        },
        "share_eager": 0.002,
    }
    return {
        "device": device,
        "torch": "2.14.1",
        "threads": 2,
        "repeats": 7,
        "sets": {
            "small": {"params": 2_500_000, "tensors": 10, "first_step_s": {}, "median_s": small},
            "big": {"params": 25_000_000, "tensors": 20, "median_s": big},
        },
        "resnet18_step": step,
    }


def _status(verdicts: list, name_start: str, where: str) -> tuple[str, str]:
    (v,) = [v for v in verdicts if v.target.startswith(name_start) and v.where == where]
    return v.measured, v.status


def test_render_rows_are_medians_in_ms_and_ratios_to_the_reference():
    md = report.render(_result())
    assert "Run: device cpu, 2 threads, 7 rounds, torch 2.14.1." in md
    assert "| case | small (2.5M, 10 tensors): ms | ratio | big (25.0M, 20 tensors): ms |" in md
    rows = [
        "| torch fused Adam (no GC) | 10.00 | 1.00 | 100.00 | 1.00 | torch fused Adam (no GC) |",
        "| gradcent native Adam | 9.00 | 0.90 | 90.00 | 0.90 | torch fused Adam (no GC) |",
        "| gradcent fused SGDM | 8.40 | 1.05 | 84.00 | 1.05 | torch fused SGDM (no GC) |",
        "| gradcent native GC pass | 2.60 | 0.65 | 26.00 | 0.65 | copy of the gradients |",
        "| gradcent eager GC pass | 4.00 | 0.200% |",  # the ResNet-18 step's table
        "| native GC pass (opt.centralize_grads(), impl='native') <= 0.70x a copy of the "
        "gradients | big | 0.650x | PASS |",
    ]
    for row in rows:
        assert row + "\n" in md


def test_a_case_missing_from_one_set_leaves_its_cells_blank():
    res = _result()
    del res["sets"]["big"]["median_s"]["gradcent native Adam"]
    assert "| gradcent native Adam | 9.00 | 0.90 |  |  | torch fused Adam (no GC) |" in (
        report.render(res)
    )


def test_met_targets_pass_and_check_exits_zero(tmp_path, capsys):
    verdicts = targets.evaluate(_result())
    assert _status(verdicts, "native GC pass", "small") == ("0.650x", "PASS")
    assert _status(verdicts, "native GC+Adam", "big") == ("0.900x", "PASS")
    assert _status(verdicts, "native GC+SGDM", "small") == ("1.000x", "PASS")  # limit included
    assert _status(verdicts, "GC share of a ResNet-18 step <= 0.3%, eager", "ResNet-18 step") == (
        "0.200%",
        "PASS",
    )
    shown = targets.evaluate(_result(**{"gradcent native GC pass": 2.8001}))  # 0.70003x
    assert _status(shown, "native GC pass", "small") == ("0.700x", "PASS")  # judged as shown
    path = tmp_path / "met.json"
    path.write_text(json.dumps(_result()))
    assert report.main(["--check", str(path)]) == 0
    assert "FAIL" not in capsys.readouterr().err


def test_a_missed_target_fails_and_check_exits_nonzero_naming_it(tmp_path, capsys):
    res = _result(**{"gradcent native GC pass": 3.2})  # 0.80x a copy: over 0.70x
    verdicts = targets.evaluate(res)
    assert _status(verdicts, "native GC pass", "small") == ("0.800x", "FAIL")
    assert [(v.target[:14], v.where) for v in targets.failures(verdicts)] == [
        ("native GC pass", "small"),
        ("native GC pass", "big"),
    ]
    path = tmp_path / "missed.json"
    path.write_text(json.dumps(res))
    assert report.main(["--check", str(path)]) == 1
    out = capsys.readouterr()
    assert "| big | 0.800x | FAIL |" in out.out
    assert "FAIL: native GC pass" in out.err and "[big]: 0.800x" in out.err
    assert report.main([str(path)]) == 0  # without --check the tables are all it gives


def test_cases_not_run_are_not_measured_and_do_not_fail(tmp_path):
    res = _result(device="cuda")  # on a GPU the suite runs no native case and here no step
    for res_set in res["sets"].values():
        for case in [c for c in res_set["median_s"] if "native" in c]:
            del res_set["median_s"][case]
    res["resnet18_step"] = None
    verdicts = targets.evaluate(res)
    assert _status(verdicts, "native GC+Adam", "small") == ("", "not measured")
    assert _status(verdicts, "GC share of a ResNet-18 step <= 0.3%, native", "ResNet-18 step") == (
        "",
        "not measured",
    )
    assert targets.failures(verdicts) == []
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(res))
    assert report.main(["--check", str(path)]) == 0
    empty = targets.evaluate({"device": "cpu", "sets": {}, "resnet18_step": None})
    assert {v.status for v in empty} == {"not measured"}


def test_the_eager_pass_target_is_reported_on_every_device_and_never_fails():
    res = _result(**{"gradcent eager GC pass": 4.8})  # 1.2x the copy: over 1.00x
    for device in ("cpu", "cuda:0"):
        res["device"] = device
        verdicts = targets.evaluate(res)
        assert _status(verdicts, "eager GC pass <= 1.00x", "small") == (
            "1.200x",
            "missed; reported, not checked",
        )
        assert targets.failures(verdicts) == []
    res = _result(**{"gradcent eager GC pass": 3.6})  # 0.9x
    assert _status(targets.evaluate(res), "eager GC pass <= 1.00x", "small")[1] == (
        "met; reported, not checked"
    )


def test_fused_targets_are_checked_on_cuda_only():
    res = _result(**{"gradcent fused Adam": 20.0})  # 2.0x torch's Adam: over 1.10x
    on_cpu = targets.evaluate(res)
    assert _status(on_cpu, "fused GC+Adam", "small") == (
        "2.000x",
        "missed; not checked on cpu (cuda only)",
    )
    assert _status(on_cpu, "fused GC+SGDM", "small")[1] == "met; not checked on cpu (cuda only)"
    assert targets.failures(on_cpu) == []
    res["device"] = "cuda:0"
    on_gpu = targets.evaluate(res)
    assert _status(on_gpu, "fused GC+Adam", "small") == ("2.000x", "FAIL")
    assert _status(on_gpu, "fused GC+SGDM", "big") == ("1.050x", "PASS")


def test_older_results_render_as_they_are_and_are_judged_by_todays_targets():
    res = _result()
    for res_set in res["sets"].values():
        m = res_set["median_s"]
        m["gradcent fused Adam [per_param]"] = m.pop("gradcent fused Adam")
        m["gradcent blocked Adam"] = 11 * MS
    md = report.render(res)
    assert "| gradcent blocked Adam | 11.00 | 1.10 |" in md
    assert "| gradcent fused Adam [per_param] | 10.50 | 1.05 |" in md
    assert _status(targets.evaluate(res), "fused GC+Adam", "small")[0] == "1.050x"


def test_ratios_pair_the_rounds_where_the_result_kept_them():
    # Round 3 is slow for both cases (a load spike): paired, its ratio stays 0.5;
    # the ratio of the medians would read 4/3.
    res = {
        "median_s": {"copy of the gradients": 3.0, "gradcent native GC pass": 4.0},
        "samples_s": {
            "copy of the gradients": [2.0, 3.0, 8.0, 8.0, 1.0],
            "gradcent native GC pass": [1.0, 1.5, 4.0, 4.0, 9.0],
        },
    }
    assert targets.ratio(res, "gradcent native GC pass", "copy of the gradients") == 0.5
    verdict = [v for v in targets.evaluate({"sets": {"s": res}}) if "native GC pass" in v.target]
    assert (verdict[0].measured, verdict[0].status) == ("0.500x", targets.PASS)
    del res["samples_s"]  # an older result: medians only
    assert targets.ratio(res, "gradcent native GC pass", "copy of the gradients") == 4.0 / 3.0
    assert report._cell(res, "gradcent native GC pass") == ["4000.00", "1.33"]


def test_committed_results_all_render():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for path in files:
        md = report.render(report.load(path))
        assert "| torch fused Adam (no GC) |" in md and "| target | where |" in md


def test_rewrite_fills_each_marked_block_with_what_its_command_prints(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result()))
    b.write_text(json.dumps(_result(**{"gradcent native GC pass": 3.2})))
    doc = (
        f"intro\n<!-- report: {a} -->\nstale table\n<!-- end report -->\nmiddle\n"
        f"<!-- report: --compare {a} {b} -->\n<!-- end report -->\nafter\n"
    )
    new = report.rewrite(doc)
    one = f"_Written by `python benchmarks/report.py {a}` (not by hand)._\n\n"
    assert new.startswith(f"intro\n<!-- report: {a} -->\n{one}{report.render(_result())}")
    assert "stale table" not in new and new.endswith("<!-- end report -->\nafter\n")
    assert report.main([str(a)]) == 0
    assert capsys.readouterr().out == report.render(_result())  # the block is the command's output
    row = "| native GC pass (opt.centralize_grads(), impl='native') <= 0.70x a copy of the "
    assert row + "gradients | small | 0.650x PASS | 0.800x FAIL |\n" in new
    assert "| a | b |" in new
    assert report.rewrite(new) == new
    doc_path = tmp_path / "doc.md"
    doc_path.write_text(doc)
    assert report.main(["--write", str(doc_path)]) == 0
    assert doc_path.read_text() == new


def test_benchmarks_doc_tables_are_generated_from_the_committed_results():
    # Fails when a result file or the renderer changed without
    # `python benchmarks/report.py --write docs/BENCHMARKS.md`.
    doc = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert doc.count("<!-- report: ") >= 1
    assert report.rewrite(doc) == doc


@pytest.mark.experiments  # run.py builds torchvision models
@pytest.mark.fused  # and times impl="fused" (its first step compiles)
@pytest.mark.slow
def test_quick_run_writes_a_result_the_renderer_reads(tmp_path):
    # A smoke run only: speed belongs to the suite, and a wall-clock bound
    # failed on a loaded machine. One thread: the test machine's cores are shared.
    out = tmp_path / "quick.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-step"]
    subprocess.run(
        [*cmd, "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a speed bound
        check=True,
    )
    res = json.loads(out.read_text())
    assert list(res["sets"]) == ["small conv set", "small transformer"]
    cases = set(res["sets"]["small conv set"]["median_s"])
    for impl in ("eager + torch", "fused", "native"):
        assert {f"gradcent {impl} Adam", f"gradcent {impl} SGDM"} <= cases
    assert not any(c.startswith("gradcent blocked") or "[" in c for c in cases)
    assert res["resnet18_step"] is None and res["argv"][:2] == ["--quick", "--no-step"]
    stored = {(t["target"], t["where"]): t["status"] for t in res["targets"]}
    assert stored[(targets.TARGETS[-1].name, "ResNet-18 step")] == "not measured"
    assert "| gradcent native GC pass |" in report.render(res)


def test_sign_test_counts_rounds_above_the_limit():
    # 14 of 15 rounds above: P(X >= 14), X ~ Bin(15, 1/2) = (15 + 1) / 2**15.
    assert targets.sign_test_above([1.1] * 14 + [0.9], 1.0) == (14, 15, 16 / 2**15)
    # Rounds exactly at the limit say nothing and are dropped from n.
    above, n, p = targets.sign_test_above([1.2, 1.2, 1.0, 0.8], 1.0)
    assert (above, n) == (2, 3) and p == 0.5


def _with_rounds(ratios: list[float]) -> dict:
    """A result whose native SGDM case has these per-round ratios to torch's SGD, on both sets."""
    res = _result()
    for res_set in res["sets"].values():
        ref = [8.0 * MS] * len(ratios)
        res_set["samples_s"] = {
            "torch fused SGDM (no GC)": ref,
            "gradcent native SGDM": [r * t for r, t in zip(ratios, ref, strict=True)],
        }
    return res


def test_a_median_over_the_limit_fails_only_when_the_rounds_show_it(tmp_path):
    noisy = _with_rounds([0.9, 1.1, 0.95, 1.08, 1.02, 0.97, 1.05])  # median 1.02, 4 of 7 above
    measured, status = _status(targets.evaluate(noisy), "native GC+SGDM", "small")
    assert status == targets.ABOVE_NS
    assert measured == "1.020x (4 of 7 rounds above, p = 0.500)"
    assert targets.failures(targets.evaluate(noisy)) == []
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps(noisy))
    assert report.main(["--check", str(path)]) == 0
    assert "1.020x (4 of 7 rounds above, p = 0.500) above, not significant" in report.compare(
        {"noisy": noisy}
    )
    clear = _with_rounds([1.03, 1.1, 1.05, 1.08, 1.02, 0.97, 1.05])  # 6 of 7 above
    measured, status = _status(targets.evaluate(clear), "native GC+SGDM", "big")
    assert (measured, status) == ("1.050x (6 of 7 rounds above, p = 0.062)", targets.ABOVE_NS)
    always = _with_rounds([1.03, 1.1, 1.05, 1.08, 1.02, 1.01, 1.05])  # 7 of 7: p = 1/128
    assert _status(targets.evaluate(always), "native GC+SGDM", "big") == (
        "1.050x (7 of 7 rounds above, p = 0.008)",
        "FAIL",
    )


def test_a_committed_run_is_judged_by_its_rounds():
    # The third run of 2026-12-02: native SGDM on the 355M set above torch's fused
    # SGD in 14 of its 15 rounds, a miss the sign test confirms.
    res = report.load(ROOT / "benchmarks/results/cpu-2026-12-02-third.json")
    verdicts = targets.evaluate(res)
    assert _status(verdicts, "native GC+SGDM", "transformer 24x1024") == (
        "1.095x (14 of 15 rounds above, p = 0.000)",
        "FAIL",
    )
    assert _status(verdicts, "native GC+Adam", "ResNet-50") == ("0.928x", "PASS")
