"""Tests of the comparison report (condcomp.report): files, plots, table and JSON summary."""

from __future__ import annotations

import json
import math

import pytest

from condcomp.report import PLOT_FILES, RunSummary, human_count, human_si, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(final_val: float, n_steps: int = 20, eval_every: int = 5) -> list[dict]:
    """Synthetic metrics.jsonl rows: train rows every step, val rows every `eval_every`."""
    rows = []
    for step in range(n_steps + 1):
        tokens = step * 4096
        row = {
            "step": step,
            "tokens": tokens,
            "elapsed_s": step * 0.5,
            "train_loss": final_val + 3.0 / (1 + step),
            "lr": 1e-3,
            "router_entropy": 0.7,  # an extra key the report must ignore
        }
        if step % eval_every == 0:
            # Step 0 has tokens == 0, which the log-scale FLOPs plot must drop, not crash on.
            row["val_loss"] = final_val + 2.0 * (n_steps - step) / n_steps
        rows.append(row)
    return rows


def _run(tmp_path, name, family, **overrides) -> RunSummary:
    fields = dict(
        name=name,
        run_dir=str(tmp_path / "runs" / name),
        family=family,
        total_params=1_234_567,
        active_params=1_234_567,
        flops_per_token=2_469_134.0,
        final_val_loss=3.25,
        bits_per_byte=1.1234,
        train_tokens_per_s=45_600.0,
        decode_tokens_per_s=312.0,
        metrics=_metrics(3.25),
    )
    fields.update(overrides)
    return RunSummary(**fields)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report over a dense run, a MoE run (the best) and a run with no val rows."""
    tmp_path = tmp_path_factory.mktemp("report")
    runs = [
        _run(tmp_path, "dense-small", "dense"),
        _run(
            tmp_path,
            "moe-small",
            "moe(top2) on odd layers | 8 experts",
            total_params=5_600_000,
            active_params=2_100_000,
            flops_per_token=4.2e6,
            final_val_loss=3.0,
            bits_per_byte=1.0456,
            train_tokens_per_s=31_200.0,
            decode_tokens_per_s=250.0,
            metrics=_metrics(3.0),
        ),
        _run(
            tmp_path,
            "no-eval",
            "dense",
            final_val_loss=float("nan"),
            bits_per_byte=float("nan"),
            metrics=[
                {"step": s, "tokens": s * 4096, "elapsed_s": s * 0.5, "train_loss": 4.0}
                for s in range(5)
            ],
        ),
    ]
    out_dir = tmp_path / "out" / "nested"  # must be created by write_report
    path = write_report(out_dir, "tiny-suite", runs, notes=["seed 0 only"], device="cuda:0")
    return out_dir, path


def _table_rows(md: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by model name, as lists of cell texts."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| model") and "---" not in line:
            # Split on unescaped pipes only (the MoE family contains an escaped one).
            cells = [c.strip() for c in line.replace("\\|", "\0").strip("|").split("|")]
            cells = [c.replace("\0", "|") for c in cells]
            rows[cells[0]] = cells
    return rows


def test_writes_all_files(report):
    out_dir, path = report
    assert path == out_dir / "report.md"
    for name in ["report.md", "summary.json", *PLOT_FILES.values()]:
        assert (out_dir / name).is_file(), name


@pytest.mark.parametrize("filename", list(PLOT_FILES.values()))
def test_plots_are_valid_pngs(report, filename):
    data = (report[0] / filename).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a plot with axes, lines and a legend, not an empty canvas


def test_table_has_models_and_numbers(report):
    md = report[1].read_text()
    assert "# Comparison report: tiny-suite" in md
    assert "cuda:0" in md
    rows = _table_rows(md)
    assert set(rows) == {"dense-small", "moe-small", "no-eval"}
    assert rows["dense-small"] == [
        "dense-small",
        "dense",
        "1.23M",
        "1.23M",
        "2.47M",
        "3.2500",
        "1.1234",
        "45.6k",
        "312",
    ]
    assert rows["moe-small"] == [
        "moe-small",
        "moe(top2) on odd layers | 8 experts",
        "5.6M",
        "2.1M",
        "4.2M",
        "**3.0000**",
        "1.0456",
        "31.2k",
        "250",
    ]


def test_only_best_loss_is_bold(report):
    md = report[1].read_text()
    assert md.count("**3.0000**") == 1
    assert "**3.2500**" not in md


def test_run_without_val_rows_is_na_and_not_plotted(report):
    md = report[1].read_text()
    row = _table_rows(md)["no-eval"]
    assert row[5] == "n/a" and row[6] == "n/a"
    assert "Not plotted (no validation points): no-eval." in md


def test_report_sections(report):
    md = report[1].read_text()
    assert "3x" in md and "same token budget" in md
    for filename in PLOT_FILES.values():
        assert f"]({filename})" in md  # relative link
    assert md.index("## Notes") > md.index("## Plots")
    assert "- seed 0 only" in md


def test_summary_json(report):
    summary = json.loads((report[0] / "summary.json").read_text())
    assert summary["suite"] == "tiny-suite"
    assert summary["device"] == "cuda:0"
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["moe-small"]["total_params"] == 5_600_000
    assert by_name["moe-small"]["final_val_loss"] == 3.0
    assert by_name["no-eval"]["final_val_loss"] is None  # NaN is not valid JSON
    assert all("metrics" not in r for r in summary["runs"])


def test_all_runs_without_val_rows(tmp_path):
    run = _run(tmp_path, "only-train", "dense", final_val_loss=float("nan"), metrics=[])
    path = write_report(tmp_path, "empty", [run])
    assert "| only-train |" in path.read_text()
    assert (tmp_path / PLOT_FILES["flops"]).read_bytes().startswith(PNG_SIGNATURE)


def test_no_notes_section_without_notes(tmp_path):
    path = write_report(tmp_path, "s", [_run(tmp_path, "a", "dense")])
    assert "## Notes" not in path.read_text()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (512, "512"),
        (999, "999"),
        (1000, "1k"),
        (45_600, "45.6k"),
        (999_600, "1M"),
        (1_234_567, "1.23M"),
        (7e9, "7B"),
        (1.5e12, "1.5T"),
        (2.5e16, "25,000T"),
        (12.345, "12.3"),
        (-45_600, "-45.6k"),
        (float("nan"), "n/a"),
        (None, "n/a"),
        (math.inf, "n/a"),
    ],
)
def test_human_count(value, expected):
    assert human_count(value) == expected


def test_human_si_uses_giga():
    assert human_si(3.1e9) == "3.1G"
    assert human_si(2e15) == "2P"


def test_expert_load_heat_map(tmp_path):
    moe = _run(tmp_path, "moe-run", "moe on odd layers")
    for i, row in enumerate(moe.metrics):
        row["layers.1.block.ffn.tokens_per_expert"] = [0.5 - 0.01 * i, 0.5 + 0.01 * i, 0.0, 0.0]
        row["layers.3.block.ffn.tokens_per_expert"] = [0.25] * 4
    dense = _run(tmp_path, "dense-run", "dense")
    md = write_report(tmp_path / "out", "suite", [moe, dense]).read_text()
    assert "## Expert load" in md and "expert_load_moe-run.png" in md
    png = (tmp_path / "out" / "expert_load_moe-run.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not (tmp_path / "out" / "expert_load_dense-run.png").exists()


def test_throughputs_measured_on_a_busy_machine_are_marked_and_explained(tmp_path):
    runs = [_run(tmp_path, "quiet", "dense", train_other_cpu_share=0.02,
                 decode_other_cpu_share=0.03),
            _run(tmp_path, "crowded", "dense", train_other_cpu_share=0.61,
                 decode_other_cpu_share=0.1),
            _run(tmp_path, "unmeasured", "dense")]
    md = write_report(tmp_path, "s", runs).read_text()
    rows = _table_rows(md)
    assert rows["quiet"][7:] == ["45.6k", "312"]
    assert rows["crowded"][7:] == ["45.6k*", "312"]  # trained busy, decoded on a quiet machine
    assert rows["unmeasured"][7:] == ["45.6k", "312"]  # not measured: no mark
    note = next(line for line in md.splitlines() if line.startswith("\\* Measured while"))
    assert "more than 25% of the CPUs (61% while crowded trained)" in note
    assert md.index(note) > md.index("| crowded |") and md.index(note) < md.index("## How to read")
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["crowded"]["train_other_cpu_share"] == 0.61
    assert by_name["unmeasured"]["decode_other_cpu_share"] is None
    assert summary["busy_share"] == 0.25
    quiet_only = write_report(tmp_path / "quiet", "s", runs[:1]).read_text()
    assert "Measured while" not in quiet_only
