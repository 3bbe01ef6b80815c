"""The guest side of the qemu driver as pure logic: the reproducible initramfs (RT-5), the
guest image version (RT-6) and the runtime-config channel the init sources (RT-7)."""
from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from agent.runtime import guest
from protocol.errors import InvalidRequest, RuntimeFailed


def fake_kernel(tmp_path: Path) -> tuple[Path, Path]:
    """A kernel file and a module tree in the Makefile's cache layout; modules carry modinfo."""
    boot = tmp_path / "cache" / "boot"
    boot.mkdir(parents=True)
    kernel = boot / "vmlinuz-6.1.0-99-cloud-amd64"
    kernel.write_bytes(b"kernel bytes")
    mods = tmp_path / "cache" / "lib" / "modules" / "6.1.0-99-cloud-amd64" / "kernel" / "drivers"
    deps = {"virtio_ring": "", "virtio": "virtio_ring", "virtio_pci_legacy_dev": "", "virtio_pci_modern_dev": "",
            "virtio_pci": "virtio,virtio_ring,virtio_pci_legacy_dev,virtio_pci_modern_dev",
            "virtio_mmio": "virtio,virtio_ring", "virtio_blk": "virtio,virtio_ring", "virtio_console": "virtio"}
    for name, dep in deps.items():
        sub = mods / ("block" if name == "virtio_blk" else "char" if name == "virtio_console" else "virtio")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{name}.ko").write_bytes(b"\x7fELF...\0license=GPL\0depends=" + dep.encode() + b"\0name=" +
                                         name.encode() + b"\0")
    return kernel, mods


def newc_entries(data: bytes) -> list[tuple[str, int]]:
    """(name, mtime) of each entry of a newc archive."""
    out, off = [], 0
    while True:
        head = data[off:off + 110]
        assert head[:6] == b"070701"
        fields = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, size, mtime = fields[11], fields[6], fields[5]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        off = off + 110 + namesize
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out.append((name, mtime))
        off += size + (-size % 4)


def test_initramfs_is_reproducible_and_versioned(tmp_path: Path) -> None:
    """RT-5, RT-6: same inputs → same bytes (sorted, mtime 0, gzip mtime 0); the version is
    <release>+<12 hex of sha256(kernel ‖ initramfs)>."""
    kernel, _ = fake_kernel(tmp_path)
    one = guest.build(str(kernel), "", str(tmp_path / "a"))
    two = guest.build(str(kernel), "", str(tmp_path / "b"))
    data = Path(one.initramfs).read_bytes()
    assert data == Path(two.initramfs).read_bytes() and one.version == two.version
    assert data[4:8] == b"\0\0\0\0"  # gzip MTIME
    import hashlib
    assert one.version == "6.1.0-99-cloud-amd64+" + hashlib.sha256(b"kernel bytes" + data).hexdigest()[:12]
    entries = newc_entries(gzip.decompress(data))
    names = [n for n, _ in entries]
    assert names == sorted(names) and all(m == 0 for _, m in entries)
    assert {"init", "bin/busybox", "lib/modules/virtio_blk.ko", "lib/modules/virtio_console.ko"} <= set(names)
    kernel.write_bytes(b"another kernel")
    assert guest.build(str(kernel), "", str(tmp_path / "c")).version != one.version


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    """RT-5: every module comes after what its modinfo ``depends=`` names."""
    kernel, mods = fake_kernel(tmp_path)
    order = [n for n, _ in guest.module_order(guest.modules_dir(str(kernel), ""))]
    assert set(order) == set(guest.MODULES)
    pos = {n: i for i, n in enumerate(order)}
    assert pos["virtio_ring"] < pos["virtio"] < pos["virtio_blk"]
    assert pos["virtio_pci_legacy_dev"] < pos["virtio_pci"] and pos["virtio"] < pos["virtio_console"]


def test_missing_kernel_is_named(tmp_path: Path) -> None:
    """RT-5: a configured kernel that is not there is an error naming the key."""
    with pytest.raises(RuntimeFailed, match="runtime.guest_kernel"):
        guest.find_kernel(str(tmp_path / "nope"))


def sourced(tmp_path: Path, text: bytes) -> list[str]:
    """Source the config with a real busybox sh the way the init does; return argv, env args,
    workdir, user, probe, NUL-separated."""
    cfg = tmp_path / "config.env"
    cfg.write_bytes(text)
    script = (f'. {cfg}; eval "set -- $TC_ARGV"; printf "%s\\0" "$@"; printf "|\\0"; '
              'eval "set -- $TC_ENVARGS"; printf "%s\\0" "$@"; printf "|\\0%s\\0%s\\0%s\\0" '
              '"$TC_WORKDIR" "$TC_USER" "$TC_PROBE"')
    out = subprocess.run(["/bin/busybox", "sh", "-c", script], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def test_config_channel_round_trips_through_the_shell(tmp_path: Path) -> None:
    """RT-7: argv and env survive quotes, spaces, newlines and $; the disk is whole blocks."""
    argv = ["/bin/sh", "-c", "echo 'it''s' \"$HOME\" $(x)\nnext"]
    env = {"B": "two words", "A": "it's $X\n`y`"}
    text = guest.config_env({"entrypoint": argv[:1], "cmd": argv[1:], "env": env, "workdir": "/srv app",
                             "user": "app:app"}, "exec:test -e /ready")
    assert len(text) % guest.CONFIG_BLOCK == 0
    got = sourced(tmp_path, text)
    sep = got.index("|")
    assert got[:sep] == argv
    rest = got[sep + 1:]
    sep2 = rest.index("|")
    assert rest[:sep2] == ["A=it's $X\n`y`", "B=two words"]  # sorted by key (TPL-30)
    assert rest[sep2 + 1:] == ["/srv app", "app:app", "exec:test -e /ready"]


def test_config_defaults_and_idle(tmp_path: Path) -> None:
    """RT-7, RT-8: no entrypoint and no cmd → empty argv (the init idles); workdir / and user 0:0."""
    cfg = tmp_path / "config.env"
    cfg.write_bytes(guest.config_env({}, "started"))
    out = subprocess.run(["/bin/busybox", "sh", "-c", f'. {cfg}; printf "[%s][%s][%s][%s][%s]" "$TC_ARGV" '
                          '"$TC_ENVARGS" "$TC_WORKDIR" "$TC_USER" "$TC_PROBE"'], capture_output=True, check=True)
    assert out.stdout == b"[][][/][0:0][started]"


@pytest.mark.parametrize("rc, field", [({"env": {"1BAD": "x"}}, "runtime_config.env"),
                                       ({"entrypoint": "sh"}, "runtime_config.entrypoint"),
                                       ({"cmd": ["a\0b"]}, "runtime_config.cmd"),
                                       ({"workdir": "/a\nb"}, "workdir")])
def test_bad_runtime_config_is_invalid_request(rc: dict, field: str) -> None:
    """RT-7, §1: what cannot reach the guest intact is InvalidRequest naming the field."""
    with pytest.raises(InvalidRequest) as err:
        guest.config_env(rc, "started")
    assert err.value.details["field"] == field
