"""``make bench`` keeps working: a very short run of the ehlo rows with smtp-source.

The figures themselves are for ``make bench`` (never asserted here); this
checks the runner's wiring: ehlo as shipped and its one-worker row, every
row measured, the W5 ratio computed, the JSON written; and the same of
``bench/messages.py`` (``ehlo messages`` on a generated store) on a tiny store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import require

ROOT = Path(__file__).resolve().parents[1]
SBIN = "/usr/sbin:/sbin"


@pytest.mark.external
def test_bench_runs_ehlo_rows_and_writes_json(tmp_path: Path) -> None:
    require(shutil.which("smtp-source", path=SBIN) is not None,
            "smtp-source is missing (make test-deps)")  # fmt: skip
    servers = ["ehlo-sqlite", "ehlo-sqlite-1w", "ehlo-null"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--runs", "1",
         "--time-cap", "0.5", "--servers", ",".join(servers), "--workloads", "W1,W5",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    argv = {server["key"]: server["argv"] for server in report["servers"]}
    # ehlo as shipped (workers per core) beside the row held to one worker.
    assert "--workers" not in argv["ehlo-sqlite"]
    assert argv["ehlo-sqlite-1w"][-2:] == ["--workers", "1"]
    for key in servers:
        row = report["results"]["W1"][key]
        assert row["status"] == "ok", row
        assert row["msg_s"]["median"] > 0 and row["cpu_s_per_1k"] > 0
    (w5,) = [t for t in report["targets"] if t["target"].startswith("W5")]
    # The verdict follows from the figures: W1 sqlite over W1 null against 70%.
    results = report["results"]["W1"]
    ratio = results["ehlo-sqlite"]["msg_s"]["median"] / results["ehlo-null"]["msg_s"]["median"]
    assert w5["need"] == 0.70
    assert w5["value"] == pytest.approx(ratio)
    assert w5["pass"] is (ratio >= w5["need"])
    verdict = "PASS" if w5["pass"] else "FAIL"
    assert f"[{verdict}] W5 W1 sqlite >= 70% of null" in result.stdout


@pytest.mark.parametrize("workload", ["W1", "W2"])
def test_python_cost_drives_the_server_and_prints_its_figure(workload: str) -> None:
    # The script exits non-zero unless every message it sent was answered 250.
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "python_cost.py"), workload, "-n", "50"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip()
    assert line.startswith(f"{workload}: ") and line.endswith(" us of Python per message")
    assert float(line.split()[1]) > 0


def test_messages_bench_measures_each_command_and_judges_the_targets(tmp_path: Path) -> None:
    # A tiny store: the wiring, not the figures (those are for make bench).
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "messages.py"), "--quick", "--messages", "120",
         "--runs", "2", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = tmp_path.glob("messages-*-quick.json")
    report = json.loads(path.read_text())
    assert (tmp_path / "messages-latest.json").read_text() == path.read_text()
    assert report["messages"] == 120 and report["runs"] == 2
    rows = report["results"]
    assert list(rows) == ["page", "filtered", "all", "show"]
    lines = result.stdout.splitlines()
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["runs"]) == 2
        seconds = row["seconds"]
        assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
        assert row["peak_rss_mib"] > 0 and row["cpu_seconds"] > 0
        # One table row per command, with its figures.
        [line] = [line for line in lines if line.startswith(row["command"] + " ")]
        wall = f"{seconds['median']:.3f} [{seconds['min']:.3f}-{seconds['max']:.3f}]"
        assert f"{wall} {row['cpu_seconds']:.3f} " in " ".join(line.split()) + " "
        assert line.endswith(f"{row['peak_rss_mib']:.1f} MiB")
    # The verdicts follow from the figures.
    page = rows["page"]["seconds"]["median"]
    peak = rows["all"]["peak_rss_mib"]
    page_target, all_target = report["targets"]
    assert page_target["pass"] is (page < 0.5)
    assert all_target["pass"] is (peak < 80)
    for target, figure in ((page_target, f"{page:.3f} s"), (all_target, f"{peak:.1f} MiB")):
        verdict = "PASS" if target["pass"] else "FAIL"
        assert f"[{verdict}] {target['target']}: {figure}" in result.stdout
    assert page_target["target"] == "list --limit 50 < 0.5 s"
    assert all_target["target"] == "list --all --jsonl peak RSS < 80 MiB"
