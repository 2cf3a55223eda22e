"""The transformers reference of the offline benchmarks, run the way the benchmarks run it: a real child
process over the demo checkpoint on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from openautoglm.ops.bench_reference import REFERENCE_NAME, ReferenceJob, main, measure_reference
from openautoglm.protocol.errors import InternalError

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]


def _job(checkpoint: Path | str, **overrides: object) -> ReferenceJob:
    fields = {"prompts": PROMPTS, "output_len": 3, "dtype": "float32", "device": "cpu", "warmup": [[1, 2, 3]]}
    return ReferenceJob(str(checkpoint), **(fields | overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize("random_weights", [False, True], ids=["checkpoint-weights", "random-weights"])
def test_reference_generates_every_token_it_is_asked_for(demo_dir: Path, random_weights: bool) -> None:
    result = measure_reference(_job(demo_dir, random_weights=random_weights))
    assert result.name == REFERENCE_NAME
    assert (result.num_requests, result.input_tokens, result.output_tokens) == (3, 13, 9)
    assert result.elapsed_s > 0


def test_a_missing_checkpoint_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(InternalError, match="reference failed") as info:
        measure_reference(_job(missing))
    assert "no-such-checkpoint" in str(info.value)


def test_a_bad_dtype_is_refused_by_name(demo_dir: Path) -> None:
    with pytest.raises(InternalError, match="dtype must name a torch dtype, got 'float7'"):
        measure_reference(_job(demo_dir, dtype="float7"))


def test_a_reference_past_its_time_limit_is_stopped(demo_dir: Path) -> None:
    with pytest.raises(InternalError, match="did not finish within 1 s"):
        measure_reference(_job(demo_dir), timeout_s=1.0)


def test_the_child_entry_point_wants_a_job_and_a_result_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err
