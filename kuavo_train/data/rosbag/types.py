"""Kuavo's ROS message types for `rosbags`, and the workaround that makes real Kuavo bags readable.

Reading: a ROS1 bag stores the full definition of every connection's type, so
the reader builds its types from the bag itself. But `rosbags` (0.11) only
accepts UPPER_CASE constant names, and Kuavo's `lejuClawState` declares
`int8 kError = -1` etc.: rosbags takes those lines for five extra int8 fields,
so the type no longer matches the wire format, and `AnyReader` refuses the
WHOLE bag with "hash mismatch" (checked here with a bag carrying the
robot's definition text and its genuine ROS md5). `types_from_bag_msgdef`
therefore drops constant lines before parsing: constants are never on the
wire, so deserialization is exact.

Writing (the synthetic test bags): the definitions of the Kuavo types the
converter reads live in `msgs/*.msg` (field lists of `kuavo_msgs`); they are
registered on top of ROS1 Noetic's standard types, constants included, so a
written bag carries the same definition text and md5 as the robot's.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

MSG_DIR = Path(__file__).with_name("msgs")
PACKAGE = "kuavo_msgs"
# `<builtin type> <name> = <value>`: a constant declaration (a field line has no '=' after its name).
_CONSTANT = re.compile(r"^\s*(?P<type>[A-Za-z][A-Za-z0-9_]*)\s+(?P<name>[A-Za-z][A-Za-z0-9_]*)\s*=\s*(?P<value>.*?)\s*$")


def msg_files() -> list[Path]:
    return sorted(MSG_DIR.glob("*.msg"))


def split_constants(text: str) -> tuple[str, list[tuple[str, str, object]]]:
    """(the text without constant lines, [(name, type, value)]) of one .msg text."""
    kept, consts = [], []
    for line in text.splitlines():
        m = _CONSTANT.match(line)
        if m is None:
            kept.append(line)
            continue
        typ, value = m["type"], m["value"]
        if typ != "string":
            value = value.split("#", 1)[0].strip()
            value = float(value) if typ.startswith("float") else int(value, 0)
        consts.append((m["name"], typ, value))
    return "\n".join(kept) + "\n", consts


def types_from_bag_msgdef(msgdef: str, msgtype: str) -> dict:
    """The types of one connection's stored definition (with its dependencies), constants dropped."""
    from rosbags.typesys import get_types_from_msg

    return get_types_from_msg(split_constants(msgdef)[0], msgtype)


@lru_cache(maxsize=1)
def kuavo_typestore():
    """ROS1 Noetic's types plus `kuavo_msgs/msg/*`, constants included (one shared store per process)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    types: dict = {}
    for f in msg_files():
        name = f"{PACKAGE}/msg/{f.stem}"
        text, consts = split_constants(f.read_text())
        parsed = get_types_from_msg(text, name)
        _, fields = parsed[name]
        parsed[name] = (consts, fields)
        types.update(parsed)
    store.register(types)
    return store
