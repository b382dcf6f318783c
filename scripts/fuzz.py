#!/usr/bin/env python3
"""Long fuzzing runs over the targets of tests/fuzz/harness.py (``make fuzz``).

    python scripts/fuzz.py [--target NAME ...] [--seconds N] [--examples N] [--seed N] [--strict]

Runs each target with fresh random Hypothesis seeds, batch after batch, until
its share of ``--seconds`` (default 240 in total) or ``--examples`` (per
target) is used up, printing progress as it goes. A failure is shrunk to a
minimal input, printed with its error, and saved as
``tests/fuzz/corpus/<target>/crash-<hash>.bin`` so that the normal test suite
replays it from then on. Exits 1 when any target failed, 0 otherwise.

Known bugs (``KNOWN_BUGS`` in the harness) are counted, not reported as
failures, so that a long run keeps looking for new ones; ``--strict`` stops on
them too.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypothesis import given, seed, settings  # noqa: E402
from tests.fuzz import harness  # noqa: E402
from tests.fuzz.harness import Case, Target  # noqa: E402

DEFAULT_SECONDS = 240.0
FIRST_BATCH = 200
BATCH_SECONDS = 10.0  # aim each Hypothesis run at about this long


@dataclass
class Outcome:
    """What one target's run did."""

    name: str
    examples: int = 0
    seconds: float = 0.0
    failure: str = ""
    saved: Path | None = None
    skipped: str = ""
    known: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def save_crash(target: Target, case: Case) -> tuple[Path, bool]:
    """Store the failing input as a seed; returns (path, whether it is new)."""
    digest = hashlib.sha256(case.data).hexdigest()[:16]
    folder = harness.CORPUS / target.name
    folder.mkdir(parents=True, exist_ok=True)
    for existing in folder.glob("*.bin"):
        if existing.read_bytes() == case.data:
            return existing, False
    path = folder / f"crash-{digest}.bin"
    path.write_bytes(case.data)
    return path, True


def replays(target: Target, data: bytes) -> bool:
    """True when the saved bytes alone (default splits and options) fail again."""
    try:
        target.replay(data)
    except Exception:
        return True
    return False


def run_target(
    target: Target, seconds: float, max_examples: int, rng: random.Random, strict: bool
) -> Outcome:
    with harness.tolerating(() if strict else harness.KNOWN_BUGS) as hits:
        outcome = _run_target(target, seconds, max_examples, rng)
        outcome.known = dict(hits)
    return outcome


def _run_target(target: Target, seconds: float, max_examples: int, rng: random.Random) -> Outcome:
    outcome = Outcome(target.name)
    if not target.available():
        outcome.skipped = f"{target.requires} cannot be imported"
        return outcome
    last: list[Case] = []
    calls = [0]

    def body(case: Case) -> None:
        last[:] = [case]
        calls[0] += 1
        target.check(case)

    strategy = target.strategy()
    batch = FIRST_BATCH
    start = time.monotonic()
    stop_at = start + seconds
    while outcome.examples < max_examples and time.monotonic() < stop_at:
        run_seed = rng.getrandbits(64)
        left = stop_at - time.monotonic()
        budget = min(batch, max_examples - outcome.examples)
        if outcome.examples:
            budget = min(budget, max(20, int(outcome.rate * left)))
        test = seed(run_seed)(
            settings(
                max_examples=budget,
                derandomize=False,
                report_multiple_bugs=False,
                **harness.SETTINGS,
            )(given(strategy)(body))
        )
        calls[0] = 0
        began = time.monotonic()
        try:
            test()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # any escape is a finding
            outcome.examples += calls[0]
            outcome.seconds = time.monotonic() - start
            outcome.failure = describe_failure(target, exc, last[0] if last else None, run_seed)
            if last:
                outcome.saved, new = save_crash(target, last[0])
                if not new:
                    outcome.failure += "\n  (this input was already in the corpus)"
                elif not replays(target, last[0].data):
                    outcome.failure += (
                        "\n  note: the saved bytes alone do not fail under the default replay;"
                        f" the failure needs cuts={last[0].cuts!r} options={last[0].options!r}"
                    )
            return outcome
        took = time.monotonic() - began
        outcome.examples += calls[0]
        outcome.seconds = time.monotonic() - start
        rate = calls[0] / took if took > 0 else float(budget)
        batch = max(50, min(20000, int(rate * BATCH_SECONDS)))
        print(
            f"  [{target.name}] {outcome.examples} examples, {outcome.rate:.0f}/s,"
            f" {outcome.seconds:.0f}s",
            flush=True,
        )
    return outcome


def describe_failure(target: Target, exc: BaseException, case: Case | None, run_seed: int) -> str:
    lines = [f"FAILURE in target {target.name!r} (hypothesis seed {run_seed})"]
    message = str(exc).strip() or "(no message)"
    if len(message) > 2000:
        message = message[:2000] + " ..."
    lines.append(f"  error: {type(exc).__name__}: {message}")
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        where = frames[-1]
        lines.append(f"  raised at {where.filename}:{where.lineno} in {where.name}")
    if case is not None:
        lines.append(f"  minimal input: {case!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        action="append",
        choices=sorted(harness.TARGETS),
        help="a target to run (repeatable; default: all)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"total time, shared by the targets (default {DEFAULT_SECONDS:.0f})",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=10**9,
        help="stop a target after this many examples (default: time only)",
    )
    parser.add_argument("--seed", type=int, help="seed the run (default: random)")
    parser.add_argument(
        "--strict", action="store_true", help="stop on known bugs too (see KNOWN_BUGS)"
    )
    args = parser.parse_args(argv)

    names = args.target or list(harness.TARGETS)
    targets = [harness.TARGETS[name] for name in dict.fromkeys(names)]
    run_seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(run_seed)
    available = [t for t in targets if t.available()] or targets
    share = args.seconds / len(available)
    print(
        f"fuzzing {', '.join(t.name for t in targets)}: {share:.0f}s each"
        f" (seed {run_seed}; corpus {harness.CORPUS.relative_to(ROOT)})",
        flush=True,
    )
    outcomes: list[Outcome] = []
    try:
        for target in targets:
            seeds = len(harness.corpus_files(target.name))
            print(f"{target.name}: {target.summary} ({seeds} seeds)", flush=True)
            outcome = run_target(target, share, args.examples, rng, args.strict)
            outcomes.append(outcome)
            if outcome.failure:
                print(outcome.failure, flush=True)
                if outcome.saved is not None:
                    print(f"  saved as {outcome.saved.relative_to(ROOT)}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)

    print("\nsummary:")
    for outcome in outcomes:
        if outcome.skipped:
            status = f"skipped ({outcome.skipped})"
        else:
            status = "FAILED" if outcome.failure else "ok"
            status += f", {outcome.examples} examples in {outcome.seconds:.0f}s"
            status += f" ({outcome.rate:.0f}/s)"
            for bug_id, count in sorted(outcome.known.items()):
                status += f"; known bug {bug_id} hit {count}x"
        print(f"  {outcome.name:8} {status}")
    return 1 if any(o.failure for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
