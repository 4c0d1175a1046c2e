"""systemd/weakrest-edge.service: the settings the service relies on, and ``systemd-analyze verify``.

``verify`` refuses a unit whose ExecStart= binary is missing, so the check runs on a copy whose ExecStart= names
this Python; everything else (User=, ExecReload=/bin/kill, sandboxing) is verified as shipped.  It needs no
running systemd (works as root in a container).  ``make test`` installs it where it can (Debian: ``systemd``,
plus ``procps`` for /bin/kill, see ``tools/system_deps.sh``); elsewhere the two checks skip, naming the package.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "weakrest-edge.service"
README = UNIT.parent / "README.md"


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys and ';'/'#' comments; strict=False keeps the last value of a repeated key
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                   inline_comment_prefixes=None)
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read_string(UNIT.read_text(encoding="utf-8"))
    return cp


def test_unit_has_the_settings_the_service_relies_on():
    svc = _unit()["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure", "RestartSec": "5",
        "TimeoutStopSec": "30", "ExecReload": "/bin/kill -HUP $MAINPID",
        "ExecStart": "/opt/weakrest/venv/bin/weakrest-edge run --config /etc/weakrest/edge.yaml",
        "User": "weakrest", "Group": "weakrest", "StateDirectory": "weakrest", "ConfigurationDirectory": "weakrest",
        "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/weakrest", "ProtectHome": "yes",
        "PrivateTmp": "yes", "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "LockPersonality": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native", "MemoryMax": "1G", "PrivateDevices": "no",
    }
    assert {k: svc.get(k) for k in expected} == expected
    assert set(svc["SupplementaryGroups"].split()) == {"video", "plugdev"}
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "DynamicUser" not in svc and int(svc["LimitNOFILE"]) >= 1024
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"
    # the default queue directory (edge config queue.dir) is inside the writable state directory
    from edge_runtime.service.config import QueueConfig

    assert QueueConfig().dir.is_relative_to(svc["ReadWritePaths"])
    text = UNIT.read_text(encoding="utf-8")
    assert "#Environment=GENICAM_GENTL64_PATH=" in text  # the commented example
    assert README.is_file() and "journalctl -u weakrest-edge" in README.read_text(encoding="utf-8")


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install --no-install-recommends systemd procps)")
    return exe


def _verify(exe: str, unit_text: str, tmp_path: Path) -> tuple[int, list[str], Path]:
    """``systemd-analyze verify`` on a copy of the unit with ExecStart= pointing at this Python."""
    python = sys.executable.replace("\\", "\\\\").replace('"', '\\"')
    text, n = re.subn(r"(?m)^ExecStart=\S+.*$", f'ExecStart="{python}" -c pass', unit_text)
    assert n == 1, "expected exactly one ExecStart= line"
    path = tmp_path / UNIT.name  # same name: verify derives the unit type and name from it
    path.write_text(text, encoding="utf-8")
    # --man=no: no man pages in CI; --recursive-errors=no: judge this unit, not the distribution's targets it
    # names (also makes unknown keys and bad values exit non-zero, not only print a warning)
    proc = subprocess.run([exe, "verify", "--man=no", "--recursive-errors=no", str(path)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0",
                                                                          "SYSTEMD_PAGER": ""})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, lines, path


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    exe = _systemd_analyze()
    if not os.access("/bin/kill", os.X_OK):
        pytest.skip("/bin/kill (the unit's ExecReload=) is missing: systemd-analyze verify would refuse the unit "
                    "(Debian: apt-get install procps)")
    rc, lines, path = _verify(exe, UNIT.read_text(encoding="utf-8"), tmp_path)
    ours = [ln for ln in lines if path.name in ln or str(path) in ln]
    assert rc == 0 and not ours, f"systemd-analyze verify rc={rc}:\n" + "\n".join(lines)


def test_systemd_analyze_verify_catches_a_bad_unit(tmp_path):
    """The check above means something: the same invocation rejects a typo and a bad value."""
    exe = _systemd_analyze()
    text = UNIT.read_text(encoding="utf-8")
    broken = text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes").replace("WatchdogSec=30", "WatchdogSec=soon")
    rc, lines, path = _verify(exe, broken, tmp_path)
    assert rc != 0
    joined = "\n".join(lines)
    assert "Unknown key 'NoNewPrivilege'" in joined and "Failed to parse sec value" in joined
