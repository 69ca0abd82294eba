"""Build and load the project's C kernels (kernels/*/*.c) on first use: no torch headers, no ninja.

A kernel is declared once as a `CKernel` (its source, extra flags and the C signatures of its entry
points); `kernel.library()` builds and loads it on first call. A source is compiled with the system's C compiler ($CC, else cc, gcc or g++, always as C) into
$MMREC_CACHE_DIR/kernels (default ~/.cache/mmrec/kernels) under a name keyed by the source, the
flags and the CPU's feature flags (-march=native code built on one CPU model may not run on
another, e.g. a shared home directory across a heterogeneous cluster), and loaded with ctypes;
a build takes about a second. It is written to a temporary name and renamed into place, so
processes starting together (Ray workers) never load a half-written library.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BASE_FLAGS = ("-x", "c", "-O3", "-march=native", "-std=c11", "-shared", "-fPIC", "-pthread")  # -x c: g++ will do too


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MMREC_CACHE_DIR", Path.home() / ".cache" / "mmrec")) / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _compiler() -> str:
    wanted = os.environ.get("CC")
    compiler = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, ("cc", "gcc", "g++"))), None)
    if not compiler:
        looked = f"$CC={wanted!r} is not an executable" if wanted else "no cc, gcc or g++ on PATH"
        raise BuildError(f"no C compiler ({looked}); install one (Debian: apt install gcc) or set CC")
    return compiler


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` (if not already in the cache) and load it. Raises BuildError saying why not."""
    compiler = _compiler()
    flags = BASE_FLAGS + extra_flags
    headers = b"".join(h.read_bytes() for h in sorted(Path(__file__).parent.glob("*.h")))  # what the sources include
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            try:
                done = subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"],
                                      capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise BuildError(f"{compiler} could not compile {source}: {error}") from error
            if done.returncode != 0:
                raise BuildError(f"{compiler} failed on {source} (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        log.info("built the C kernel %s: %s", source.name, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        raise BuildError(f"could not load {target}: {error}; delete it to rebuild") from error


class CKernel:
    """One C source: `library()` is (the loaded ctypes library with its entry points typed, "") once
    built, or (None, why not); the build is tried once per process."""

    def __init__(self, source: Path, signatures: dict[str, tuple[list, type]], extra_flags: tuple[str, ...] = ()):
        self.source, self.signatures, self.extra_flags = source, signatures, extra_flags
        self._warned = False

    @functools.cached_property
    def _loaded(self) -> tuple[ctypes.CDLL | None, str]:
        try:
            lib = build(self.source, self.extra_flags)
        except BuildError as error:
            return None, str(error)
        for name, (argtypes, restype) in self.signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
        return lib, ""

    def library(self) -> tuple[ctypes.CDLL | None, str]:
        return self._loaded

    def available(self) -> tuple[bool, str]:
        """(True, "") when the kernel is built and loaded, else (False, why not)."""
        lib, why = self._loaded
        return lib is not None, why

    def choose(self, fits: bool, *, forced: bool, caller: str, fallback: str) -> bool:
        """Whether `caller` should run this kernel on inputs that do (`fits`) or do not fit it.

        Inputs that fit run here once the kernel is built. If it cannot be built, a forced choice
        raises saying why; otherwise `fallback` runs, with one warning per process (not one per
        call: the model calls its kernels every layer of every step). Whether forced inputs that
        do not fit are an error is the caller's to say, with its own message."""
        if not fits:
            return False
        lib, why = self._loaded
        if lib is not None:
            return True
        if forced:
            raise RuntimeError(f"{caller}: the C kernel {self.source.name} could not be built: {why}")
        if not self._warned:
            self._warned = True
            log.warning("%s: the C kernel %s could not be built (%s); using %s, slower on CPU",
                        caller, self.source.name, why, fallback)
        return False
