"""Reproducible generation of the KServe v2 gRPC stubs checked in under ``server/grpc/proto/``.

Run ``python -m openautoglm.server.grpc.codegen`` after editing ``grpc_predict_v2.proto`` (grpcio-tools, a dev
dependency, must be installed); ``--check`` exits 1 when the checked-in stubs differ from a fresh generation.

Two fixed edits follow protoc:

* The messages are registered in a private descriptor pool, not protobuf's default one. Triton's own stubs
  (shipped by ``tritonclient``) define the same ``inference.*`` symbols, and the default pool refuses a second
  file with the same symbols, so without this the server and tritonclient could not live in one process.
  Message full names never travel on the wire; only the service path ``/inference.GRPCInferenceService/...``
  does, and that is unchanged.
* A header turns off ruff's lint and formatter for the generated files, so that ``ruff format``
  cannot make them drift from protoc's output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent / "proto"
SRC_ROOT = PACKAGE_DIR.parents[3]  # .../src, so that generated imports read ``openautoglm.server.grpc.proto``
PROTO_RELPATH = "openautoglm/server/grpc/proto/grpc_predict_v2.proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")

_HEADER = "# ruff: noqa\n# fmt: off\n"
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile("


def _postprocess(name: str, text: str) -> str:
    if name == "grpc_predict_v2_pb2.py":
        if text.count(_DEFAULT_POOL) != 1:
            raise RuntimeError("protoc output changed shape: cannot find the default-pool registration to replace")
        text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
    return _HEADER + text


def generate() -> dict[str, str]:
    """Run protoc on the checked-in .proto and return {file name: content} of the stubs it should produce."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{SRC_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_RELPATH,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_RELPATH}")
        out_dir = Path(tmp) / Path(PROTO_RELPATH).parent
        return {name: _postprocess(name, (out_dir / name).read_text()) for name in GENERATED}


def stale_files() -> list[str]:
    """Names of checked-in stubs that differ from (or are missing against) a fresh generation."""
    fresh = generate()
    stale = []
    for name, text in fresh.items():
        path = PACKAGE_DIR / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale


def write() -> list[Path]:
    """Regenerate the stubs in place; return the files written."""
    written = []
    for name, text in generate().items():
        path = PACKAGE_DIR / name
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate Open-AutoGLM's KServe v2 gRPC stubs.")
    parser.add_argument("--check", action="store_true", help="only report stubs that differ; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PACKAGE_DIR / name} (run python -m openautoglm.server.grpc.codegen)")
        return 1 if stale else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
