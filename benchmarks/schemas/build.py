"""Builds benchmarks/schemas/schemas.jsonl, the corpus of benchmarks/structured.py.

    python benchmarks/schemas/build.py            # rewrites schemas.jsonl next to this file

Every line is {"id", "prompt", "schema"} (plus "variant" and, for the few schemas that use a JSON-schema feature
the grammar engine rejects, "gap"). The corpus is written by hand for this project as ~70 base shapes from
ordinary software work (API payloads, configuration, forms, catalogs, events, invoices, tool arguments, ...), then
each base is emitted in three spellings that real services use for the same payload:

- `base`: as written: required and optional properties, nested objects inline.
- `strict`: the strict function-calling style: every object closed (additionalProperties false) and every
  property required, the optional ones made nullable (`["T", "null"]`, or `anyOf` with null).
- `defs`: the generated-model style (pydantic, OpenAPI generators): nested objects hoisted into `$defs` with a
  `title`, referenced with `$ref`.

Values stay small (maxLength, maxItems) so that a valid answer fits in about 200 tokens. GAP_SCHEMAS are a few
real-world shapes using features the grammar engine rejects at compile time; the benchmark reports them apart.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

OUT = Path(__file__).with_name("schemas.jsonl")


# -- building blocks ---------------------------------------------------------------------------------------------
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


# -- the base shapes: (id, prompt, schema) -----------------------------------------------------------------------
BASES: list[tuple[str, str, dict]] = [
    # accounts and people
    ("user_profile", "Create a user profile for Alice Chen, 29, a designer in Berlin who signed up today.",
     obj({"id": UUID, "username": s(pattern=r"^[a-z][a-z0-9_]{2,15}$"), "email": EMAIL, "full_name": NAME,
          "age": i(13, 120), "locale": LANG, "created_at": DATETIME, "address": ADDRESS,
          "newsletter": b()}, ["id", "username", "email", "created_at"])),
    ("signup_request", "Fill in a sign-up request for a new user named bob_smith with the email bob@example.com.",
     obj({"username": s(pattern=r"^[a-zA-Z0-9_]{3,20}$"), "email": EMAIL, "password": s(64, 12),
          "accept_terms": const(True), "referral_code": s(pattern=r"^[A-Z0-9]{6}$")},
         ["username", "email", "password", "accept_terms"], closed=True)),
    ("cn_identity", "帮我生成一条用户实名认证信息：张伟，男，1990年5月出生，住在上海。",
     obj({"姓名": s(10, 2), "性别": enum("男", "女"), "身份证号": s(pattern=r"^[0-9]{17}[0-9X]$"),
          "手机号": CN_MOBILE, "出生日期": DATE, "住址": obj({"省市": s(20, 2), "详细地址": s(60, 2)})})),
    ("contact_card", "Make a vCard-style contact for our supplier's account manager, Priya Patel at Acme Corp.",
     obj({"first_name": SHORT, "last_name": SHORT, "company": s(60), "title": s(60), "emails": arr(EMAIL, 1, 2),
          "phones": arr(obj({"kind": enum("mobile", "work", "home"), "number": PHONE}), 0, 2),
          "website": URI, "address": ADDRESS}, ["first_name", "last_name", "emails"])),
    ("employee_record", "Add an HR record for a new backend engineer, Marco Rossi, reporting to employee E-1042.",
     obj({"employee_id": s(pattern=r"^E-[0-9]{4}$"), "name": NAME,
          "department": enum("engineering", "sales", "finance", "hr", "support"), "title": s(60),
          "salary": MONEY, "manager_id": nullable(s(pattern=r"^E-[0-9]{4}$")), "hire_date": DATE,
          "skills": arr(s(30), 0, 4), "remote": b()}, ["employee_id", "name", "department", "hire_date"])),
    ("notification_prefs", "Save notification preferences: email digest weekly, no SMS, push on, quiet 22:00-07:00.",
     obj({"email": obj({"enabled": b(), "frequency": enum("instant", "daily", "weekly")}),
          "sms": obj({"enabled": b(), "phone": nullable(PHONE)}, ["enabled"]),
          "push": obj({"enabled": b()}),
          "quiet_hours": obj({"start": HHMM, "end": HHMM})}, ["email", "sms", "push"])),
    # commerce
    ("invoice", "Issue an invoice from Nordwind GmbH to Lumen Ltd for 2 consulting days at 900 EUR each.",
     obj({"invoice_number": s(pattern=r"^INV-[0-9]{6}$"), "issue_date": DATE, "due_date": DATE,
          "seller": obj({"name": NAME, "vat_id": s(pattern=r"^[A-Z]{2}[0-9A-Z]{8,12}$"), "address": ADDRESS},
                        ["name", "address"]),
          "buyer": obj({"name": NAME, "email": EMAIL}),
          "line_items": arr(obj({"description": s(80, 1), "quantity": i(1, 1000),
                                 "unit_price": n(0, multipleOf=0.01)}), 1, 3),
          "currency": CURRENCY, "total": n(0, multipleOf=0.01), "paid": b()},
         ["invoice_number", "issue_date", "seller", "buyer", "line_items", "currency", "total"])),
    ("product", "Add a catalog entry for a stainless steel water bottle, 750 ml, priced at 24.99 USD.",
     obj({"sku": s(pattern=r"^[A-Z]{3}-[0-9]{4,6}$"), "name": s(80, 1), "description": s(160),
          "price": MONEY, "categories": arr(enum("kitchen", "outdoor", "sports", "home", "electronics", "toys"), 1, 3),
          "in_stock": b(), "stock_count": i(0), "dimensions": obj({"height_cm": n(exclusiveMinimum=0, maximum=500),
                                                                  "width_cm": n(exclusiveMinimum=0, maximum=500),
                                                                  "weight_g": i(1, 100000)}),
          "images": arr(URI, 0, 2)}, ["sku", "name", "price", "categories", "in_stock"])),
    ("shopping_cart", "Show the cart of a customer who added two T-shirts and one mug and used coupon SPRING10.",
     obj({"cart_id": UUID, "customer_id": s(pattern=r"^C[0-9]{6}$"),
          "items": arr(obj({"sku": s(pattern=r"^[A-Z]{3}-[0-9]{4,6}$"), "name": s(60), "quantity": i(1, 20),
                            "unit_price": n(0, multipleOf=0.01)}), 0, 4),
          "coupon": nullable(s(pattern=r"^[A-Z0-9]{4,12}$")), "subtotal": n(0, multipleOf=0.01),
          "currency": CURRENCY}, ["cart_id", "items", "subtotal", "currency"])),
    ("product_review", "Write a review record: 4 stars for noise-cancelling headphones, a verified purchase.",
     obj({"product_id": s(pattern=r"^P[0-9]{5}$"), "rating": i(1, 5), "title": s(80, 1), "body": s(300),
          "pros": arr(s(40), 0, 3), "cons": arr(s(40), 0, 3), "verified_purchase": b(),
          "reviewed_at": DATETIME}, ["product_id", "rating", "title", "verified_purchase"])),
    ("order_event", "Emit the order.created event for order 88231 placed by customer C004512, total 59.90 EUR.",
     obj({"event_type": const("order.created"), "event_id": UUID, "occurred_at": DATETIME,
          "data": obj({"order_id": i(1), "customer_id": s(pattern=r"^C[0-9]{6}$"),
                       "items": arr(obj({"sku": s(20), "quantity": i(1, 99)}), 1, 3),
                       "total": MONEY, "shipping_address": ADDRESS}, ["order_id", "customer_id", "items", "total"])})),
    ("cn_shipment", "查询顺丰快递单号 SF123456789012 的物流信息，目前已到达北京转运中心。",
     obj({"tracking_number": s(pattern=r"^SF[0-9]{12}$"), "carrier": enum("顺丰", "中通", "圆通", "EMS"),
          "status": enum("已揽收", "运输中", "派送中", "已签收", "异常"),
          "events": arr(obj({"time": DATETIME, "location": s(30, 1), "description": s(60, 1)}), 1, 3),
          "estimated_delivery": DATE}, ["tracking_number", "carrier", "status", "events"])),
    ("subscription_change", "Move customer cus_8842 from the basic to the pro plan, yearly billing, from next month.",
     obj({"customer_id": s(pattern=r"^cus_[0-9a-zA-Z]{4,12}$"), "from_plan": enum("free", "basic", "pro", "enterprise"),
          "to_plan": enum("free", "basic", "pro", "enterprise"), "billing_cycle": enum("monthly", "yearly"),
          "effective_date": DATE, "prorate": b(), "seats": i(1, 500)},
         ["customer_id", "from_plan", "to_plan", "billing_cycle", "effective_date"])),
    ("payment", "Record a 120 USD payment for order 5521 made with a Visa card ending in 4242.",
     obj({"payment_id": UUID, "order_id": i(1), "amount": MONEY,
          "method": {"oneOf": [
              obj({"type": const("card"), "brand": enum("visa", "mastercard", "amex", "unionpay"),
                   "last4": s(pattern=r"^[0-9]{4}$"), "exp_month": i(1, 12), "exp_year": i(2024, 2040)}),
              obj({"type": const("bank_transfer"), "iban": s(pattern=r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,30}$"),
                   "reference": s(40)}, ["type", "iban"]),
              obj({"type": const("wallet"), "provider": enum("alipay", "wechat_pay", "paypal", "apple_pay"),
                   "account": s(60, 1)}, ["type", "provider"])]},
          "status": enum("pending", "succeeded", "failed", "refunded"), "created_at": DATETIME})),
    ("cn_expense", "帮我填一张报销单：技术部李娜，出差北京，高铁票553元，酒店两晚共860元。",
     obj({"申请人": s(10, 2), "部门": enum("技术部", "市场部", "财务部", "人事部", "销售部"),
          "事由": s(50, 1),
          "明细": arr(obj({"日期": DATE, "类别": enum("交通", "餐饮", "住宿", "办公", "其他"),
                           "金额": n(exclusiveMinimum=0, maximum=100000, multipleOf=0.01),
                           "发票号": s(pattern=r"^[0-9]{8,20}$")}, ["日期", "类别", "金额"]), 1, 4),
          "合计": n(0, multipleOf=0.01)})),
    ("bank_transaction", "Log a card purchase of 42.50 GBP at a grocery store this morning on account GB-0099.",
     obj({"id": UUID, "account": s(pattern=r"^[A-Z]{2}-[0-9]{4}$"), "amount": n(exclusiveMinimum=0, multipleOf=0.01),
          "currency": CURRENCY, "direction": enum("debit", "credit"), "counterparty": s(60, 1),
          "category": enum("groceries", "transport", "rent", "salary", "dining", "utilities", "other"),
          "booked_at": DATETIME, "pending": b()},
         ["id", "account", "amount", "currency", "direction", "booked_at"])),
    ("stock_quote", "Give a quote snapshot for the ticker MSFT.",
     obj({"symbol": s(pattern=r"^[A-Z]{1,5}$"), "exchange": enum("NASDAQ", "NYSE", "SSE", "SZSE", "LSE"),
          "price": n(exclusiveMinimum=0), "change": n(), "change_percent": n(-100, 1000),
          "volume": i(0), "as_of": DATETIME})),
    ("currency_conversion", "Convert 250 EUR to Japanese yen at today's rate.",
     obj({"from": CURRENCY, "to": CURRENCY, "amount": n(exclusiveMinimum=0), "rate": n(exclusiveMinimum=0),
          "converted": n(0), "as_of": DATETIME, "provider": s(40)}, ["from", "to", "amount", "rate", "converted"])),
    # tool arguments
    ("get_weather_args", "What's the weather going to be in Lisbon for the next 3 days, in Celsius?",
     obj({"location": s(60, 1), "unit": enum("celsius", "fahrenheit"), "days": i(1, 7),
          "include_hourly": b()}, ["location", "unit"], closed=True)),
    ("search_flights_args",
     "Find economy flights from SFO to Tokyo Haneda on 2025-04-10 for 2 adults, returning 04-20.",
     obj({"origin": s(pattern=r"^[A-Z]{3}$"), "destination": s(pattern=r"^[A-Z]{3}$"), "depart_date": DATE,
          "return_date": nullable(DATE),
          "passengers": obj({"adults": i(1, 9), "children": i(0, 8), "infants": i(0, 4)}, ["adults"]),
          "cabin": enum("economy", "premium_economy", "business", "first"), "max_stops": i(0, 3)},
         ["origin", "destination", "depart_date", "passengers"], closed=True)),
    ("send_email_args", "Email the team at dev@example.com that the release is postponed to Friday.",
     obj({"to": arr(EMAIL, 1, 3), "cc": arr(EMAIL, 0, 2), "subject": s(100, 1), "body": s(400, 1),
          "priority": enum("low", "normal", "high")}, ["to", "subject", "body"], closed=True)),
    ("calendar_event_args",
     "Schedule a 30-minute design review tomorrow at 10am with ana@example.com and li@example.com.",
     obj({"title": s(80, 1), "start": DATETIME, "end": DATETIME, "timezone": TIMEZONE,
          "attendees": arr(EMAIL, 0, 5), "location": s(80), "video_call": b(),
          "reminder_minutes": enum(0, 5, 10, 30, 60)}, ["title", "start", "end"], closed=True)),
    ("create_issue_args", "Open a bug ticket: the login page crashes on Safari 17. Label it bug and frontend.",
     obj({"title": s(120, 1), "body": s(400), "labels": arr(enum("bug", "feature", "docs", "frontend", "backend",
                                                                  "security", "good first issue"), 0, 3),
          "assignees": arr(s(pattern=r"^[a-zA-Z0-9-]{1,39}$"), 0, 2), "milestone": nullable(i(1))},
         ["title"], closed=True)),
    ("run_sql_args", "Count the orders per country placed in 2024 from the orders table.",
     obj({"query": s(300, 1), "database": enum("analytics", "production_replica", "warehouse"),
          "timeout_seconds": i(1, 300), "row_limit": i(1, 10000, multipleOf=100)}, ["query", "database"], closed=True)),
    ("translate_args", "请把“欢迎使用我们的服务”翻译成英文和日文。",
     obj({"text": s(200, 1), "source_lang": LANG, "target_langs": arr(LANG, 1, 3),
          "formality": enum("default", "formal", "informal")},
         ["text", "target_langs"], closed=True)),
    ("set_reminder_args", "Remind me to call the dentist on March 3rd at 9:15.",
     obj({"text": s(120, 1), "remind_at": DATETIME, "repeat": enum("none", "daily", "weekly", "monthly"),
          "snooze_minutes": i(0, 120, multipleOf=5)}, ["text", "remind_at"], closed=True)),
    ("resize_image_args", "Resize https://cdn.example.com/cat.png to 800 pixels wide as a webp at quality 80.",
     obj({"url": URI, "width": i(1, 8192), "height": nullable(i(1, 8192)), "format": enum("png", "jpeg", "webp"),
          "quality": i(1, 100), "keep_aspect": b()}, ["url", "width", "format"], closed=True)),
    ("geocode_args", "Look up the coordinates of 1600 Amphitheatre Parkway, Mountain View.",
     obj({"address": s(160, 1), "country_hint": COUNTRY, "max_results": i(1, 5)}, ["address"], closed=True)),
    # configuration
    ("server_config", "Write the config of an HTTPS API server on 10.0.0.5 port 8443 with 8 workers and info logs.",
     obj({"host": IPV4, "port": i(1, 65535), "workers": i(1, 64),
          "tls": obj({"enabled": b(), "cert_path": s(120), "key_path": s(120), "min_version": enum("1.2", "1.3")},
                     ["enabled"]),
          "log_level": enum("debug", "info", "warning", "error"),
          "timeouts": obj({"read_s": n(exclusiveMinimum=0, maximum=600), "write_s": n(exclusiveMinimum=0, maximum=600),
                           "idle_s": i(0, 3600)})}, ["host", "port", "tls", "log_level"], closed=True)),
    ("database_config", "Give me a PostgreSQL connection config for the orders database with a pool of 5 to 20.",
     obj({"driver": enum("postgresql", "mysql", "sqlite", "sqlserver"), "host": s(80, 1), "port": i(1, 65535),
          "database": s(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$"), "user": s(40, 1),
          "pool": obj({"min": i(0, 100), "max": i(1, 1000), "idle_timeout_s": i(0)}, ["min", "max"]),
          "ssl_mode": enum("disable", "require", "verify-ca", "verify-full")},
         ["driver", "host", "database", "user"])),
    ("feature_flags", "List our feature flags: new checkout at 25% rollout, dark mode fully on, beta search off.",
     obj({"environment": enum("development", "staging", "production"),
          "flags": arr(obj({"key": s(pattern=r"^[a-z][a-z0-9_.-]{1,40}$"), "enabled": b(),
                            "rollout_percent": i(0, 100, multipleOf=5), "owner": EMAIL}, ["key", "enabled"]), 1, 4),
          "updated_at": DATETIME}, ["environment", "flags"])),
    ("ci_pipeline", "Define a CI pipeline that runs lint and tests on every pull request using Ubuntu runners.",
     obj({"name": s(40, 1), "on": arr(enum("push", "pull_request", "schedule", "release"), 1, 3),
          "jobs": arr(obj({"name": s(pattern=r"^[a-z][a-z0-9-]{0,30}$"),
                           "runs_on": enum("ubuntu-latest", "macos-latest", "windows-latest"),
                           "timeout_minutes": i(1, 360),
                           "steps": arr(obj({"name": s(50, 1), "run": s(120, 1)}), 1, 3)},
                          ["name", "runs_on", "steps"]), 1, 2)})),
    ("docker_service", "Describe a docker-compose service for redis 7 exposing port 6379 with 256 MB memory limit.",
     obj({"service": s(pattern=r"^[a-z][a-z0-9_-]{0,30}$"), "image": s(pattern=r"^[a-z0-9./-]+(:[a-zA-Z0-9._-]+)?$"),
          "ports": arr(obj({"container": i(1, 65535), "host": i(1, 65535), "protocol": enum("tcp", "udp")},
                           ["container", "host"]), 0, 3),
          "environment": {"type": "object", "additionalProperties": s(80), "maxProperties": 4},
          "restart": enum("no", "always", "on-failure", "unless-stopped"), "memory_limit_mb": i(16, 65536)},
         ["service", "image", "restart"])),
    ("k8s_deployment", "Write a Kubernetes Deployment for the web app nginx:1.25 with 3 replicas on port 80.",
     obj({"apiVersion": const("apps/v1"), "kind": const("Deployment"),
          "metadata": obj({"name": s(pattern=r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$"), "namespace": s(40),
                           "labels": {"type": "object", "additionalProperties": s(40), "maxProperties": 3}},
                          ["name"]),
          "spec": obj({"replicas": i(0, 20),
                       "containers": arr(obj({"name": s(pattern=r"^[a-z0-9-]{1,40}$"), "image": s(80, 1),
                                              "ports": arr(obj({"containerPort": i(1, 65535)}), 0, 2),
                                              "resources": obj({"cpu": s(pattern=r"^[0-9]+m?$"),
                                                                "memory": s(pattern=r"^[0-9]+(Mi|Gi)$")})},
                                             ["name", "image"]), 1, 2)})})),
    ("logging_config",
     "Set up logging: JSON to stdout at INFO, and errors also to /var/log/app/error.log rotated daily.",
     obj({"version": const(1), "root_level": enum("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
          "handlers": arr(obj({"name": s(30, 1), "type": enum("console", "file", "syslog"),
                               "level": enum("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                               "format": enum("text", "json"), "path": nullable(s(120)),
                               "rotation": enum("none", "daily", "weekly", "size")},
                              ["name", "type", "level"]), 1, 3)})),
    ("firewall_rule", "Allow TCP traffic from 192.168.1.0 to ports 8000-8080 on the app servers.",
     obj({"name": s(pattern=r"^[a-z0-9-]{3,40}$"), "action": enum("allow", "deny"),
          "protocol": enum("tcp", "udp", "icmp", "any"),
          "source_ip": IPV4, "prefix_length": i(0, 32),
          "ports": {"anyOf": [i(1, 65535), obj({"from": i(1, 65535), "to": i(1, 65535)})]},
          "priority": i(100, 4096), "enabled": b()},
         ["name", "action", "protocol", "source_ip", "ports"], closed=True)),
    ("dns_record", "Add an A record for api.example.com pointing to 203.0.113.10 with a 5 minute TTL.",
     obj({"zone": s(80, 1), "name": s(pattern=r"^[a-z0-9.-]{1,80}$"),
          "record": {"oneOf": [
              obj({"type": const("A"), "value": IPV4}),
              obj({"type": const("CNAME"), "value": s(pattern=r"^[a-z0-9.-]{1,80}$")}),
              obj({"type": const("MX"), "value": s(80, 1), "priority": i(0, 65535)}),
              obj({"type": const("TXT"), "value": s(200, 1)})]},
          "ttl": i(60, 86400)}, ["zone", "name", "record"])),
    ("api_key_request",
     "Create an API key named reporting-bot with read-only scopes, valid until end of year, from 10.1.2.3.",
     obj({"name": s(pattern=r"^[a-z0-9-]{3,40}$"), "scopes": arr(enum("read:users", "write:users", "read:reports",
                                                                       "write:reports", "admin"), 1, 4),
          "expires_at": nullable(DATETIME), "allowed_ips": arr(IPV4, 0, 3)}, ["name", "scopes"], closed=True)),
    ("backup_policy", "Configure nightly backups at 02:30 UTC, keeping 7 daily and 4 weekly copies, compressed.",
     obj({"enabled": b(), "schedule": obj({"time": HHMM, "timezone": TIMEZONE,
                                           "days": arr(enum("mon", "tue", "wed", "thu", "fri", "sat", "sun"), 1, 7)}),
          "retention": obj({"daily": i(0, 31), "weekly": i(0, 52), "monthly": i(0, 24)}, ["daily"]),
          "compression": enum("none", "gzip", "zstd"), "target": URI}, ["enabled", "schedule", "retention"])),
    ("package_manifest", "Write a minimal package manifest for a library called fastcsv version 1.4.2 under MIT.",
     obj({"name": s(pattern=r"^[a-z][a-z0-9-]{1,40}$"), "version": SEMVER, "description": s(120),
          "license": enum("MIT", "Apache-2.0", "BSD-3-Clause", "GPL-3.0", "proprietary"),
          "authors": arr(PERSON, 1, 2), "homepage": URI,
          "dependencies": arr(obj({"name": s(40, 1), "version": s(pattern=r"^[<>=~^]*[0-9][0-9.*]*$")}), 0, 3),
          "python_requires": s(20)}, ["name", "version", "license"])),
    # forms
    ("contact_form", "Submit the contact form: Tom Lee asks for a quote on 50 office chairs.",
     obj({"name": NAME, "email": EMAIL, "phone": PHONE, "topic": enum("sales", "support", "billing", "other"),
          "message": s(500, 10), "consent": const(True)},
         ["name", "email", "topic", "message", "consent"], closed=True)),
    ("job_application", "Apply for the data analyst role: Sara Kim, 4 years of experience, can start June 1st.",
     obj({"full_name": NAME, "email": EMAIL, "phone": PHONE,
          "position": enum("data analyst", "backend engineer", "product manager", "designer"),
          "years_experience": i(0, 50), "start_date": DATE, "portfolio_url": nullable(URI),
          "willing_to_relocate": b(), "salary_expectation": MONEY},
         ["full_name", "email", "position", "years_experience"])),
    ("cn_leave_request", "我要请年假，从下周一到周三共3天，回老家探亲，审批人是王经理 wang@corp.cn。",
     obj({"employee_id": s(pattern=r"^[0-9]{6}$"), "leave_type": enum("年假", "病假", "事假", "调休", "婚假"),
          "start_date": DATE, "end_date": DATE, "days": n(exclusiveMinimum=0, maximum=30, multipleOf=0.5),
          "reason": s(100, 1), "approver_email": EMAIL},
         ["leave_type", "start_date", "end_date", "days", "approver_email"])),
    ("hotel_booking", "Book a double room in Kyoto from May 3 to May 6 for 2 adults and 1 child, non-smoking.",
     obj({"guest": obj({"name": NAME, "email": EMAIL, "phone": PHONE}, ["name", "email"]),
          "check_in": DATE, "check_out": DATE, "rooms": i(1, 5),
          "room_type": enum("single", "double", "twin", "suite"),
          "guests": obj({"adults": i(1, 10), "children": i(0, 10)}),
          "special_requests": nullable(s(200))}, ["guest", "check_in", "check_out", "room_type", "guests"])),
    ("cn_restaurant_booking", "帮我订一家餐厅：周六晚上7点，6个人，需要包间，联系人刘先生 13912345678。",
     obj({"联系人": s(10, 1), "手机号": CN_MOBILE, "日期": DATE, "时间": HHMM, "人数": i(1, 30),
          "包间": b(), "备注": s(60)}, ["联系人", "手机号", "日期", "时间", "人数"])),
    ("survey_response", "Record a survey answer: satisfied with delivery (4/5), unhappy with packaging (2/5), NPS 7.",
     obj({"respondent_id": UUID, "submitted_at": DATETIME,
          "answers": arr(obj({"question_id": i(1, 50), "rating": i(1, 5), "comment": nullable(s(120))},
                             ["question_id", "rating"]), 1, 4),
          "nps": i(0, 10), "contact_me": b()}, ["respondent_id", "answers", "nps"])),
    ("support_ticket",
     "Open a support ticket for jane@shop.io: her invoices page shows a 500 error since this morning.",
     obj({"ticket_id": s(pattern=r"^T-[0-9]{5}$"), "customer": PERSON,
          "priority": enum("low", "medium", "high", "urgent"), "category": enum("billing", "bug", "account", "how-to"),
          "description": s(300, 1), "attachments": arr(URI, 0, 2), "status": const("open"), "opened_at": DATETIME},
         ["ticket_id", "customer", "priority", "category", "description", "status"])),
    ("rsvp_form", "RSVP yes for two people to the company party; one vegetarian meal.",
     obj({"attending": b(), "guests": i(0, 4), "name": NAME,
          "meals": arr(enum("standard", "vegetarian", "vegan", "gluten_free"), 0, 4),
          "notes": s(120)}, ["attending", "name"])),
    ("address_validation", "Validate and normalize this address: 10 downing st, london SW1A 2AA.",
     obj({"input": s(160, 1), "valid": b(), "normalized": nullable(ADDRESS), "location": nullable(GEO),
          "confidence": n(0, 1)}, ["input", "valid", "confidence"])),
    # APIs and responses
    ("token_response", "Return an OAuth token response for a client_credentials grant with read scope, valid 1 hour.",
     obj({"access_token": s(pattern=r"^[A-Za-z0-9._-]{20,200}$"), "token_type": const("Bearer"),
          "expires_in": i(exclusiveMinimum=0, maximum=86400), "scope": s(80),
          "refresh_token": nullable(s(pattern=r"^[A-Za-z0-9._-]{20,200}$"))},
         ["access_token", "token_type", "expires_in"])),
    ("error_response", "Return the API error for a request whose email field is malformed and age is negative.",
     obj({"error": obj({"code": enum("invalid_request", "unauthorized", "not_found", "rate_limited", "internal"),
                        "message": s(160, 1),
                        "details": arr(obj({"field": s(40, 1), "issue": s(80, 1)}), 0, 3)}, ["code", "message"]),
          "request_id": UUID, "status": enum(400, 401, 403, 404, 409, 422, 429, 500)})),
    ("user_list_page", "Return the first page of users (2 per page) from a directory of 37 users.",
     obj({"data": arr(obj({"id": i(1), "name": NAME, "email": EMAIL, "role": enum("admin", "member", "viewer")}), 0, 2),
          "page": i(1), "per_page": enum(2, 10, 20, 50), "total": i(0), "next": nullable(URI)})),
    ("health_check", "Report the health of the payments service: database ok, cache degraded, uptime 3 days.",
     obj({"service": s(40, 1), "status": enum("ok", "degraded", "down"), "version": SEMVER,
          "uptime_seconds": i(0), "checks": arr(obj({"name": s(30, 1), "status": enum("ok", "degraded", "down"),
                                                     "latency_ms": n(0)}, ["name", "status"]), 1, 4),
          "checked_at": DATETIME})),
    ("geocode_result", "Return the geocoding result for the Eiffel Tower.",
     obj({"query": s(120, 1), "results": arr(obj({"formatted_address": s(160, 1), "location": GEO,
                                                  "place_type": enum("address", "poi", "city", "region", "country"),
                                                  "confidence": n(0, 1)}), 0, 2)})),
    ("weather_forecast", "Give a 2-day forecast for Shanghai: cloudy today, rain tomorrow.",
     obj({"location": obj({"name": s(60, 1), "coordinates": GEO}, ["name"]),
          "current": obj({"temp_c": n(-90, 60), "condition": enum("clear", "cloudy", "rain", "snow", "storm", "fog"),
                          "humidity": i(0, 100), "wind_kph": n(0, 400)}),
          "daily": arr(obj({"date": DATE, "high_c": n(-90, 60), "low_c": n(-90, 60),
                            "condition": enum("clear", "cloudy", "rain", "snow", "storm", "fog"),
                            "precip_chance": i(0, 100)}), 1, 3)}, ["location", "current", "daily"])),
    ("batch_job_status", "What's the status of export job 7f3c? It has processed 1200 of 5000 rows.",
     obj({"job_id": s(pattern=r"^[0-9a-f]{4,32}$"),
          "state": enum("queued", "running", "succeeded", "failed", "cancelled"),
          "progress": obj({"done": i(0), "total": i(0), "percent": n(0, 100)}),
          "started_at": nullable(DATETIME), "finished_at": nullable(DATETIME), "error": nullable(s(160)),
          "result_url": nullable(URI)}, ["job_id", "state", "progress"])),
    ("rate_limit_info", "Describe the rate limit state of an API client that has used 950 of 1000 requests this hour.",
     obj({"client_id": s(40, 1), "limit": i(1), "remaining": i(0), "window": enum("minute", "hour", "day"),
          "reset_at": DATETIME, "throttled": b()})),
    # events and logs
    ("iot_telemetry", "Emit a telemetry reading from greenhouse sensor gh-07: 24.5 C, 61% humidity, battery 80%.",
     obj({"device_id": s(pattern=r"^[a-z]{2}-[0-9]{2,4}$"), "ts": DATETIME, "ip": IPV4, "firmware": SEMVER,
          "readings": obj({"temperature_c": n(-40, 85), "humidity_pct": n(0, 100), "co2_ppm": i(0, 10000),
                           "battery_pct": i(0, 100)}, ["temperature_c"]),
          "status": enum("ok", "warning", "fault")}, ["device_id", "ts", "readings", "status"])),
    ("page_view_event", "Track a page view of https://shop.example.com/cart by an anonymous visitor on mobile.",
     obj({"session_id": UUID, "user_id": nullable(s(pattern=r"^u_[0-9]{1,10}$")), "url": URI, "referrer": nullable(URI),
          "ts": DATETIME, "device": enum("desktop", "mobile", "tablet"),
          "viewport": obj({"width": i(200, 8000), "height": i(200, 8000)})}, ["session_id", "url", "ts", "device"])),
    ("audit_log", "Write an audit log entry: admin user 42 deleted project 'atlas' from 198.51.100.7.",
     obj({"id": UUID, "at": DATETIME,
          "actor": obj({"type": enum("user", "service", "system"), "id": s(40, 1), "ip": IPV4}, ["type", "id"]),
          "action": enum("create", "read", "update", "delete", "login", "logout"),
          "resource": obj({"type": enum("project", "user", "repository", "secret", "billing"), "id": s(60, 1)}),
          "success": b(), "reason": nullable(s(120))}, ["id", "at", "actor", "action", "resource", "success"])),
    ("git_push_event", "Emit a push webhook: two commits pushed to main of repo acme/api by dana@acme.dev.",
     obj({"ref": s(pattern=r"^refs/(heads|tags)/[A-Za-z0-9._/-]{1,60}$"),
          "repository": s(pattern=r"^[a-z0-9-]+/[a-z0-9._-]+$"),
          "pusher": PERSON,
          "commits": arr(obj({"id": HEX_SHA, "message": s(100, 1), "timestamp": DATETIME,
                              "added": arr(s(80), 0, 2), "modified": arr(s(80), 0, 2)},
                             ["id", "message", "timestamp"]), 1, 2),
          "forced": b()}, ["ref", "repository", "pusher", "commits"])),
    ("security_event", "Report a suspicious login: 5 failed attempts for user mei in 2 minutes from 45.33.10.2.",
     obj({"event": const("auth.suspicious_login"), "severity": enum("low", "medium", "high", "critical"),
          "user": s(40, 1), "source_ip": IPV4, "failed_attempts": i(1, 1000),
          "window_seconds": i(exclusiveMinimum=0, maximum=86400),
          "geo": obj({"country": COUNTRY, "city": s(40)}, ["country"]),
          "detected_at": DATETIME, "action_taken": enum("none", "captcha", "locked", "mfa_required")},
         ["event", "severity", "user", "source_ip", "failed_attempts", "detected_at"])),
    ("log_line",
     "Parse this log line: 2024-03-01T12:00:03Z ERROR payments timeout calling bank (req 9b1f..., ip 10.2.3.4).",
     obj({"timestamp": DATETIME, "level": enum("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"),
          "logger": s(40, 1), "message": s(200, 1),
          "context": obj({"request_id": nullable(UUID), "client_ip": nullable(IPV4), "duration_ms": i(0)}, [])},
         ["timestamp", "level", "message"])),
    ("metric_point", "Report p95 latency of 231 ms for the checkout endpoint in eu-west-1 over the last minute.",
     obj({"name": s(pattern=r"^[a-z_][a-z0-9_.]{0,60}$"), "value": n(),
          "unit": enum("ms", "s", "bytes", "count", "percent"),
          "tags": obj({"region": enum("us-east-1", "eu-west-1", "ap-southeast-1", "cn-north-1"), "endpoint": s(60)},
                      ["region"]),
          "interval_s": i(1, 3600), "ts": DATETIME})),
    ("cn_alarm", "生成一条监控告警：订单服务 CPU 使用率超过 90% 已持续 5 分钟，级别严重。",
     obj({"告警名称": s(30, 1), "服务": s(30, 1), "级别": enum("提示", "警告", "严重", "紧急"),
          "指标": obj({"名称": s(20, 1), "当前值": n(), "阈值": n(), "单位": enum("%", "ms", "次/秒", "MB")}),
          "持续分钟": i(0, 1440), "触发时间": DATETIME, "已确认": b()})),
    # calendars, travel, bookings
    ("recurring_meeting", "Set up a weekly standup every Monday and Thursday at 09:30 Berlin time for 15 minutes.",
     obj({"title": s(80, 1), "start_time": HHMM, "duration_minutes": i(5, 480, multipleOf=5), "timezone": TIMEZONE,
          "rrule": obj({"freq": enum("daily", "weekly", "monthly"), "interval": i(1, 12),
                        "by_day": arr(enum("MO", "TU", "WE", "TH", "FR", "SA", "SU"), 0, 7),
                        "until": nullable(DATE)}, ["freq", "interval"]),
          "organizer": EMAIL}, ["title", "start_time", "duration_minutes", "timezone", "rrule"])),
    ("itinerary", "Plan a 2-day trip to Rome for 2 travellers: Colosseum and Vatican.",
     obj({"trip_name": s(60, 1), "travelers": i(1, 20), "start_date": DATE,
          "days": arr(obj({"day": i(1, 30), "city": s(40, 1), "activities": arr(s(60, 1), 1, 3),
                           "budget": MONEY}, ["day", "city", "activities"]), 1, 3)},
         ["trip_name", "travelers", "days"])),
    ("car_rental", "Reserve a hybrid compact car at Munich airport from June 5 10:00 to June 9 10:00.",
     obj({"vehicle": obj({"class": enum("economy", "compact", "midsize", "suv", "van"),
                          "fuel": enum("petrol", "diesel", "hybrid", "electric"), "automatic": b()}, ["class", "fuel"]),
          "pickup": obj({"location": s(80, 1), "at": DATETIME}), "return": obj({"location": s(80, 1), "at": DATETIME}),
          "driver": obj({"name": NAME, "age": i(18, 99), "license_country": COUNTRY}),
          "extras": arr(enum("gps", "child_seat", "snow_chains", "extra_driver"), 0, 3)},
         ["vehicle", "pickup", "return", "driver"])),
    ("flight_status", "What is the status of flight LH 454 today? It is delayed by 40 minutes at gate B22.",
     obj({"flight": s(pattern=r"^[A-Z0-9]{2} ?[0-9]{1,4}$"), "date": DATE,
          "status": enum("scheduled", "boarding", "departed", "delayed", "cancelled", "landed"),
          "delay_minutes": i(0, 1440), "gate": nullable(s(pattern=r"^[A-Z]?[0-9]{1,3}[A-Z]?$")),
          "departure": obj({"airport": s(pattern=r"^[A-Z]{3}$"), "scheduled": DATETIME}),
          "arrival": obj({"airport": s(pattern=r"^[A-Z]{3}$"), "scheduled": DATETIME})})),
    ("cn_train_ticket", "帮我买一张3月15日北京南到上海虹桥的高铁二等座，乘客王芳。",
     obj({"车次": s(pattern=r"^[GDCZTK][0-9]{1,4}$"), "出发站": s(10, 2), "到达站": s(10, 2), "日期": DATE,
          "出发时间": HHMM, "席别": enum("商务座", "一等座", "二等座", "无座"),
          "乘客": arr(obj({"姓名": s(10, 2), "证件类型": enum("身份证", "护照"), "证件号": s(pattern=r"^[0-9A-Z]{8,18}$")}), 1, 2),
          "票价": n(0, multipleOf=0.5)})),
    # health, education, misc domains
    ("appointment", "Book a dermatology appointment for Ravi Kumar (born 1985-02-14) next Tuesday at 3pm.",
     obj({"patient": obj({"name": NAME, "date_of_birth": DATE, "phone": PHONE}, ["name", "date_of_birth"]),
          "department": enum("general", "dermatology", "cardiology", "pediatrics", "orthopedics"),
          "slot": DATETIME, "reason": s(160), "first_visit": b(),
          "insurance": nullable(obj({"provider": s(60, 1), "member_id": s(pattern=r"^[A-Z0-9]{6,14}$")}))},
         ["patient", "department", "slot"])),
    ("prescription", "Write a prescription: amoxicillin 500 mg three times a day for 7 days.",
     obj({"medication": s(60, 1), "dose_mg": n(exclusiveMinimum=0, maximum=5000, multipleOf=0.5),
          "route": enum("oral", "topical", "intravenous", "inhaled"), "times_per_day": i(1, 6),
          "duration_days": i(1, 365), "refills": i(0, 5), "notes": s(160)},
         ["medication", "dose_mg", "route", "times_per_day", "duration_days"])),
    ("course_enrollment", "Enroll student S2024017 in CS101 Intro to Programming (4 credits) for fall, letter grade.",
     obj({"student_id": s(pattern=r"^S[0-9]{7}$"),
          "course": obj({"code": s(pattern=r"^[A-Z]{2,4}[0-9]{3}$"), "title": s(80, 1), "credits": i(1, 6)}),
          "semester": enum("spring", "summer", "fall", "winter"), "year": i(2000, 2100),
          "grade_option": enum("letter", "pass_fail", "audit")})),
    ("cn_quiz_question", "出一道中学物理单选题，难度中等，四个选项。",
     obj({"题目": s(120, 5), "选项": arr(s(40, 1), 4, 4), "答案": i(0, 3), "难度": enum("简单", "中等", "困难"),
          "解析": s(150), "知识点": arr(s(20, 1), 1, 3)}, ["题目", "选项", "答案", "难度"])),
    ("recipe", "Give me a recipe card for pancakes for 4 people.",
     obj({"name": s(60, 1), "servings": i(1, 12), "prep_minutes": i(0, 240, multipleOf=5),
          "ingredients": arr(obj({"name": s(40, 1), "quantity": n(exclusiveMinimum=0, maximum=5000),
                                  "unit": enum("g", "kg", "ml", "l", "cup", "tbsp", "tsp", "piece")}), 1, 5),
          "steps": arr(s(100, 1), 1, 4), "vegetarian": b()}, ["name", "servings", "ingredients", "steps"])),
    ("book_record", "Catalog the book 'Designing Data-Intensive Applications' by Martin Kleppmann, 2017.",
     obj({"isbn": s(pattern=r"^97[89][0-9]{10}$"), "title": s(120, 1), "authors": arr(NAME, 1, 3),
          "published": DATE, "language": LANG, "pages": i(1, 5000), "available": b(),
          "subjects": arr(s(40), 0, 3)}, ["isbn", "title", "authors", "available"])),
    ("movie", "Describe the movie Spirited Away for our catalog.",
     obj({"title": s(80, 1), "year": i(1888, 2030), "genres": arr(enum("animation", "drama", "comedy", "fantasy",
                                                                         "action", "documentary"), 1, 3),
          "rating": n(0, 10, multipleOf=0.1), "runtime_minutes": i(1, 600),
          "cast": arr(obj({"name": NAME, "role": s(40)}, ["name"]), 0, 3), "family_friendly": b()},
         ["title", "year", "genres"])),
    ("real_estate_listing", "List a 3-bedroom, 2.5-bath apartment of 120 m2 in Lyon for 450000 EUR with a balcony.",
     obj({"listing_id": UUID, "address": ADDRESS, "price": MONEY, "bedrooms": i(0, 20),
          "bathrooms": n(0, 20, multipleOf=0.5), "area_sqm": n(exclusiveMinimum=0, maximum=10000),
          "features": arr(enum("balcony", "garage", "garden", "elevator", "pool", "fireplace"), 0, 4),
          "listed_on": DATE}, ["listing_id", "address", "price", "bedrooms", "area_sqm"])),
    ("match_result", "Record the final score: Arsenal 2, Chelsea 1 at the Emirates last Sunday.",
     obj({"competition": s(40), "date": DATE, "venue": s(60),
          "home": obj({"team": s(40, 1), "score": i(0, 50)}), "away": obj({"team": s(40, 1), "score": i(0, 50)}),
          "status": enum("scheduled", "live", "finished", "postponed")}, ["date", "home", "away", "status"])),
    ("vehicle_record", "Register a 2019 Toyota Corolla hybrid with 48000 km for fleet tracking.",
     obj({"vin": s(pattern=r"^[A-HJ-NPR-Z0-9]{17}$"), "make": s(30, 1), "model": s(30, 1), "year": i(1990, 2030),
          "mileage_km": i(0, 2000000), "fuel": enum("petrol", "diesel", "hybrid", "electric"),
          "plate": s(pattern=r"^[A-Z0-9 -]{2,10}$"), "last_service": nullable(DATE)},
         ["vin", "make", "model", "year", "fuel"])),
    ("timesheet", "Log my hours for the week of March 4: 7.5 h on PRJ-12 Monday and 8 h on PRJ-07 Tuesday.",
     obj({"employee_id": s(pattern=r"^E-[0-9]{4}$"), "week_start": DATE,
          "entries": arr(obj({"date": DATE, "project": s(pattern=r"^PRJ-[0-9]{2,4}$"),
                              "hours": n(exclusiveMinimum=0, maximum=24, multipleOf=0.25),
                              "billable": b()}, ["date", "project", "hours"]), 1, 5),
          "submitted": b()})),
    # classification and extraction outputs
    ("ticket_classification", "Classify this message: 'I was charged twice for my March subscription, please refund.'",
     obj({"category": enum("billing", "technical", "account", "sales", "other"),
          "sentiment": enum("positive", "neutral", "negative"), "urgency": i(1, 5),
          "confidence": n(0, 1), "needs_human": b(), "keywords": arr(s(30, 1), 0, 3)}, closed=True)),
    ("entity_extraction", "Extract the entities from: 'Satya Nadella visited Microsoft's Shanghai office on 3 May.'",
     obj({"entities": arr(obj({"text": s(60, 1), "type": enum("PERSON", "ORG", "LOCATION", "DATE", "MONEY"),
                               "start": i(0)}), 0, 5), "language": LANG}, closed=True)),
    ("cn_sentiment", "分析这条评论的情感：“物流很快，但是包装破损了，客服态度还不错。”",
     obj({"整体情感": enum("正面", "中性", "负面"), "得分": n(-1, 1),
          "方面": arr(obj({"方面": enum("物流", "包装", "客服", "质量", "价格"), "情感": enum("正面", "中性", "负面")}), 1, 4)},
         closed=True)),
    ("meeting_summary",
     "Summarize the meeting: we agreed to ship v2 on Friday; Ana fixes the login bug; Li updates docs.",
     obj({"summary": s(300, 10), "decisions": arr(s(120, 1), 0, 3),
          "action_items": arr(obj({"owner": s(40, 1), "task": s(120, 1), "due": nullable(DATE)}), 0, 3)},
         closed=True)),
    ("resume_parse", "Parse this resume: 'Jin Park, jin@mail.com, 5 yrs Python at Naver, BSc CS KAIST 2016.'",
     obj({"name": NAME, "email": EMAIL,
          "experience": arr(obj({"company": s(60, 1), "role": s(60), "years": n(0, 60, multipleOf=0.5)},
                                ["company", "years"]), 0, 3),
          "education": arr(obj({"school": s(80, 1),
                                "degree": enum("high_school", "associate", "bachelor", "master", "phd"),
                               "year": i(1950, 2030)}, ["school", "degree"]), 0, 2),
          "skills": arr(s(30, 1), 0, 5)}, ["name", "experience", "skills"])),
    ("moderation_result", "Moderate this comment: 'Your product is garbage and so are you.'",
     obj({"flagged": b(), "categories": obj({"harassment": b(), "hate": b(), "violence": b(), "spam": b(),
                                            "self_harm": b()}),
          "scores": obj({"harassment": n(0, 1), "hate": n(0, 1)}), "action": enum("allow", "review", "block")},
         closed=True)),
    ("sql_plan", "Plan a query for: top 5 customers by revenue in 2024, using the orders and customers tables.",
     obj({"sql": s(300, 10), "tables": arr(s(pattern=r"^[a-z_][a-z0-9_]{0,40}$"), 1, 4),
          "estimated_rows": i(0), "uses_index": b(), "explanation": s(200)}, ["sql", "tables"], closed=True)),
]


PET_DEFS = {"Cat": obj({"pet_type": const("cat"), "name": s(40, 1), "indoor": b()}, ["pet_type", "name"], title="Cat"),
            "Dog": obj({"pet_type": const("dog"), "name": s(40, 1), "breed": s(40)}, ["pet_type", "name"], title="Dog")}


# -- the gap shapes: real-world schemas using features the grammar engine rejects --------------------------------
def _gap_schemas() -> list[dict]:
    tags = arr(s(30, 1), 1, 5, uniqueItems=True)
    return [
        {"id": "gap_unique_tags", "gap": "uniqueItems",
         "prompt": "Tag this blog post about migrating a Django app to async views.",
         "schema": obj({"post_id": i(1), "tags": tags}, closed=True)},
        {"id": "gap_iban_format", "gap": "format iban (unknown format)",
         "prompt": "Store the payout account DE89 3704 0044 0532 0130 00 for vendor V-88.",
         "schema": obj({"vendor_id": s(pattern=r"^V-[0-9]{1,6}$"), "iban": s(fmt="iban")})},
        {"id": "gap_password_lookahead", "gap": "pattern with look-ahead",
         "prompt": "Suggest a strong initial password for a new intern account.",
         "schema": obj({"username": s(pattern=r"^[a-z]{3,12}$"),
                        "password": s(pattern=r"^(?=.*[A-Z])(?=.*[0-9])[A-Za-z0-9!@#$%]{10,20}$")})},
        {"id": "gap_if_then", "gap": "if/then",
         "prompt": "Ship order 77 by express courier to 5 Rue Cler, Paris.",
         "schema": {**obj({"order_id": i(1), "method": enum("pickup", "standard", "express"),
                           "address": nullable(s(120))}),
                    "if": {"properties": {"method": {"enum": ["standard", "express"]}}},
                    "then": {"properties": {"address": s(120, 1)}}}},
    ]


def _extra_schemas() -> list[dict]:
    """Hand-written shapes kept in one spelling."""
    return [
        # oneOf without a discriminator: the grammar takes it as anyOf (glmkit sets coerce_one_of)
        {"id": "pet_oneof_ref", "variant": "oneof",
         "prompt": "Register my pet: a golden retriever called Biscuit.",
         "schema": {"type": "object", "$defs": PET_DEFS, "required": ["owner", "pet"],
                    "properties": {"owner": NAME,
                                   "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}}}},
        {"id": "team_member_nullable_ref", "variant": "oneof",
         "prompt": "Create a team member record for Olu, who has no manager yet.",
         "schema": {"type": "object", "$defs": {"Ref": obj({"id": i(1), "name": NAME}, title="Ref")},
                    "required": ["name", "manager"],
                    "properties": {"name": NAME, "manager": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/Ref"}]}}}},
        {"id": "pet_registration.pydantic", "variant": "defs",
         "prompt": "Register my pet: a golden retriever called Biscuit.",
         "schema": {"type": "object", "title": "PetRegistration", "$defs": PET_DEFS, "required": ["owner", "pet"],
                    "properties": {"owner": NAME,
                                   "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                                           "discriminator": {"propertyName": "pet_type",
                                                             "mapping": {"cat": "#/$defs/Cat",
                                                                         "dog": "#/$defs/Dog"}}}}}},
    ]


# -- the three spellings -----------------------------------------------------------------------------------------
def strict(schema: dict) -> dict:
    """Every object closed, every property required; optional ones nullable."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in ("properties", "$defs"):  # maps of names to schemas
                out[key] = {name: walk(sub) for name, sub in value.items()}
            elif key in ("enum", "const", "required", "default", "examples"):
                out[key] = value
            else:
                out[key] = walk(value)
        props = out.get("properties")
        if props:
            out.setdefault("additionalProperties", False)  # a map-like object (a schema there) stays as it is
            required = set(out.get("required", []))
            out["properties"] = {k: v if k in required else nullable(v) for k, v in props.items()}
            out["required"] = list(props)
        return out

    return walk(schema)


def with_defs(schema: dict) -> dict:
    """Nested objects (property values and array items) hoisted into $defs, each with a title."""
    schema = copy.deepcopy(schema)
    defs: dict[str, dict] = {}

    def hoist(name: str, node: dict) -> dict:
        title = "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_")) or "Item"
        if not title.isascii():
            title = f"Def{len(defs) + 1}"
        node = {**walk(node), "title": title}
        key = title
        while key in defs and defs[key] != node:
            key += "_"
        defs[key] = node
        return {"$ref": f"#/$defs/{key}"}

    def walk(node, name: str = "item"):
        if not isinstance(node, dict):
            return node
        out = dict(node)
        if "properties" in out:
            out["properties"] = {k: hoist(k, v) if _is_object(v) else walk(v, k)
                                 for k, v in out["properties"].items()}
        if isinstance(out.get("items"), dict):  # line_items -> LineItem
            items, singular = out["items"], name[:-1] if name.endswith("s") else name + "_item"
            out["items"] = hoist(singular, items) if _is_object(items) else walk(items)
        for key in ("anyOf", "oneOf"):
            if key in out:  # branches stay inline (oneOf over $ref is a gap of its own); objects inside them hoist
                out[key] = [walk(x, name) for x in out[key]]
        return out

    root = walk(schema)
    return {**root, "$defs": defs} if defs else root


def _is_object(node) -> bool:
    return isinstance(node, dict) and node.get("type") == "object" and "properties" in node


def build() -> list[dict]:
    seen, lines = set(), []
    for name, prompt, schema in BASES:
        assert name not in seen, name
        seen.add(name)
        for variant, make in (("base", lambda x: x), ("strict", strict), ("defs", with_defs)):
            lines.append({"id": f"{name}.{variant}", "variant": variant, "prompt": prompt, "schema": make(schema)})
    lines += _extra_schemas()
    for gap in _gap_schemas():
        lines.append({"id": gap["id"], "variant": "gap", "gap": gap["gap"], "prompt": gap["prompt"],
                      "schema": gap["schema"]})
    return lines


def main() -> None:
    import jsonschema

    lines = build()
    for line in lines:  # every schema must itself be a valid JSON schema
        jsonschema.validators.validator_for(line["schema"]).check_schema(line["schema"])
    OUT.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} schemas to {OUT}")


if __name__ == "__main__":
    main()
