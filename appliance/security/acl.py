"""mosquitto-style ACL files, enforced by the proxy before anything reaches the broker.

The format is mosquitto's `acl_file`:

    # lines before the first `user` apply to clients without a username
    topic read public/#
    user alice
    topic readwrite alice/#
    topic deny alice/secret
    pattern write sensors/%u/%c/#      # any user; %u = username, %c = client id

Access is `read`, `write`, `readwrite` (the default) or `deny`. With an ACL file, what no line
allows is denied. A `deny` line wins over any allowing line.

PUBLISH and wills need `write` on the topic; a SUBSCRIBE filter needs a `read` line whose filter
covers it (`read sensors/+/temp` allows `sensors/a/temp` and `sensors/+/temp`, not `sensors/#`) and
must not overlap any `deny` line (the proxy does not filter deliveries, so a subscription that could
receive a denied topic is refused as a whole). A `%u` or `%c` substitution that would contain `+`,
`#` or `/` makes that pattern line not apply, so a crafted client id cannot widen a pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from appliance.mqtt import ReasonCode
from appliance.mqtt.topics import filter_covers, filters_overlap, topic_filter_problem, topic_matches
from appliance.pipeline import Message, Reason, Verdict
from appliance.security.errors import AccessError

ACCESS = ("read", "write", "readwrite", "deny")


class AclError(AccessError):
    """An ACL file that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Rule:
    access: str
    topic: str

    def reads(self) -> bool:
        return self.access in ("read", "readwrite")

    def writes(self) -> bool:
        return self.access in ("write", "readwrite")


def _subscription_filter(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


@dataclass
class AccessRules:
    anonymous: list[Rule] = field(default_factory=list)
    users: dict[str, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    def rules_for(self, username: str | None, client_id: str) -> list[Rule]:
        rules = list(self.users.get(username, ())) if username is not None else list(self.anonymous)
        for rule in self.patterns:
            topic = rule.topic
            if "%u" in topic:
                if username is None or not _safe(username):
                    continue
                topic = topic.replace("%u", username)
            if "%c" in topic:
                if not _safe(client_id):
                    continue
                topic = topic.replace("%c", client_id)
            rules.append(Rule(rule.access, topic))
        return rules

    def can_publish(self, username: str | None, client_id: str, topic: str) -> bool:
        rules = self.rules_for(username, client_id)
        if any(rule.access == "deny" and topic_matches(rule.topic, topic) for rule in rules):
            return False
        return any(rule.writes() and topic_matches(rule.topic, topic) for rule in rules)

    def can_subscribe(self, username: str | None, client_id: str, topic_filter: str) -> bool:
        wanted = _subscription_filter(topic_filter)
        rules = self.rules_for(username, client_id)
        if any(rule.access == "deny" and filters_overlap(rule.topic, wanted) for rule in rules):
            return False
        return any(rule.reads() and filter_covers(rule.topic, wanted) for rule in rules)


def _safe(value: str) -> bool:
    # An empty value would turn `devices/%c/#` into `devices//#`: no match for a client without an id.
    return bool(value) and not any(c in value for c in "+#/")


def parse_acl(text: str, source: str = "<acl>") -> AccessRules:
    rules = AccessRules()
    current: list[Rule] = rules.anonymous
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                raise AclError(f"{source}:{number}: `user` needs a name")
            current = rules.users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            raise AclError(f"{source}:{number}: expected `user`, `topic` or `pattern`, got {keyword!r}")
        access, _, topic = rest.partition(" ")
        if access in ACCESS:
            topic = topic.strip()
        else:
            access, topic = "readwrite", rest
        if not topic:
            raise AclError(f"{source}:{number}: `{keyword}` needs a topic")
        problem = topic_filter_problem(topic.replace("%u", "u").replace("%c", "c"))
        if problem:
            raise AclError(f"{source}:{number}: {topic!r}: {problem}")
        (rules.patterns if keyword == "pattern" else current).append(Rule(access, topic))
    return rules


def load_acl_file(path: Path) -> AccessRules:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AclError(f"{path}: cannot read ACL file: {exc}") from exc
    return parse_acl(text, str(path))


class AclCheck:
    """The pipeline check for write access (PUBLISH and wills); the session asks `can_subscribe`.

    `rules` is None without an ACL file (everything allowed); a reload swaps it in one assignment.
    Enforced in dry-run mode too: dry run is for trying schemas, not for opening the broker.
    """

    name = "acl"
    enforced_in_dry_run = True

    def __init__(self, rules: AccessRules | None):
        self.rules = rules

    def check(self, message: Message) -> Verdict | None:
        rules = self.rules
        if rules is None:
            return None
        client = message.client
        if rules.can_publish(client.username, client.client_id, message.topic):
            return None
        what = "set a will on" if message.is_will else "publish to"
        who = f"user {client.username!r}" if client.username is not None else "anonymous client"
        return Verdict.reject(Reason("acl", f"{who} is not authorized to {what} {message.topic!r}"),
                              reason_code=ReasonCode.NOT_AUTHORIZED)

    def can_subscribe(self, username: str | None, client_id: str, topic_filter: str) -> bool:
        rules = self.rules
        return rules is None or rules.can_subscribe(username, client_id, topic_filter)
