"""Build driverd's wheel from a clean copy of the source tree, and install it into a venv outside the checkout.

The copy holds the files git would commit (tracked plus untracked-but-not-ignored), so a stale `build/` or an
audit log under `var/` never leaks into the wheel, and building never rewrites the checkout's egg-info while
other tests read entry points from it. Used by tests/install and by .ci/run:

    python tests/install/wheel.py OUTDIR     # prints the wheel's path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "var", ".*_cache",
                                  ".hypothesis")


def source_files(root: Path = ROOT) -> list[Path]:
    """Paths (relative to root) of the source tree: git's view when root is a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [Path(p) for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_source(dest: Path, root: Path = ROOT) -> Path:
    files = source_files(root)
    if not files:  # not a git work tree (e.g. an unpacked tarball): everything but the usual build litter
        shutil.copytree(root, dest, ignore=_IGNORED, symlinks=True)
        return dest
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel, follow_symlinks=False)
    return dest


def build_wheel(out: Path, root: Path = ROOT) -> Path:
    """`pip wheel --no-deps` of a clean copy of root; returns the wheel's path."""
    src = copy_source(out / "src", root)
    dist = out / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
                   check=True, cwd=out, stdout=subprocess.DEVNULL)
    wheels = sorted(dist.glob("driverd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def venv_borrowing_deps(wheel: Path, dest: Path) -> Path:
    """A new venv with only the wheel installed in it; its dependencies are borrowed from this interpreter's
    site-packages through a .pth line (fast, no index). Such a line adds a directory to sys.path without
    processing the .pth files in it, so an editable install of driverd there stays invisible: driverd can only
    come from the wheel. Returns the venv's bin directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, cwd=dest, env=env, stdout=subprocess.DEVNULL)
    return dest / "bin"


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve()
    target.mkdir(parents=True, exist_ok=True)
    print(build_wheel(target))
