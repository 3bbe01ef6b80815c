"""Template create validation (TPL-1 to TPL-3), the sanitised request (TPL-5) and the generated
runtime config (TPL-30)."""
from __future__ import annotations

from typing import Any

import pytest

from coordinator.templates.spec import GIB, parse_create, runtime_config, sanitised_request
from protocol.errors import InvalidAlias, InvalidRequest


def req(**kw: Any) -> dict[str, Any]:
    return {"request_id": "r-1", "image": "127.0.0.1:5000/app:1", **kw}


def test_defaults() -> None:
    """TPL-1, TPL-2: writable 1 GiB, 1 vCPU, 512 MiB, rootfs mode, probe started, STRICT."""
    s = parse_create(req())
    assert (s.writable_size, s.vcpus, s.memory_mib, s.snapshot_mode, s.probe, s.compat_policy) == \
        (GIB, 1, 512, "rootfs", "started", "STRICT")


@pytest.mark.parametrize("args,field,message", [
    ({"request_id": None}, "request_id", "requestID is required"),
    ({"image": None}, "image", "image is required"),
    ({"ports": [0]}, "ports", "invalid exposed port 0"),
    ({"ports": [65536]}, "ports", "invalid exposed port 65536"),
    ({"ports": ["80/icmp"]}, "ports", "invalid exposed port 80/icmp"),
    ({"env": {"1BAD": "x"}}, "env", "invalid env key"),
    ({"env": ["NOEQUALS"]}, "env", "is not KEY=VALUE"),
    ({"user": "root:"}, "user", "uid[:gid] or name[:group]"),
    ({"writable_size": (1 << 40) + 1}, "writable_size", "from 0 to"),
    ({"vcpus": 65}, "vcpus", "from 1 to 64"),
    ({"memory_mib": 63}, "memory_mib", "from 64 to 262144"),
    ({"snapshot_mode": "disk"}, "snapshot_mode", "one of rootfs, memory"),
    ({"compat_policy": "LOOSE"}, "compat_policy", "one of STRICT, GUEST_ONLY"),
    ({"probe": "http:80"}, "probe", "started, exec:CMD or delay:SECONDS"),
    ({"nodes": ["Bad_Node"]}, "nodes", "node ids"),
])
def test_invalid_requests_name_the_field(args: dict[str, Any], field: str, message: str) -> None:
    """TPL-3: InvalidRequest with details.field and the SPEC wording."""
    with pytest.raises(InvalidRequest) as ei:
        parse_create(req(**args))
    assert ei.value.details["field"] == field and message in ei.value.message


@pytest.mark.parametrize("alias", ["tpl-x", "Upper", "-lead", "a" * 65, "snap-1"])
def test_bad_alias_is_invalid_alias(alias: str) -> None:
    """TPL-3, CONV-1: alias rules → InvalidAlias."""
    with pytest.raises(InvalidAlias):
        parse_create(req(alias=alias))


def test_ports_dedup_sorted_and_env_sorted() -> None:
    """TPL-3: ports de-duplicated and sorted; env keys normalised."""
    s = parse_create(req(ports=[8080, "80", "80/tcp", "53/udp"], env={"B": "2", "A": "1"}, user="1000:1000"))
    assert s.overrides.ports == ("53/udp", "80/tcp", "8080/tcp")
    assert s.overrides.env == (("A", "1"), ("B", "2"))


def test_sanitised_request_ignores_credentials_and_order() -> None:
    """TPL-5: equal requests (any key order, credentials or not) have one digest; others differ."""
    a, da = sanitised_request("CREATE", parse_create(req(env={"B": "2", "A": "1"}, ports=[80, 22])))
    b, db = sanitised_request("CREATE", parse_create({**req(ports=[22, 80], env=["A=1", "B=2"]),
                                                      "credentials": {"username": "u", "password": "p"}}))
    assert da == db and a == b
    assert "p" not in str(a.get("credentials", ""))
    _, dc = sanitised_request("CREATE", parse_create(req(vcpus=2)))
    assert dc != da


def test_runtime_config_merges_per_tpl_30() -> None:
    """TPL-30: overrides over the image config."""
    image = {"entrypoint": ["/bin/app"], "cmd": ["--serve"], "env": ["PATH=/bin", "A=img"], "workdir": "",
             "user": "", "exposed_ports": ["80/tcp"], "labels": {"b": "2", "a": "1"}}
    plain = runtime_config(image, parse_create(req()))
    assert plain["entrypoint"] == ["/bin/app"] and plain["cmd"] == ["--serve"]
    assert (plain["workdir"], plain["user"], plain["idle"]) == ("/", "0:0", False)
    over = runtime_config(image, parse_create(req(entrypoint=["/bin/sh"], env={"A": "req"}, ports=[22])))
    assert over["entrypoint"] == ["/bin/sh"] and over["cmd"] == []  # an entrypoint override resets cmd
    assert over["env"] == ["A=req", "PATH=/bin"] and over["ports"] == ["22/tcp", "80/tcp"]
    both = runtime_config(image, parse_create(req(entrypoint=["/bin/sh"], cmd=["-c", "x"])))
    assert both["cmd"] == ["-c", "x"]
    idle = runtime_config({}, parse_create(req()))
    assert idle["idle"] is True and idle["entrypoint"] == [] and idle["cmd"] == []
