"""transformers' continuous batching (``generate_batch``) as the reference of Open-AutoGLM's offline benchmarks,
run in a child process of its own.

Why a child: the reference must not run in what the engine left behind. In one process it shared the CUDA
context, allocator and library handles with the released engine, and on an H100 (transformers 5.17, torch 2.11)
every one of its 512 requests once failed inside cuDNN's attention after the engine had run there. A fresh
process gives the reference the whole device and the state any transformers user starts from, and the engine's
figures cannot be bent by it either.

``measure_reference(job)`` runs ``python -m openautoglm.ops.bench_reference JOB RESULT`` and returns its
``Throughput``; whatever stops the child (a bad checkpoint, lost requests, a crash, the time limit) is raised as
an ``InternalError`` naming the cause (one clear line from the CLI).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openautoglm.ops.bench_offline import Throughput
from openautoglm.ops.timing import settled_heap
from openautoglm.protocol.errors import ConfigError, InternalError

REFERENCE_NAME = "transformers generate_batch"
_STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True, slots=True)
class ReferenceJob:
    """One reference run: ``prompts`` through the checkpoint's model, greedy, ``output_len`` new tokens each, EOS
    ignored, after an untimed warm-up on ``warmup``. ``random_weights``: a model of the checkpoint's config with
    random weights (seeded), as ``--load-format dummy`` gives the engine; otherwise the checkpoint's weights."""

    checkpoint: str
    prompts: list[list[int]]
    output_len: int
    dtype: str = "bfloat16"
    device: str = "cuda"
    random_weights: bool = False
    seed: int = 0
    warmup: list[list[int]] = field(default_factory=list)


def measure_reference(job: ReferenceJob, timeout_s: float | None = None) -> Throughput:
    """Run ``job`` in a child Python process and return what it measured."""
    with tempfile.TemporaryDirectory(prefix="autoglm-reference-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(asdict(job)))
        cmd = [sys.executable, "-m", "openautoglm.ops.bench_reference", str(job_path), str(result_path)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise InternalError(f"the transformers reference did not finish within {timeout_s:.0f} s") from exc
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if "error" in result:
        raise InternalError(f"the transformers reference failed: {result['error']}")
    if proc.returncode != 0 or "throughput" not in result:
        tail = proc.stderr[-_STDERR_TAIL_CHARS:].strip()
        raise InternalError(f"the transformers reference process exited with status {proc.returncode}: {tail}")
    return Throughput(**result["throughput"])


def run_reference(job: ReferenceJob) -> Throughput:
    """The child's work: build the model, warm up, time ``generate_batch`` over every prompt."""
    model = _load_model(job)
    out_tokens, elapsed = timed_generate_batch(model, job.prompts, job.output_len, job.warmup)
    input_tokens = sum(map(len, job.prompts))
    return Throughput(REFERENCE_NAME, len(job.prompts), input_tokens, out_tokens, elapsed)


def _load_model(job: ReferenceJob) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, job.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"the reference's dtype must name a torch dtype, got {job.dtype!r}")
    if job.random_weights:
        hf_config = AutoConfig.from_pretrained(job.checkpoint)
        torch.manual_seed(job.seed)
        with torch.device(job.device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(job.checkpoint, dtype=dtype, attn_implementation="sdpa")
        model = model.to(job.device)
    return model.eval()


def timed_generate_batch(
    model: Any, prompts: list[list[int]], output_len: int, warmup: list[list[int]]
) -> tuple[int, float]:
    """transformers' continuous batching (``generate_batch``), greedy, no EOS, timed like the engine's run."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0, use_cuda_graph=False
    )
    # No inference_mode here: generate_batch runs its own worker thread and manages grad mode itself.
    if warmup:
        model.generate_batch(inputs=warmup, generation_config=gen_cfg)
    with settled_heap():
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=gen_cfg)
        elapsed = time.perf_counter() - start
    failed = [o.error for o in outputs.values() if o.error]
    if failed or len(outputs) != len(prompts):
        raise InternalError(
            f"transformers generate_batch lost requests: {len(failed)} failed, {len(outputs)} of {len(prompts)} "
            f"returned; first error: {failed[:1]}"
        )
    return sum(len(o.generated_tokens) for o in outputs.values()), elapsed


def main(argv: list[str]) -> int:
    """``python -m openautoglm.ops.bench_reference JOB RESULT``: the result file holds ``throughput`` or
    ``error`` (the message of what stopped the run)."""
    if len(argv) != 2:
        print("usage: python -m openautoglm.ops.bench_reference JOB.json RESULT.json", file=sys.stderr)
        return 2
    job_path, result_path = map(Path, argv)
    try:
        job = ReferenceJob(**json.loads(job_path.read_text()))
        result: dict[str, Any] = {"throughput": asdict(run_reference(job))}
        status = 0
    except Exception as exc:  # noqa: BLE001 — reported to the parent in the result file, which raises it
        result, status = {"error": f"{type(exc).__name__}: {exc}"}, 1
    result_path.write_text(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
