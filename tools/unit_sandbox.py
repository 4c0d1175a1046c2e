#!/usr/bin/env python3
"""Run a command under the seccomp and capability settings of a systemd unit, without systemd.

Where systemd is not PID 1 (a container, a build machine) ``systemctl start`` cannot show whether the service still
works inside its unit's sandbox.  This applies the part of the sandbox a process can apply to itself, the way systemd
252 applies it, and then execs the command:

* ``SystemCallFilter=`` (groups resolved by ``systemd-analyze syscall-filter``; the first line sets allow-list or
  deny-list mode, ``~`` lines remove from an allow-list) with ``SystemCallErrorNumber=`` and native architecture;
* ``MemoryDenyWriteExecute=yes`` as systemd's seccomp rules: no ``mmap`` writable and executable, no ``mprotect`` /
  ``pkey_mprotect`` adding execute, no ``shmat`` with ``SHM_EXEC`` (EPERM);
* ``RestrictAddressFamilies=``: ``socket()`` of any other family fails with EAFNOSUPPORT;
* ``NoNewPrivileges=`` and an empty ``CapabilityBoundingSet=``: the bounding, inheritable and ambient sets are
  emptied, so even a root caller holds no capability after the exec.

Not applied, because the service manager builds them with namespaces, cgroups or BPF: ``User=``, ``ProtectSystem=``,
``PrivateTmp=``, ``PrivateDevices=``, ``ProtectProc=``, ``PrivateMounts=``, ``ProtectClock=``'s device rule,
``DeviceAllow=``, ``IPAddressDeny=``/``IPAddressAllow=``, ``MemoryMax=``.

Use it to try the service, or a camera vendor's GenTL producer, against the unit before deploying::

    python tools/unit_sandbox.py systemd/weakrest-edge.service -- weakrest-edge run --config edge.yaml
    python tools/unit_sandbox.py systemd/weakrest-edge.service --print     # what would be applied

Needs ``systemd-analyze`` and libseccomp (``libseccomp.so.2``, a dependency of systemd); Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# libseccomp's ABI (seccomp.h)
_ACT_ALLOW = 0x7FFF0000
_CMP_EQ, _CMP_GE, _CMP_MASKED_EQ = 4, 5, 7
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000
_AF_MAX = 64  # above every address family Linux defines (46 in 6.x)
# prctl(2)
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _errno_action(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@dataclass
class Sandbox:
    """What a unit's [Service] section asks for, in the terms this tool applies."""

    allow_list: bool | None = None  # None: no SystemCallFilter=
    syscalls: set[str] = field(default_factory=set)  # the allow-list, or the deny-list
    errno_name: str | None = None  # SystemCallErrorNumber=; None: kill the process (systemd's default)
    memory_deny_write_execute: bool = False
    address_families: set[str] | None = None  # None: any family
    no_new_privileges: bool = False
    empty_bounding_set: bool = False


def unit_settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment in the unit's [Service] sections, in order (repeats kept)."""
    out, section = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def syscall_groups(systemd_analyze: str) -> dict[str, list[str]]:
    """``@group`` -> members (syscalls and nested ``@groups``), as this systemd knows them."""
    text = subprocess.run([systemd_analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in groups:
                raise ValueError(f"unknown system call group {name}")
            out |= _expand(groups[name], groups)
        else:
            out.add(name)
    return out


def parse_unit(text: str, groups: dict[str, list[str]]) -> Sandbox:
    """The sandbox settings of a unit, with systemd's rules for repeated ``SystemCallFilter=`` lines."""
    box = Sandbox()
    for key, value in unit_settings(text):
        if key == "SystemCallFilter":
            if not value:
                box.allow_list, box.syscalls = None, set()
                continue
            invert = value.startswith("~")
            names = _expand(value.lstrip("~").split(), groups)
            if box.allow_list is None:
                box.allow_list, box.syscalls = not invert, set(names)
            elif box.allow_list != invert:  # same polarity as the first line: add
                box.syscalls |= names
            else:
                box.syscalls -= names
        elif key == "SystemCallErrorNumber":
            box.errno_name = value or None
        elif key == "MemoryDenyWriteExecute":
            box.memory_deny_write_execute = value.lower() in ("yes", "true", "1", "on")
        elif key == "RestrictAddressFamilies":
            if value.startswith("~"):
                raise ValueError("RestrictAddressFamilies=~... (a deny-list) is not emulated")
            if not value or value == "none":
                box.address_families = None if not value else set()
            else:
                box.address_families = (box.address_families or set()) | set(value.split())
        elif key == "NoNewPrivileges":
            box.no_new_privileges = value.lower() in ("yes", "true", "1", "on")
        elif key == "CapabilityBoundingSet":
            box.empty_bounding_set = value == ""
    return box


class _Seccomp:
    """The few libseccomp calls needed, through ctypes (no Python binding to install)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(_ArgCmp)]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def number(self, name: str) -> int | None:
        """The syscall's number on this architecture; None when it has none here (e.g. ``oldolduname``)."""
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return nr if nr >= 0 else None

    def load(self, default: int, rules: list[tuple[int, int, list[tuple[int, int, int, int]]]]) -> None:
        """One filter: ``default`` action, then (action, syscall number, [(arg, op, a, b)]) rules."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, nr, cmps in rules:
                arr = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add_array(syscall {nr}): {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


def _address_family(name: str) -> int:
    import socket

    value = getattr(socket, name, None)
    if not isinstance(value, int):
        raise ValueError(f"unknown address family {name}")
    return int(value)


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """Empty the bounding, ambient and inheritable sets: after exec even root holds no capability."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: not a capability of this kernel
                raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)} (needs CAP_SETPCAP)")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for d in data:
        d.inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def apply(box: Sandbox) -> list[str]:
    """Apply ``box`` to this process (irreversibly); returns one line per thing applied."""
    libc = ctypes.CDLL(None, use_errno=True)
    done = []
    if box.empty_bounding_set:
        _drop_capabilities(libc)
        done.append("capabilities: bounding, inheritable and ambient sets emptied")
    if box.no_new_privileges or box.allow_list is not None or box.memory_deny_write_execute:
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        done.append("no_new_privs set")
    seccomp = _Seccomp()
    refuse = _errno_action(getattr(errno, box.errno_name)) if box.errno_name else 0x80000000  # KILL_PROCESS
    if box.memory_deny_write_execute:
        eperm = _errno_action(errno.EPERM)
        rules = [(eperm, seccomp.number("mmap"), [(2, _CMP_MASKED_EQ, _PROT_WRITE | _PROT_EXEC,
                                                   _PROT_WRITE | _PROT_EXEC)])]
        rules += [(eperm, seccomp.number(n), [(2, _CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC)])
                  for n in ("mprotect", "pkey_mprotect")]
        rules.append((eperm, seccomp.number("shmat"), [(2, _CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC)]))
        seccomp.load(_ACT_ALLOW, [r for r in rules if r[1] is not None])
        done.append("memory deny write+execute (mmap W+X, mprotect/pkey_mprotect +X, shmat SHM_EXEC: EPERM)")
    if box.address_families is not None:
        allowed = {_address_family(n) for n in box.address_families}
        socket_nr = seccomp.number("socket")
        eafnosupport = _errno_action(errno.EAFNOSUPPORT)
        rules = [(eafnosupport, socket_nr, [(0, _CMP_EQ, af, 0)]) for af in range(_AF_MAX) if af not in allowed]
        rules.append((eafnosupport, socket_nr, [(0, _CMP_GE, _AF_MAX, 0)]))
        seccomp.load(_ACT_ALLOW, rules)
        done.append(f"address families: {' '.join(sorted(box.address_families))} only")
    # last, as systemd does: it refuses seccomp() itself, so no filter could be added after it
    if box.allow_list is not None:
        numbers = sorted({nr for nr in map(seccomp.number, box.syscalls) if nr is not None})
        if box.allow_list:
            seccomp.load(refuse, [(_ACT_ALLOW, nr, []) for nr in numbers])
        else:
            seccomp.load(_ACT_ALLOW, [(refuse, nr, []) for nr in numbers])
        done.append(f"system call {'allow' if box.allow_list else 'deny'}-list of {len(numbers)} calls, "
                    f"others {'fail with ' + box.errno_name if box.allow_list and box.errno_name else 'refused'}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     usage="%(prog)s UNIT [--print] [-- COMMAND [ARGS...]]")
    parser.add_argument("unit", type=Path, help="the unit file (drop-ins appended as further [Service] sections)")
    parser.add_argument("--print", action="store_true", help="print what would be applied and exit")
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    exe = shutil.which("systemd-analyze")
    if exe is None:
        parser.error("systemd-analyze not found (Debian: apt-get install systemd)")
    box = parse_unit(args.unit.read_text(encoding="utf-8"), syscall_groups(exe))
    if args.print:
        print(f"SystemCallFilter: {'allow' if box.allow_list else 'deny'}-list of {len(box.syscalls)} names")
        print("  " + " ".join(sorted(box.syscalls)))
        print(f"SystemCallErrorNumber: {box.errno_name}; MemoryDenyWriteExecute: {box.memory_deny_write_execute}")
        print(f"RestrictAddressFamilies: {box.address_families}; NoNewPrivileges: {box.no_new_privileges}; "
              f"empty CapabilityBoundingSet: {box.empty_bounding_set}")
        return 0
    if not command:
        parser.error("no command given (… -- COMMAND [ARGS...])")
    for line in apply(box):
        print(f"unit_sandbox: {line}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
