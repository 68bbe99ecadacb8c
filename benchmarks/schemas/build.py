"""Builds benchmarks/schemas/schemas.jsonl, the corpus of benchmarks/structured.py.

    python benchmarks/schemas/build.py            # rewrites schemas.jsonl next to this file

Every line is {"id", "prompt", "schema"} (plus "variant" and, for the few schemas that use a JSON-schema feature
the grammar engine rejects, "gap"). The corpus is written by hand for this project as ~70 base shapes from
ordinary software work (API payloads, configuration, forms, catalogs, events, invoices, tool arguments, ...), then
each base (shapes.py, built from blocks.py) is emitted in three spellings that real services use for the same
payload:

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

from blocks import NAME, arr, b, const, enum, i, nullable, obj, s
from shapes import BASES

OUT = Path(__file__).with_name("schemas.jsonl")


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
