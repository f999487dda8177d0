"""Wheels for an offline GPU machine: what the package needs on top of what the machine's image
already holds, in one folder that travels with the working tree.

    python -m benchmarks.wheelhouse --image requirements/gpu-image.txt --python-version 3.12 \
        --output wheelhouse

The package's dependencies are resolved (uv) for the image's Python with the image's known
versions as constraints; the packages the image lacks are downloaded as wheels for that Python
(sdist-only pure-Python ones built here), and the package's own wheel is built beside them.
``image-packages.txt`` lists the image's part of the resolution (what ``make gpu-smoke`` installs
to stand in for the image on the CPU). ``benchmarks/gpu.sh`` installs from the folder with
``pip install --no-index --find-links``. The folder must stay small (``--max-mib``): the working
tree that carries it to the GPU machine is limited.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image(path: Path) -> dict[str, str | None]:
    """Package name -> version (None: present, any version), from ``name`` / ``name==version`` lines."""
    image: dict[str, str | None] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s]+))?", line)
        if match is None:
            raise SystemExit(f"{path}:{number}: expected 'name' or 'name==version', got {line!r}")
        image[canonical(match.group(1))] = match.group(2)
    return image


def resolve(image: dict[str, str | None], python_version: str) -> dict[str, str]:
    """The package's dependencies (no extras) for the image's Python and platform: name -> version."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("".join(f"{name}=={version}\n" for name, version in image.items() if version))
        constraints.flush()
        out = subprocess.run(
            [sys.executable, "-m", "uv", "pip", "compile", str(ROOT / "pyproject.toml"), "-c", constraints.name,
             "--python-version", python_version, "--python-platform", "x86_64-manylinux_2_28", "--no-header",
             "--no-annotate", "--no-emit-find-links"],
            check=True, capture_output=True, text=True,
        ).stdout
    pins = dict(line.split("==", 1) for line in out.splitlines() if "==" in line and not line.startswith("#"))
    return {canonical(name): version.strip() for name, version in pins.items()}


def fetch(name: str, version: str, python_version: str, output: Path) -> None:
    """A wheel of ``name==version`` for the image's Python: a published one, else built here (which
    must then be pure Python, or it would not run on the image)."""
    spec = f"{name}=={version}"
    download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation",
                "cp", "--python-version", python_version, *(f"--platform={p}" for p in PLATFORMS), "-d", str(output),
                spec]
    if subprocess.run(download, capture_output=True, text=True).returncode == 0:
        return
    before = set(output.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(output), spec], check=True)
    built = set(output.glob("*.whl")) - before
    impure = [w.name for w in built if not w.name.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"{spec}: no published wheel for Python {python_version}, and the one built here is "
                         f"not pure Python ({', '.join(impure)})")


def build(image_file: Path, python_version: str, output: Path, max_mib: float) -> None:
    image = read_image(image_file)
    closure = resolve(image, python_version)
    missing = {name: version for name, version in closure.items() if name not in image}
    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("*.whl"):
        old.unlink()
    for name, version in sorted(missing.items()):
        fetch(name, version, python_version, output)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(output), str(ROOT)], check=True)
    (output / "image-packages.txt").write_text(
        "".join(f"{name}=={version}\n" for name, version in sorted(closure.items()) if name in image))
    wheels = sorted(output.glob("*.whl"))
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {mib:.1f} MiB in {output} (the image provides {len(closure) - len(missing)} "
          f"of the {len(closure)} packages resolved for Python {python_version})")
    if mib > max_mib:
        raise SystemExit(f"{output}: {mib:.1f} MiB of wheels, over the {max_mib:g} MiB limit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=ROOT / "requirements" / "gpu-image.txt",
                        help="what the GPU image holds: 'name' or 'name==version' per line")
    parser.add_argument("--python-version", default="3.12", help="the image's Python (major.minor)")
    parser.add_argument("--output", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--max-mib", type=float, default=40.0, help="fail when the wheels add up to more")
    args = parser.parse_args(argv)
    build(args.image, args.python_version, args.output, args.max_mib)


if __name__ == "__main__":
    main()
