"""The building blocks of the schema corpus (build.py): small constructors for JSON-schema nodes with the bounds
that keep a valid answer short, and the common fields (e-mail, money, address, ...) the shapes reuse."""

from __future__ import annotations

def s(max_len: int | None = 40, min_len: int | None = None, pattern: str | None = None, fmt: str | None = None,
      **extra) -> dict:
    out = {"type": "string"}
    if fmt:
        out["format"] = fmt
    if pattern:
        out["pattern"] = pattern
    if min_len is not None:
        out["minLength"] = min_len
    if max_len is not None and not fmt and not pattern:
        out["maxLength"] = max_len
    return {**out, **extra}


# Unbounded numbers get the int32 range (as OpenAPI's int32 format) or +-1e9: a greedy small model otherwise
# can write digits until max_tokens ("idle_timeout_s": 3000000000000...), which no real API accepts either.
INT_MIN, INT_MAX, NUM_LIMIT = -2**31, 2**31 - 1, 10**9


def i(lo=None, hi=None, **extra) -> dict:
    out = {"type": "integer"}
    if lo is None and "exclusiveMinimum" not in extra:
        lo = INT_MIN
    if hi is None and "exclusiveMaximum" not in extra and "maximum" not in extra:
        hi = INT_MAX
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return {**out, **extra}


def n(lo=None, hi=None, **extra) -> dict:
    out = {"type": "number"}
    if lo is None and "exclusiveMinimum" not in extra:
        lo = -NUM_LIMIT
    if hi is None and "exclusiveMaximum" not in extra and "maximum" not in extra:
        hi = NUM_LIMIT
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return {**out, **extra}


def b(**extra) -> dict:
    return {"type": "boolean", **extra}


def enum(*values, **extra) -> dict:
    kinds = {type(v) for v in values}
    base = {"enum": list(values)}
    if kinds == {str}:
        base = {"type": "string", **base}
    elif kinds == {int}:
        base = {"type": "integer", **base}
    return {**base, **extra}


def const(value) -> dict:
    return {"const": value}


def arr(items: dict, lo: int | None = None, hi: int | None = 3, **extra) -> dict:
    out = {"type": "array", "items": items}
    if lo is not None:
        out["minItems"] = lo
    if hi is not None:
        out["maxItems"] = hi
    return {**out, **extra}


def obj(props: dict, required: list[str] | str = "all", closed: bool = False, **extra) -> dict:
    out = {"type": "object", "properties": props}
    req = list(props) if required == "all" else list(required)
    if req:
        out["required"] = req
    if closed:
        out["additionalProperties"] = False
    return {**out, **extra}


def nullable(schema: dict) -> dict:
    """T or null, written the way the base schema's authors would."""
    t = schema.get("type")
    if isinstance(t, list) and "null" in t or {"type": "null"} in schema.get("anyOf", []):
        return schema
    if isinstance(t, str) and t != "object" and "enum" not in schema and "const" not in schema:
        return {**schema, "type": [t, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


EMAIL = s(fmt="email", maxLength=100)  # formats with a free-length part get a length cap too
URI = s(fmt="uri", maxLength=200)
UUID = s(fmt="uuid")
DATE = s(fmt="date")
DATETIME = s(fmt="date-time")
IPV4 = s(fmt="ipv4")
NAME = s(60, 1)
SHORT = s(30, 1)
TEXT = s(200)
PHONE = s(pattern=r"^\+?[0-9]{7,15}$")
CN_MOBILE = s(pattern=r"^1[3-9][0-9]{9}$")
CURRENCY = enum("USD", "EUR", "GBP", "CNY", "JPY")
MONEY = obj({"amount": n(0, multipleOf=0.01), "currency": CURRENCY})
COUNTRY = s(pattern=r"^[A-Z]{2}$")
ADDRESS = obj({"street": s(80, 1), "city": s(40, 1), "state": s(40), "postal_code": s(pattern=r"^[A-Z0-9 -]{3,10}$"),
               "country": COUNTRY}, ["street", "city", "country"])
GEO = obj({"lat": n(-90, 90), "lng": n(-180, 180)})
PERSON = obj({"name": NAME, "email": EMAIL})
HHMM = s(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
SEMVER = s(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
HEX_SHA = s(pattern=r"^[0-9a-f]{7}$")
LANG = enum("en", "zh", "es", "fr", "de", "ja")
TIMEZONE = enum("UTC", "Asia/Shanghai", "America/New_York", "Europe/London", "Europe/Berlin", "Asia/Tokyo")
