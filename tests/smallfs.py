"""
A real small file system for tests that need a disk that really fills: a tmpfs mounted for one test.

Mounting needs root (CAP_SYS_ADMIN); the tests run as root here and in CI.  Where mounting is not
allowed the test is skipped with the reason, never run against a disk that cannot fill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase


def mount_tmpfs(case: SynchronousTestCase, size: str, options: str = "") -> str:
    """
    Mount a fresh tmpfs of C{size} (as mount(8) takes it: C{4m}) for C{case}; unmounted when the
    test's cleanups run (register this before anything that keeps files open on it).  Its path.

    @raise SkipTest: not Linux, no mount(8), not root, or the mount was refused.
    """
    if not sys.platform.startswith("linux"):
        raise SkipTest("a small tmpfs needs Linux")
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        raise SkipTest("mount(8)/umount(8) not found: cannot make a small file system that really fills")
    if os.geteuid() != 0:
        raise SkipTest("mounting a small tmpfs needs root (CAP_SYS_ADMIN); CI runs the tests as root")
    path = os.path.abspath(case.mktemp())
    os.makedirs(path)
    opts = f"size={size},mode=0755" + (f",{options}" if options else "")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise SkipTest(f"mounting a tmpfs is not allowed here: {result.stderr.strip() or result.returncode}")

    def unmount() -> None:
        if subprocess.run([umount, path], capture_output=True).returncode != 0:
            subprocess.run([umount, "-l", path], capture_output=True)  # still busy: detach it lazily

    case.addCleanup(unmount)
    return path


def free_bytes(path: str) -> int:
    """Bytes free for an unprivileged user on the file system holding C{path} (what the store checks)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def blind_statvfs(case: SynchronousTestCase) -> None:
    """
    Make C{os.statvfs} report every file system as empty for the rest of C{case}, so the store
    writes until the real small file system answers ENOSPC (as when another process fills it).
    """
    real = os.statvfs

    def empty(path: str | int) -> os.statvfs_result:
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, st.f_blocks, st.f_blocks,
                                  st.f_files, st.f_files, st.f_files, st.f_flag, st.f_namemax))

    case.patch(os, "statvfs", empty)


def unwritable_dir(case: SynchronousTestCase) -> str:
    """
    An existing directory this process cannot create files in: a read-only tmpfs when root (whom
    permission bits do not stop), else a directory of mode 0555.

    @raise SkipTest: root, and mounting is not allowed.
    """
    if os.geteuid() == 0:
        return mount_tmpfs(case, "64k", "ro")
    path = os.path.abspath(case.mktemp())
    os.makedirs(path)
    os.chmod(path, 0o555)
    case.addCleanup(os.chmod, path, 0o755)
    return path
