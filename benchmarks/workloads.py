"""The requests benchmarks/speculative.py makes: ordinary code to edit, code whose continuation
repeats nearby code, and free writing. Data only.

The five functions were written for this file as ordinary code a user asks to change (a config
parser, a retry loop with logging, a data-cleaning routine, a class method, a log summary), each
with one small requested change; the set was fixed before any of them was measured.
"""

from dataclasses import dataclass
from typing import Optional

PARSE_CONFIG = '''\
def parse_config(text, defaults=None):
    """Parse an INI-style configuration into a dict of sections, each a dict of keys to values.

    Lines starting with # or ; are comments. Values may be quoted, and "true"/"false" and integers
    are converted. Keys before the first section header go into the "global" section.
    """
    config = {"global": dict(defaults or {})}
    section = "global"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ValueError(f"line {number}: unterminated section header: {raw!r}")
            section = line[1:-1].strip()
            if not section:
                raise ValueError(f"line {number}: empty section name")
            config.setdefault(section, {})
            continue
        if "=" not in line:
            raise ValueError(f"line {number}: expected key = value, got {raw!r}")
        key, value = line.split("=", 1)
        key = key.strip().lower()
        value = value.strip()
        if not key:
            raise ValueError(f"line {number}: missing key before '='")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\\"'":
            value = value[1:-1]
        elif value.lower() in ("true", "yes", "on"):
            value = True
        elif value.lower() in ("false", "no", "off"):
            value = False
        else:
            try:
                value = int(value)
            except ValueError:
                pass
        if key in config[section]:
            raise ValueError(f"line {number}: duplicate key {key!r} in section {section!r}")
        config[section][key] = value
    return config
'''

FETCH_WITH_RETRY = '''\
import logging
import random
import time
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)


def fetch_with_retry(url, attempts=3, backoff=0.5, timeout=10.0, headers=None):
    """Fetch url and return the response body as bytes, retrying on network errors and 5xx answers.

    Waits backoff * 2 ** attempt seconds (with up to 10% jitter) between attempts and logs each
    failure. Client errors (4xx) are not retried.
    """
    headers = dict(headers or {})
    headers.setdefault("User-Agent", "fetch-with-retry/1.0")
    request = urllib.request.Request(url, headers=headers)
    last_error = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                logger.debug("fetched %s (%d bytes) on attempt %d", url, len(body), attempt + 1)
                return body
        except urllib.error.HTTPError as error:
            if error.code < 500:
                logger.error("client error %d for %s: not retrying", error.code, url)
                raise
            last_error = error
            logger.warning("server error %d for %s (attempt %d of %d)", error.code, url, attempt + 1, attempts)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            last_error = error
            logger.warning("network error for %s: %s (attempt %d of %d)", url, error, attempt + 1, attempts)
        if attempt + 1 < attempts:
            delay = backoff * 2 ** attempt
            delay += random.uniform(0, delay * 0.1)
            logger.info("waiting %.2f seconds before retrying %s", delay, url)
            time.sleep(delay)
    logger.error("giving up on %s after %d attempts", url, attempts)
    raise RuntimeError(f"could not fetch {url} after {attempts} attempts") from last_error
'''

CLEAN_CUSTOMERS = '''\
import re
from datetime import datetime

EMAIL = re.compile(r"^[^@\\s]+@[^@\\s]+\\.[a-z]{2,}$", re.IGNORECASE)


def clean_customers(rows):
    """Clean customer records read from a CSV export.

    Strips whitespace, normalises names and phone numbers, parses signup dates, drops rows without a
    valid email and keeps the most recent row for each email. Returns (clean rows, rejected rows).
    """
    cleaned = {}
    rejected = []
    for row in rows:
        record = {key.strip().lower(): (value or "").strip() for key, value in row.items()}
        email = record.get("email", "")
        if not EMAIL.match(email):
            rejected.append((row, "invalid email"))
            continue
        name = " ".join(part.capitalize() for part in record.get("name", "").split())
        if not name:
            rejected.append((row, "missing name"))
            continue
        phone = re.sub(r"[^0-9+]", "", record.get("phone", ""))
        if phone and not phone.startswith("+"):
            phone = "+1" + phone.lstrip("0")
        signup = None
        for fmt in ("%Y-%m-%d", "%d/%m/%Y", "%m-%d-%Y"):
            try:
                signup = datetime.strptime(record.get("signup", ""), fmt).date()
                break
            except ValueError:
                continue
        if signup is None:
            rejected.append((row, "bad signup date"))
            continue
        customer = {
            "name": name,
            "email": email,
            "phone": phone or None,
            "signup": signup,
            "country": record.get("country", "").upper() or None,
        }
        previous = cleaned.get(email)
        if previous is None or previous["signup"] < signup:
            cleaned[email] = customer
    result = sorted(cleaned.values(), key=lambda c: (c["signup"], c["email"]))
    return result, rejected
'''

INVENTORY_RESTOCK = '''\
class Inventory:
    """Stock levels per item, with a reorder threshold and a history of movements."""

    def __init__(self, items, reorder_level=10):
        self.stock = dict(items)
        self.reorder_level = reorder_level
        self.history = []
        self.pending_orders = {}

    def restock(self, item, quantity, supplier=None, unit_cost=None):
        """Add quantity units of item to the stock, record the movement and settle pending orders.

        Returns the new stock level. Raises ValueError for a non-positive quantity or an unknown item
        when no supplier is given.
        """
        if quantity <= 0:
            raise ValueError(f"quantity must be positive, got {quantity}")
        if item not in self.stock:
            if supplier is None:
                raise ValueError(f"unknown item {item!r}: give a supplier to add a new item")
            self.stock[item] = 0
        before = self.stock[item]
        self.stock[item] = before + quantity
        entry = {
            "item": item,
            "change": quantity,
            "before": before,
            "after": self.stock[item],
            "supplier": supplier,
        }
        if unit_cost is not None:
            if unit_cost < 0:
                raise ValueError(f"unit_cost must not be negative, got {unit_cost}")
            entry["cost"] = round(unit_cost * quantity, 2)
        self.history.append(entry)
        ordered = self.pending_orders.get(item, 0)
        if ordered:
            settled = min(ordered, quantity)
            remaining = ordered - settled
            if remaining:
                self.pending_orders[item] = remaining
            else:
                del self.pending_orders[item]
        if self.stock[item] < self.reorder_level:
            self.pending_orders[item] = self.pending_orders.get(item, 0) + self.reorder_level
        return self.stock[item]
'''

SUMMARIZE_LOG = '''\
import collections
import re
from datetime import datetime

LINE = re.compile(r"^(\\S+ \\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) \\[([^\\]]+)\\] (.*)$")
TOP_N = 5


def summarize_log(path):
    """Summarise a log file: lines per level, the busiest modules, the most frequent errors and the
    time span covered. Lines that do not match the expected format are counted, not parsed."""
    levels = collections.Counter()
    modules = collections.Counter()
    errors = collections.Counter()
    first = last = None
    unparsed = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = LINE.match(line.rstrip("\\n"))
            if not match:
                unparsed += 1
                continue
            stamp, level, module, message = match.groups()
            try:
                when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                unparsed += 1
                continue
            if first is None or when < first:
                first = when
            if last is None or when > last:
                last = when
            levels[level] += 1
            modules[module] += 1
            if level in ("ERROR", "CRITICAL"):
                # Numbers vary between occurrences of the same error: count the message's shape.
                errors[re.sub(r"\\d+", "N", message)] += 1
    span = (last - first).total_seconds() if first and last else 0.0
    return {
        "lines": sum(levels.values()) + unparsed,
        "unparsed": unparsed,
        "levels": dict(levels),
        "top_modules": modules.most_common(TOP_N),
        "top_errors": errors.most_common(TOP_N),
        "first": first,
        "last": last,
        "span_seconds": span,
        "errors_per_hour": sum(errors.values()) / (span / 3600) if span else 0.0,
    }
'''


@dataclass
class Workload:
    """One request: a chat message or a plain completion prompt."""

    family: str  # "code edit", "repeat nearby code" or "free writing": rows are aggregated per family
    prompt: str
    max_gen_len: int
    chat: bool = True  # a chat request in the checkpoint's chat format; else a plain completion
    edit: Optional[str] = None  # a regular expression that an answer making the requested change matches


def code_edit(change: str, code: str, edit: str) -> Workload:
    return Workload("code edit", f"{change} Answer with the whole code only.\n\n```python\n{code}```", 700, edit=edit)


WORKLOADS = {
    "edit: config parser": code_edit("Rewrite this Python function, renaming the variable `section` to "
                                     "`current_section`.", PARSE_CONFIG, r"current_section = line\[1:-1\]"),
    "edit: retry loop": code_edit("Rewrite this Python code so that `fetch_with_retry` makes 5 attempts by default "
                                  "instead of 3.", FETCH_WITH_RETRY, r"attempts=5"),
    "edit: data cleaning": code_edit("Rewrite this Python code so that `clean_customers` also lowercases the email "
                                     "address (add one line).", CLEAN_CUSTOMERS, r"email.*\.lower\(\)"),
    "edit: class method": code_edit("Rewrite this Python class, renaming the parameter `quantity` of `restock` to "
                                    "`amount`.", INVENTORY_RESTOCK, r"def restock\(self, item, amount"),
    "edit: log summary": code_edit("Rewrite this Python code so that it reports the top 10 modules and errors "
                                   "instead of the top 5.", SUMMARIZE_LOG, r"TOP_N = 10|most_common\(10\)"),
}

# A plain completion whose natural continuation repeats nearby code: a class of similar methods,
# cut at the start of the next one. (SmolLM2's tokenizer has no infilling pieces, so "fill a
# middle" is asked as a completion of the code before it.)
VECTOR_FILE = '''\
import math


class Vector:
    """A 3-dimensional vector of floats."""

    def __init__(self, x=0.0, y=0.0, z=0.0):
        self.x = float(x)
        self.y = float(y)
        self.z = float(z)

    def __repr__(self):
        return f"Vector({self.x}, {self.y}, {self.z})"

    def __add__(self, other):
        if not isinstance(other, Vector):
            return NotImplemented
        return Vector(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other):
        if not isinstance(other, Vector):
            return NotImplemented
        return Vector(self.x - other.x, self.y - other.y, self.z - other.z)

    def __mul__(self, scalar):
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return Vector(self.x * scalar, self.y * scalar, self.z * scalar)

    def __truediv__(self, scalar):
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return Vector(self.x / scalar, self.y / scalar, self.z / scalar)

    def __neg__(self):
        return Vector(-self.x, -self.y, -self.z)

    def dot(self, other):
        return self.x * other.x + self.y * other.y + self.z * other.z

    def cross(self, other):
        return Vector(
            self.y * other.z - self.z * other.y,
            self.z * other.x - self.x * other.z,
            self.x * other.y - self.y * other.x,
        )

    def __eq__(self, other):
        if not isinstance(other, Vector):
            return NotImplemented
        return self.x == other.x and self.y == other.y and self.z == other.z

    def __iadd__(self, other):
'''
WORKLOADS["repeat nearby code"] = Workload("repeat nearby code", VECTOR_FILE, 200, chat=False)

WORKLOADS["free writing"] = Workload(
    "free writing", "Write a short essay about the history of the bicycle and why people still ride them.", 200)
WORKLOADS["free writing 2"] = Workload(
    "free writing", "Explain to a beginner how a hash table works and when to use one.", 200)
