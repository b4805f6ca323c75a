"""What both HTML reports (`refbuild report`, `model eval --report`) share: safe file names
for face ids, and JSON safe to inline in a <script> element."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def safe_name(face_id: str) -> str:
    """A face id as one plain file name: kept when it is one already, else its sha256 (24 hex)."""
    return face_id if SAFE_ID.match(face_id) else hashlib.sha256(face_id.encode()).hexdigest()[:24]


def script_json(obj: Any, allow_nan: bool = True) -> str:
    """JSON safe to inline in <script>: no `<`, `>` or `&` can end the element.

    allow_nan=False: a NaN or infinity is a ValueError (a page's data must be strict JSON)."""
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
