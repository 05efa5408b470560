"""Regenerate (or check) the Python gRPC modules in dmoe/wire/proto/ from proto/expert.proto.

    python -m dmoe.wire.protogen          # rewrite dmoe/wire/proto/expert_pb2*.py
    python -m dmoe.wire.protogen --check  # exit 1 if they are out of date

Generation is pinned to the grpcio-tools version in pyproject's test extras, so the output
is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
OUT_PACKAGE = "dmoe/wire/proto"  # virtual include path, so generated imports read `from dmoe.wire.proto import ...`
GENERATED = ("expert_pb2.py", "expert_pb2_grpc.py", "expert_pb2.pyi")


def generate(out_root: Path) -> None:
    """Run protoc (from grpcio-tools) on every .proto in proto/, writing under out_root/dmoe/proto."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    (out_root / OUT_PACKAGE).mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        args = [
            "protoc",
            f"-I{OUT_PACKAGE}={PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"{OUT_PACKAGE}/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def stale_files() -> list[str]:
    """Names of generated files that differ from what protoc produces now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in GENERATED:
            fresh = (Path(tmp) / OUT_PACKAGE / name).read_bytes()
            current = REPO / OUT_PACKAGE / name
            if not current.exists() or current.read_bytes() != fresh:
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check, exit 1 when out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"out of date with proto/: {', '.join(stale)}; run `python -m dmoe.wire.protogen`", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    generate(REPO)
    print(f"wrote {', '.join(GENERATED)} in {OUT_PACKAGE}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
