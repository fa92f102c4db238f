"""Detection rules: loading and validating rule files, matching events against them.

A rule file is TOML with one `[[rule]]` table per rule. The rule's condition lives in
`[rule.when]`: every field given must match (AND), a list inside a field is OR. When a rule
needs alternatives across fields (say, a `module_load` event *or* a `process_start` of
`insmod`), `when` may instead be an array of tables (`[[rule.when]]`); the rule matches when
any of them does.

Pure: no I/O beyond reading the rule files, no transport imports.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import math
import operator
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn, cast

from hub.models import EVENT_KINDS, SEVERITY_ORDER, Event, Severity

__all__ = [
    "ARGV_MATCH_LIMIT",
    "Check",
    "Condition",
    "ProcessContext",
    "Rule",
    "RuleError",
    "RuleSet",
    "load_rules",
    "parse_rule",
    "parse_rules",
]

RULE_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TACTIC_PATTERN = re.compile(r"TA\d{4}")
TECHNIQUE_PATTERN = re.compile(r"T\d{4}(?:\.\d{3})?")
MAX_WEIGHT = 1000.0
# argv_regex sees at most this much of the joined command line: an agent may send up to
# 1 MiB of argv, and a careless regex on that much text can stall the scoring loop.
ARGV_MATCH_LIMIT = 32 * 1024

_RULE_KEYS = frozenset(
    {"id", "name", "description", "severity", "weight", "tactics", "techniques", "tags", "when"}
)


class RuleError(Exception):
    """A rule file or rule definition is invalid; the message names file, rule and field."""


@dataclass(frozen=True, slots=True)
class ProcessContext:
    """What the hub knows of the event's process and its parent (from earlier events)."""

    exe: str | None = None
    comm: str | None = None
    parent_exe: str | None = None
    parent_comm: str | None = None


Check = Callable[[Event, ProcessContext], bool]


@dataclass(frozen=True, slots=True)
class Condition:
    """One AND-group of compiled checks, applicable to events of `kinds`."""

    kinds: frozenset[str]
    checks: tuple[Check, ...] = ()
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def test(self, event: Event, ctx: ProcessContext) -> bool:
        """Return whether every check passes; the caller has already checked the kind."""
        for check in self.checks:  # noqa: SIM110 -- hot path, no generator allocation
            if not check(event, ctx):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    """A detection rule: metadata for people, a condition for events."""

    id: str
    name: str
    description: str
    severity: Severity
    weight: float
    tactics: tuple[str, ...]
    techniques: tuple[str, ...]
    tags: tuple[str, ...]
    conditions: tuple[Condition, ...] = field(repr=False)

    def matches(self, event: Event, ctx: ProcessContext) -> bool:
        """Return whether the event satisfies any of the rule's conditions."""
        kind = event.get("kind")
        return any(kind in condition.kinds and condition.test(event, ctx) for condition in self.conditions)

    @property
    def mitre(self) -> list[str]:
        """Return the MITRE ATT&CK tactic and technique ids, for display."""
        return [*self.tactics, *self.techniques]

    @property
    def kinds(self) -> frozenset[str]:
        """Return every event kind this rule can match."""
        return frozenset[str]().union(*(c.kinds for c in self.conditions))


# Per kind: each rule with the check tuples of its conditions that apply to that kind.
_Candidates = tuple[tuple[Rule, tuple[tuple[Check, ...], ...]], ...]


class RuleSet:
    """An immutable collection of rules, indexed by event kind for matching."""

    __slots__ = ("_by_id", "_by_kind", "_gates", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        by_id: dict[str, Rule] = {}
        for rule in rules:
            if rule.id in by_id:
                raise RuleError(f"rule {rule.id!r}: duplicate rule id")
            by_id[rule.id] = rule
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_id = by_id
        self._by_kind = _index_by_kind(self.rules)
        self._gates = _gates_by_kind(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        """Return the rule with this id, if any."""
        return self._by_id.get(rule_id)

    def may_match(self, event: Event) -> bool:
        """Return False when no rule can match `event`, whatever its process: a cheap pre-check."""
        kind = event.get("kind", "")
        if kind not in self._by_kind:
            return False
        gate = self._gates.get(kind)
        return gate is None or gate(event)

    def match(self, event: Event, ctx: ProcessContext) -> list[Rule]:
        """Return the rules the event matches, in rule-set order (callers gate with `may_match`)."""
        matched: list[Rule] = []
        # Hot path: loops are inlined rather than calling Condition.test, a frame per condition.
        for rule, conditions in self._by_kind.get(event.get("kind", ""), ()):
            for checks in conditions:
                for check in checks:
                    if not check(event, ctx):
                        break
                else:
                    matched.append(rule)
                    break
        return matched


def _index_by_kind(rules: Sequence[Rule]) -> dict[str, _Candidates]:
    # Each kind keeps only the conditions that can apply to it, so matching skips kind tests.
    index: dict[str, list[tuple[Rule, tuple[tuple[Check, ...], ...]]]] = {}
    for rule in rules:
        for kind in sorted(rule.kinds):
            conditions = tuple(c.checks for c in rule.conditions if kind in c.kinds)
            index.setdefault(kind, []).append((rule, conditions))
    return {kind: tuple(entries) for kind, entries in index.items()}


def _gates_by_kind(rules: Sequence[Rule]) -> dict[str, Callable[[Event], bool]]:
    # Most events match nothing. When every condition for a kind constrains the same field
    # (file rules all name paths), the union of those constraints is a necessary test that
    # one C-level regex or set look-up answers, before any rule runs.
    sources: dict[str, list[Mapping[str, Any]]] = {}
    for rule in rules:
        for condition in rule.conditions:
            for kind in condition.kinds:
                sources.setdefault(kind, []).append(condition.source)
    gates = {}
    for kind, whens in sources.items():
        gate = _gate(whens)
        if gate is not None:
            gates[kind] = gate
    return gates


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


_PATH_GATE_CACHE = 4096  # paths remembered per event kind: a few MB at most
_PATH_GATE_CACHED_LEN = 256  # longer paths are matched every time


def _gate(whens: list[Mapping[str, Any]]) -> Callable[[Event], bool] | None:
    if all("path" in when for when in whens):
        globs = [glob for when in whens for glob in _listed(when["path"])]
        union = re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs)).match

        def may_match_path(path: str) -> bool:
            return union(path) is not None

        # Hosts open the same files over and over: a remembered answer costs a tenth of the
        # regex. Only short paths are kept, so the cache stays small whatever agents send.
        remembered = functools.lru_cache(maxsize=_PATH_GATE_CACHE)(may_match_path)

        def gate(event: Event) -> bool:
            path = event.get("path")
            if path is None:
                return False
            return remembered(path) if len(path) <= _PATH_GATE_CACHED_LEN else may_match_path(path)

        return gate
    for name in ("dst_port", "syscall"):
        if all(name in when for when in whens):
            allowed = frozenset(value for when in whens for value in _listed(when[name]))
            return lambda event, name=name, allowed=allowed: event.get(name) in allowed  # type: ignore[misc]
    return None


# --- loading -------------------------------------------------------------------------------


def load_rules(paths: Sequence[Path]) -> RuleSet:
    """Read and validate rule files into one rule set; any problem raises `RuleError`."""
    rules: list[Rule] = []
    origin: dict[str, Path] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(f"{path}: cannot read rule file: {exc}") from exc
        for rule in parse_rules(text, str(path)):
            if rule.id in origin:
                raise RuleError(
                    f"{path}: rule {rule.id!r}: field 'id': duplicate id "
                    f"(already defined in {origin[rule.id]})"
                )
            origin[rule.id] = path
            rules.append(rule)
    return RuleSet(rules)


def parse_rules(text: str, source: str = "<string>") -> list[Rule]:
    """Parse the `[[rule]]` tables of one TOML document."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{source}: invalid TOML: {exc}") from exc
    extra = sorted(set(data) - {"rule"})
    if extra:
        raise RuleError(f"{source}: unknown top-level key {extra[0]!r} (expected [[rule]] tables)")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RuleError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules, start=1):
        rule = parse_rule(raw, source, index=index)
        if rule.id in seen:
            raise RuleError(f"{source}: rule {rule.id!r}: field 'id': duplicate id")
        seen.add(rule.id)
        rules.append(rule)
    return rules


def parse_rule(raw: Mapping[str, Any], source: str = "<rule>", *, index: int = 1) -> Rule:
    """Validate one rule table (as parsed from TOML) and compile its condition."""
    reader = _Reader(source, f"rule #{index}")
    if not isinstance(raw, Mapping):
        reader.fail(None, "must be a table")
    rule_id = reader.string(raw, "id")
    if not RULE_ID_PATTERN.fullmatch(rule_id):
        reader.fail("id", f"invalid id {rule_id!r} (expected {RULE_ID_PATTERN.pattern})")
    reader.label = f"rule {rule_id!r}"
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        reader.fail(unknown[0], "unknown field")
    return Rule(
        id=rule_id,
        name=reader.string(raw, "name"),
        description=reader.string(raw, "description", required=False),
        severity=_severity(reader, raw),
        weight=_weight(reader, raw),
        tactics=reader.ids(raw, "tactics", TACTIC_PATTERN),
        techniques=reader.ids(raw, "techniques", TECHNIQUE_PATTERN),
        tags=reader.strings(raw, "tags"),
        conditions=_conditions(reader, raw),
    )


class _Reader:
    """Typed access to a raw rule table, with errors that name file, rule and field."""

    def __init__(self, source: str, label: str) -> None:
        self.source = source
        self.label = label

    def fail(self, field_name: str | None, message: str) -> NoReturn:
        where = f"{self.source}: {self.label}"
        if field_name is not None:
            where += f": field {field_name!r}"
        raise RuleError(f"{where}: {message}")

    def string(self, raw: Mapping[str, Any], key: str, *, required: bool = True) -> str:
        value = raw.get(key)
        if value is None and not required:
            return ""
        if value is None:
            self.fail(key, "required")
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "expected a non-empty string")
        return value

    def strings(self, raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, "expected a list of non-empty strings")
        return tuple(value)

    def ids(self, raw: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        values = self.strings(raw, key)
        for value in values:
            if not pattern.fullmatch(value):
                self.fail(key, f"invalid MITRE ATT&CK id {value!r} (expected {pattern.pattern})")
        return values


def _severity(reader: _Reader, raw: Mapping[str, Any]) -> Severity:
    value = reader.string(raw, "severity")
    if value not in SEVERITY_ORDER:
        reader.fail("severity", f"invalid severity {value!r} (expected {', '.join(SEVERITY_ORDER)})")
    return cast(Severity, value)


def _weight(reader: _Reader, raw: Mapping[str, Any]) -> float:
    value = raw.get("weight")
    if isinstance(value, bool) or not isinstance(value, int | float):
        reader.fail("weight", "required, a number")
    if not (math.isfinite(value) and 0 < value <= MAX_WEIGHT):
        reader.fail("weight", f"must be > 0 and <= {MAX_WEIGHT:g}, got {value!r}")
    return float(value)


# --- conditions ----------------------------------------------------------------------------


def _conditions(reader: _Reader, raw: Mapping[str, Any]) -> tuple[Condition, ...]:
    when = raw.get("when")
    if isinstance(when, Mapping):
        return (_condition(reader, when, ""),)
    if not (isinstance(when, list) and when and all(isinstance(w, Mapping) for w in when)):
        reader.fail("when", "required, a table ([rule.when]) or an array of tables ([[rule.when]])")
    return tuple(_condition(reader, w, f"when[{i}].") for i, w in enumerate(when))


def _condition(reader: _Reader, when: Mapping[str, Any], prefix: str) -> Condition:
    unknown = sorted(set(when) - {"kind"} - set(_BUILDERS))
    if unknown:
        reader.fail(prefix + unknown[0], "unknown field")
    kinds = _kinds(reader, when.get("kind"), prefix + "kind")
    built: list[tuple[int, Check]] = []
    for key, value in when.items():
        if key != "kind":
            cost, build = _BUILDERS[key]
            built.append((cost, build(_Spec(reader, prefix + key, value))))
    # Cheap set lookups first, regexes last: most events fail an early check.
    built.sort(key=lambda item: item[0])
    return Condition(kinds, tuple(check for _, check in built), MappingProxyType(dict(when)))


def _kinds(reader: _Reader, value: Any, name: str) -> frozenset[str]:
    if value is None:
        reader.fail(name, "required")
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        reader.fail(name, "expected an event kind or a non-empty list of them")
    for kind in values:
        if kind not in EVENT_KINDS:
            reader.fail(name, f"unknown event kind {kind!r} (expected one of {', '.join(EVENT_KINDS)})")
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class _Spec:
    """One condition field being compiled: where it came from and its raw value."""

    reader: _Reader
    name: str
    value: Any

    def fail(self, message: str) -> NoReturn:
        self.reader.fail(self.name, message)

    def items(self, kind: type[Any]) -> list[Any]:
        """Return the value as a non-empty list whose items are all of `kind`."""
        values = self.value if isinstance(self.value, list) else [self.value]
        ok = values and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)
        if not ok:
            self.fail(f"expected a {kind.__name__} or a non-empty list of them")
        return values


_WILDCARDS = frozenset("*?[")


def _globs(spec: _Spec) -> Callable[[str], bool]:
    """Compile fnmatch globs into one case-sensitive predicate."""
    patterns = spec.items(str)
    if not all(patterns):
        spec.fail("empty glob")
    shapes: dict[str, list[str]] = {"exact": [], "suffix": [], "prefix": [], "infix": [], "re": []}
    for pattern in patterns:
        shape, literal = _glob_shape(pattern)
        shapes[shape].append(literal)
    regex = re.compile("|".join(map(fnmatch.translate, shapes["re"]))) if shapes["re"] else None
    return _glob_predicate(
        frozenset(shapes["exact"]),
        tuple(shapes["suffix"]),
        tuple(shapes["prefix"]),
        tuple(shapes["infix"]),
        regex,
    )


def _glob_shape(pattern: str) -> tuple[str, str]:
    # Most globs are "*/name", "/dir/*" or "*/name*": plain string tests beat a regex
    # alternation whose every branch starts with a backtracking ".*".
    inner = pattern.strip("*")
    if not inner or _WILDCARDS.intersection(inner):
        return "re", pattern
    stars = (pattern.startswith("*"), pattern.endswith("*"))
    if len(pattern) - len(inner) > sum(stars):  # "**x": harmless but not a plain shape
        return "re", pattern
    shape = {(False, False): "exact", (True, False): "suffix", (False, True): "prefix"}
    return shape.get(stars, "infix"), inner


def _glob_predicate(
    exact: frozenset[str],
    suffixes: tuple[str, ...],
    prefixes: tuple[str, ...],
    infixes: tuple[str, ...],
    regex: re.Pattern[str] | None,
) -> Callable[[str], bool]:
    # Specialise the common single-shape lists: one Python frame fewer per check.
    if not (suffixes or prefixes or infixes or regex):
        return exact.__contains__
    if not (exact or prefixes or infixes or regex):
        return lambda value: value.endswith(suffixes)
    if not (exact or suffixes or infixes or regex):
        return lambda value: value.startswith(prefixes)
    search = re.compile("|".join(map(re.escape, infixes))).search if infixes else None
    match = regex.match if regex is not None else None
    return lambda value: (
        value in exact
        or value.endswith(suffixes)
        or value.startswith(prefixes)
        or (search is not None and search(value) is not None)
        or (match is not None and match(value) is not None)
    )


_EventText = Literal["exe", "comm", "path"]


def _glob_check(key: _EventText, *, negate: bool = False) -> Callable[[_Spec], Check]:
    """Return a builder of glob checks on an event field; with `negate`, absent passes."""

    def build(spec: _Spec) -> Check:
        matches = _globs(spec)

        def on_event(event: Event, ctx: ProcessContext) -> bool:
            value = event.get(key)
            return negate if value is None else matches(value) is not negate

        if key == "path":
            return on_event
        from_ctx = operator.attrgetter(key)

        def on_event_or_ctx(event: Event, ctx: ProcessContext) -> bool:
            # Only process_start carries exe/comm reliably; later events carry just the pid.
            value: str | None = event.get(key) or from_ctx(ctx)
            return negate if value is None else matches(value) is not negate

        return on_event_or_ctx

    return build


def _parent_glob_check(attr: str) -> Callable[[_Spec], Check]:
    """Return a builder of glob checks on a parent attribute of the process context."""

    def build(spec: _Spec) -> Check:
        matches = _globs(spec)
        from_ctx = operator.attrgetter(attr)

        def check(event: Event, ctx: ProcessContext) -> bool:
            value: str | None = from_ctx(ctx)
            return value is not None and matches(value)

        return check

    return build


def _build_syscall(spec: _Spec) -> Check:
    names = frozenset(spec.items(str))

    def check(event: Event, ctx: ProcessContext) -> bool:
        return event.get("syscall") in names

    return check


def _int_set(spec: _Spec, low: int, high: int) -> frozenset[int]:
    values = spec.items(int)
    for value in values:
        if not low <= value <= high:
            spec.fail(f"{value} is out of range {low}..{high}")
    return frozenset(values)


def _build_dst_port(spec: _Spec) -> Check:
    ports = _int_set(spec, 0, 65535)

    def check(event: Event, ctx: ProcessContext) -> bool:
        return event.get("dst_port") in ports

    return check


def _build_uid(spec: _Spec) -> Check:
    uids = _int_set(spec, 0, 2**32)

    def check(event: Event, ctx: ProcessContext) -> bool:
        return event.get("uid") in uids

    return check


def _build_argv_regex(spec: _Spec) -> Check:
    if not isinstance(spec.value, str) or not spec.value:
        spec.fail("expected a non-empty regular expression string")
    try:
        search = re.compile(spec.value).search
    except re.error as exc:
        spec.fail(f"invalid regex: {exc}")

    def check(event: Event, ctx: ProcessContext) -> bool:
        argv = event.get("argv")
        return argv is not None and search(" ".join(argv), 0, ARGV_MATCH_LIMIT) is not None

    return check


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _build_dst_ip(spec: _Spec) -> Check:
    try:
        networks = tuple(ipaddress.ip_network(v, strict=False) for v in spec.items(str))
    except ValueError as exc:
        spec.fail(f"invalid address or CIDR: {exc}")

    def check(event: Event, ctx: ProcessContext) -> bool:
        value = event.get("dst_ip")
        return value is not None and _in_networks(value, networks)

    return check


def _in_networks(value: str, networks: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    # Mixed-version membership is simply False; an IPv4-mapped IPv6 peer is its IPv4 address.
    return any(address in net or (mapped is not None and mapped in net) for net in networks)


def _build_metadata(spec: _Spec) -> Check:
    wanted = spec.value
    if not isinstance(wanted, Mapping) or not wanted:
        spec.fail("expected a non-empty table of key = value")
    for key, value in wanted.items():
        if not isinstance(value, str | int | float | bool):
            spec.fail(f"key {key!r}: expected a string, number or boolean")
    pairs = tuple(wanted.items())

    def check(event: Event, ctx: ProcessContext) -> bool:
        metadata = event.get("metadata")
        if not metadata:
            return False
        for key, want in pairs:  # noqa: SIM110 -- hot path, no generator allocation
            if not _same_value(metadata.get(key, _MISSING), want):
                return False
        return True

    return check


_MISSING = object()


def _same_value(got: object, want: object) -> bool:
    # `True == 1` in Python; an exact match must not confuse a flag with a count.
    return got == want and isinstance(got, bool) == isinstance(want, bool)


# field -> (cost, builder); the cost orders the checks within a condition.
_BUILDERS: dict[str, tuple[int, Callable[[_Spec], Check]]] = {
    "syscall": (0, _build_syscall),
    "dst_port": (0, _build_dst_port),
    "uid": (0, _build_uid),
    "metadata": (1, _build_metadata),
    "exe": (2, _glob_check("exe")),
    "comm": (2, _glob_check("comm")),
    "path": (2, _glob_check("path")),
    "parent_exe": (2, _parent_glob_check("parent_exe")),
    "parent_comm": (2, _parent_glob_check("parent_comm")),
    "exe_not": (3, _glob_check("exe", negate=True)),
    "path_not": (3, _glob_check("path", negate=True)),
    "dst_ip": (4, _build_dst_ip),
    "argv_regex": (5, _build_argv_regex),
}
