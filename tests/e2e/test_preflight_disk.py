"""A run folder on a read-only or a full disk is refused at start: exit 2, one ``config error`` line naming the
path and the fix, and nothing created (engine/coordinator/preflight.py). The disks are real tmpfs mounts;
skipped where mounting is not permitted."""

import subprocess

import pytest

from tests.e2e.test_preflight import _cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(size: str, *, read_only: bool = False):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("disk", ["read-only", "full"])
def test_a_run_folder_on_a_read_only_or_full_disk_is_refused(tmp_path, mount, disk):
    d = mount("16m", read_only=True) if disk == "read-only" else mount("64k")  # the tiny model: 138 KiB
    proc, seconds = _cli(tmp_path, f"out_dir={d / 'runs'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "config error" in l]
    assert len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    assert str(d) in line and "out_dir=" in line
    assert ("Read-only file system" in line) if disk == "read-only" else ("free" in line and "MiB" in line)
    assert list(d.iterdir()) == []  # nothing created
