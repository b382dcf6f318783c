"""Bounded fuzzing in the normal suite, and a replay of every seed in the corpus.

Each target of ``tests/fuzz/harness.py`` runs a fixed, reproducible number of
Hypothesis examples (derandomized, no example database), so CI sees the same
inputs on every run. Every file in ``tests/fuzz/corpus/<target>/`` is replayed
through its target, so committed seeds, including ``crash-*.bin`` files saved by
``scripts/fuzz.py``, are checked on every run; the seeds of the harness's
``KNOWN_BUGS`` are strict xfails until those bugs are fixed. The long runs are
``make fuzz``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings

from .fuzz import harness
from .fuzz.harness import Case

# Reproducible in CI: the same examples on every run, nothing stored between runs.
settings.register_profile(
    "ehlo-fuzz-bounded", max_examples=300, derandomize=True, **harness.SETTINGS
)
BOUNDED = settings.get_profile("ehlo-fuzz-bounded")



def _seed_params() -> list[object]:
    """One case per corpus file; the seeds of known bugs are strict xfails."""
    reasons = {
        key: f"known bug {bug_id}: {bug.summary}"
        for bug_id, bug in harness.KNOWN_BUGS.items()
        for key in bug.seeds
    }
    params: list[object] = []
    for name in sorted(harness.TARGETS):
        for path in harness.corpus_files(name):
            key = f"{name}/{path.name}"
            marks = []
            if key in reasons:
                marks.append(pytest.mark.xfail(strict=True, reason=reasons[key]))
            params.append(pytest.param(name, path, id=key, marks=marks))
    return params


def _require(target: harness.Target) -> None:
    if target.requires is not None:
        pytest.importorskip(target.requires)


@pytest.mark.parametrize("name", sorted(harness.TARGETS))
def test_bounded_fuzz(name: str) -> None:
    target = harness.TARGETS[name]
    _require(target)

    @BOUNDED
    @given(target.strategy())
    def run(case: Case) -> None:
        target.check(case)

    # Known bugs are pinned by their seeds below; here they must not hide others.
    with harness.tolerating(harness.KNOWN_BUGS):
        run()


@pytest.mark.parametrize(("name", "path"), _seed_params())
def test_seed_replays_clean(name: str, path: Path) -> None:
    target = harness.TARGETS[name]
    _require(target)
    target.replay(path.read_bytes())


def test_corpus_layout() -> None:
    folders = {p.name for p in harness.CORPUS.iterdir() if p.is_dir()}
    assert folders == set(harness.TARGETS)
    seeds_of_bugs = {key for bug in harness.KNOWN_BUGS.values() for key in bug.seeds}
    for key in seeds_of_bugs:
        assert (harness.CORPUS / key).is_file(), f"known bug seed {key} is missing"
    for name in harness.TARGETS:
        seeds = [p for p in harness.corpus_files(name) if not p.name.startswith("crash-")]
        assert len(seeds) >= 10, f"{name}: only {len(seeds)} seeds"
        assert all(p.stat().st_size <= 8192 for p in seeds), f"{name}: a seed over 8 KiB"
